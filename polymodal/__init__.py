"""polymodal: build, train, evaluate and serve multimodal LLMs from pretrained parts.

Example:
    from polymodal import Engine, MultimodalLM, load_recipe

    model = MultimodalLM.from_config(load_recipe("recipes/tiny-llava.yaml"))
    print(Engine(model).generate([{"messages": [{"role": "user", "content": "Hi"}]}])[0].text)
"""

__version__ = "0.1.0"

# Names resolve on first use, so `import polymodal` (and the CLI's --help) stays light.
_EXPORTS = {
    "MultimodalLM": "polymodal.model",
    "load_any": "polymodal.build",
    "Engine": "polymodal.engine.generate",
    "SamplingParams": "polymodal.engine.sampling",
    "ModelConfig": "polymodal.config",
    "load_recipe": "polymodal.config",
    "UserError": "polymodal.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'polymodal' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
