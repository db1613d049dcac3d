"""Generation: the KV cache, the decoder-layer step, runners, sampling and batching.

Importing the package registers the built-in runners (`registry.RUNNERS`).
"""

from polymodal.engine import runners  # noqa: F401 - registers "llama" and "transformers"
