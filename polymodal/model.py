"""MultimodalLM: encoder -> connector -> fusion -> LLM, with logits only where labels exist."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polymodal.config import ModelConfig, RecipeConfig
from polymodal.connectors import build_connector
from polymodal.encoders import build_encoder
from polymodal.errors import UserError
from polymodal.fusion import DecoderFusion, build_fusion
from polymodal.fusion.context import FusionState
from polymodal.heads import ForecastHead
from polymodal.image_generation.codes import ImageCodes, attach_image_codes, code_modules
from polymodal.image_generation.flow_head import DRAWN_LATENTS, ImageFlow
from polymodal.llm import LanguageModel, add_placeholder_token
from polymodal.processing import Processor
from polymodal.processing.batch import IGNORE, Batch
from polymodal.processing.processor import MediaKind
from polymodal.quantization import quantize_language_model
from polymodal.registry import register_model_kind
from polymodal.safe_files import build_checked
from polymodal.saved import (
    load_saved_tokenizer,
    load_saved_weights,
    read_model_config,
    write_model_files,
)
from polymodal.sources import PartLoader


@dataclass
class LabelLogits:
    """What the forward gives an objective: logits only where a label exists.

    logits [N_labels, V] (the prediction at position t of the label at t+1); targets
    [N_labels] those labels; label_mask [B, T-1] bool: where in the batch they sit (so an
    objective can find each label's sample in `Batch.sample_ids[:, 1:]`).
    """

    logits: torch.Tensor
    targets: torch.Tensor
    label_mask: torch.Tensor
    aux_loss: torch.Tensor | None = None  # a fusion's auxiliary loss (a router's load balancing)
    # Labels that are image codes (a model that draws): scored over the C codes alone.
    # image_logits [N_image, C], image_targets [N_image] in [0, C), image_mask [B, T-1].
    image_logits: torch.Tensor | None = None
    image_targets: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None


@register_model_kind("multimodal-lm", config=ModelConfig)
class MultimodalLM(nn.Module):
    """A decoder LLM that reads media through an encoder and a connector per modality.

    `encoders` and `connectors` are `nn.ModuleDict`s keyed by modality ("image", "audio"):
    a medium's encoder inputs become features, its connector turns them into LLM tokens,
    and the fusion puts those where the medium's placeholder stands in the text.

    Example:
        model = MultimodalLM.from_config(load_recipe("recipes/tiny-llava.yaml").model)
        batch = collate([model.processor.encode_for_training(messages, [image])], model.pad_id)
        loss = next_token_loss(model(batch))  # polymodal.objectives.losses
    """

    def __init__(self, config: ModelConfig, loader: PartLoader | None = None, tokenizer=None):
        super().__init__()
        if config.kind != "multimodal-lm":
            # build.build_model / load_model dispatch by kind: another kind here is a caller's bug
            raise RuntimeError(f"model.kind {config.kind!r} is not a multimodal LM")
        loader = loader or PartLoader(trust_remote_code=config.llm.trust_remote_code)
        self.config = config
        self.llm = LanguageModel(config.llm, loader, tokenizer)
        self.encoders = nn.ModuleDict({modality: build_encoder(part, loader, f"encoders.{modality}")
                                       for modality, part in config.encoders.items()})
        self.connectors = nn.ModuleDict({
            modality: build_connector(config.connectors[modality], encoder.out_dim, self.llm.hidden_size,
                                      encoder.num_tokens, f"model.connectors.{modality}")
            for modality, encoder in self.encoders.items()})
        # modality -> its placeholder's token id; the image's always exists (text-only models
        # refuse images by it); other modalities' are added to the tokenizer as they come.
        self.placeholder_ids = {"image": self.llm.image_token_id} | {
            modality: add_placeholder_token(self.llm.tokenizer, self.llm.model, config.llm.placeholder(modality))
            for modality in self.encoders if modality != "image"}
        for connector in self.connectors.values():  # Time-LLM's reads the word embeddings, once resized
            if hasattr(connector, "bind_word_embeddings"):
                connector.bind_word_embeddings(self.llm.model.get_input_embeddings().weight,
                                               self.llm.tokenizer.vocab_size)
        self.fusion = build_fusion(config.fusion)
        if isinstance(self.fusion, DecoderFusion):
            if config.quantization is not None:
                raise UserError(f"model.quantization: fusion kind {config.fusion.kind!r} hooks the LLM's "
                                f"layers; quantizing them is not supported (inline fusion only)")
            self.fusion.attach(self.llm.model)  # after LoRA: its hooks sit on the adapted modules
        self.forecast_head = None if config.forecast_head is None else ForecastHead(
            config.forecast_head, self.connectors[config.forecast_head.modality].num_tokens, self.llm.hidden_size,
            self.encoders[config.forecast_head.modality].channels)
        self.image_tokenizer, self.image_codes, self.image_flow = self._image_output(config)
        if config.quantization is not None:  # a saved quantized model: its packed weights load over these
            quantize_language_model(self.llm.model, config.quantization)
        self.architectures = loader.architectures  # what save_pretrained records per part
        self.processor = Processor(self.llm, {
            modality: MediaKind(modality, config.llm.placeholder(modality), self.placeholder_ids[modality],
                                self.text_tokens_per_medium(modality), encoder.load_media)
            for modality, encoder in self.encoders.items()})
        # Saved models and checkpoints from before modalities name the image's parts
        # `encoder.*` and `connector.*`: renamed as they load (_rename_old_weights).
        self._register_load_state_dict_pre_hook(_rename_old_weights)

    def _image_output(self, config: ModelConfig) -> tuple[nn.Module | None, ImageCodes | None, ImageFlow | None]:
        """The image tokenizer, and the LLM's image-code tokens (kind tokens) or its flow head
        (kind flow: markers' rows and MAR's head) of a model that draws (after LoRA and the
        placeholders: the new ids follow every text row). Quantization, applied after, leaves
        their embedding and head (`CodeHead`, the text rows with the image rows) in float."""
        if config.image_output is None:
            return None, None, None
        from polymodal.encoders.image_tokenizer import ImageTokenizer

        tokenizer = ImageTokenizer(config.image_output.tokenizer)
        if config.image_output.kind == "flow":  # the markers alone; V + 2 marks a latent position
            layout = attach_image_codes(self.llm.model, 0, tokenizer.num_codes)
            return tokenizer, None, ImageFlow(layout, self.llm.hidden_size, tokenizer.latent_dim,
                                              config.image_output.flow)
        return tokenizer, attach_image_codes(self.llm.model, tokenizer.codebook_size, tokenizer.num_codes), None

    @classmethod
    def from_config(cls, config: ModelConfig | RecipeConfig) -> MultimodalLM:
        """Build from a config, loading each part's pretrained weights from its source."""
        return cls(config.model if isinstance(config, RecipeConfig) else config)

    def text_tokens_per_medium(self, modality: str) -> int:
        """Placeholder tokens one medium takes in the text: the connector's K (inline), or
        what the fusion kind asks (1 for cross-attention and adapters)."""
        tokens = self.connectors[modality].num_tokens
        return self.fusion.text_tokens_per_medium(tokens) if isinstance(self.fusion, DecoderFusion) else tokens

    @property
    def pad_id(self) -> int:
        return self.llm.tokenizer.pad_token_id

    @property
    def tokens_per_image(self) -> int | None:
        return self.processor.tokens_per_image

    @property
    def modalities(self) -> list[str]:
        """The media this model reads ("image", "audio", ...), in the config's order."""
        return list(self.encoders)

    @property
    def encoder(self) -> nn.Module | None:
        """The image encoder (None without one): what a contrastive stage pretrains."""
        return self.encoders["image"] if "image" in self.encoders else None  # noqa: SIM401 - no ModuleDict.get

    @property
    def connector(self) -> nn.Module | None:
        """The image connector (None without one)."""
        return self.connectors["image"] if "image" in self.connectors else None  # noqa: SIM401

    # ------------------------------------------------------------ freezing

    def part_modules(self) -> dict[str, nn.Module | None]:
        """Trainable parts by name: `encoder` and `connector` (every modality's),
        `encoder.MODALITY` and `connector.MODALITY` (one modality's), `llm`."""
        parts: dict[str, nn.Module | None] = {"encoder": self.encoders or None,
                                              "connector": self.connectors or None, "llm": self.llm}
        for modality in self.encoders:
            parts[f"encoder.{modality}"] = self.encoders[modality]
            parts[f"connector.{modality}"] = self.connectors[modality]
        if self.forecast_head is not None:
            parts["forecast_head"] = self.forecast_head
        if isinstance(self.fusion, DecoderFusion):
            parts["fusion"] = self.fusion
        if self.image_tokenizer is not None:
            parts["image_tokenizer"] = self.image_tokenizer
        if self.image_codes is not None:  # a container made here: the rows stay the LLM's children
            parts["image_output"] = nn.ModuleList(code_modules(self.llm.model))
        if self.image_flow is not None:  # the markers' rows and the flow head with its projection
            parts["image_output"] = nn.ModuleList([*code_modules(self.llm.model), self.image_flow])
        return parts

    def decoder_layers(self) -> list[nn.Module]:
        """The LLM's decoder layers (transformers' `get_decoder().layers`): what a stage's
        `compile: true` compiles (train/compiled.py)."""
        return list(self.llm.model.get_decoder().layers)

    def set_trainable(self, parts: list[str]) -> None:
        """Train exactly these parts and freeze the rest; the one place freezing happens.

        Parts: `encoder` and `connector` (all modalities), `encoder.image`,
        `connector.audio`, ... (one modality), `llm` (all of it), `llm.lora` (the adapters),
        `forecast_head` (when the model has one), `fusion` (a kind with weights of its own),
        `image_tokenizer` and `image_output` (a model that draws: its tokenizer; the image
        tokens' embedding and head rows).

        Raises:
            UserError: an unknown part, or `llm.lora` without adapters configured.
        """
        modules = self.part_modules()
        known = ["encoder", "connector", *(name for name in modules if "." in name), "llm", "llm.lora",
                 *(part for part in ("forecast_head", "fusion", "image_tokenizer", "image_output")
                   if part in modules)]
        unknown = [part for part in parts if part not in known]
        if unknown:
            raise UserError(f"unknown trainable part {unknown[0]!r}; known: {', '.join(known)}")
        if "llm.lora" in parts and self.config.llm.lora is None:
            raise UserError("llm.lora is trainable but model.llm.lora is not configured")
        self.requires_grad_(False)
        for part in parts:
            if part == "llm.lora":
                for name, parameter in self.llm.named_parameters():
                    parameter.requires_grad_(parameter.requires_grad or "lora_" in name)
            elif modules[part] is not None:
                modules[part].requires_grad_(True)

    # ------------------------------------------------------------ forward

    def encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """One modality's encoder inputs [N, ...] (pixels [N, 3, S, S] in [0, 1], log-mel
        [N, 80, F]) -> LLM tokens [N, K, D_llm]. UserError when the model lacks the modality."""
        if modality not in self.encoders:
            reads = ", ".join(self.encoders) or "text only"
            raise UserError(f"this model has no {modality} encoder; it takes {reads}")
        return self.connectors[modality](self.encoders[modality](inputs))

    def embed(self, input_ids: torch.Tensor, media: dict | None = None,
              media_features: dict | None = None) -> torch.Tensor:
        """Token ids [B, T] (+ media) -> input embeddings [B, T, D], each medium's tokens fused in.

        Each argument maps modality -> that modality's items in placeholder order: `media`
        the encoder inputs (pixels [N, 3, S, S]), `media_features` the encoder's outputs
        [N, S_enc, D_enc] (a frozen encoder's cache), used instead of the inputs when given.
        Raises RuntimeError when a modality's placeholders and items differ in number (the
        processor checks them first). A fusion inside the layers needs `prepare`'s state too.
        """
        return self.prepare(input_ids, media, media_features)[0]

    def prepare(self, input_ids: torch.Tensor, media: dict | None = None,
                media_features: dict | None = None) -> tuple[torch.Tensor, FusionState | None]:
        """(input embeddings [B, T, D], the fusion's per-row state or None for `inline`): what a
        decoder loop needs to run these rows. The state holds each row's image tokens for a
        kind that reads them inside the layers; run the decoder inside `state.call(ids)`."""
        media, media_features = media or {}, media_features or {}
        if self.image_flow is None:
            embeds = self.llm.embed(input_ids)
        else:  # latent positions read the drawn latents' projections
            embeds = self.image_flow.embed(self.llm.embed, input_ids, media.get(DRAWN_LATENTS))
        image_tokens = None
        for modality, token_id in self.placeholder_ids.items():
            tokens = None
            if media_features.get(modality) is not None:
                tokens = self.connectors[modality](media_features[modality])
            elif media.get(modality) is not None:
                tokens = self.encode(modality, media[modality])
            embeds = self.fusion(embeds, input_ids == token_id, tokens, modality)
            image_tokens = tokens if modality == "image" else image_tokens
        if not isinstance(self.fusion, DecoderFusion):
            return embeds, None
        return embeds, self.fusion_state(input_ids, image_tokens)

    def fusion_state(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None) -> FusionState:
        """The rows' fusion state: image_tokens [N, K, D] in reading order -> [B, M, K, D]
        per row (zeros past a row's count M_b), with the placeholder ids of every modality."""
        per_image = self.text_tokens_per_medium("image") if "image" in self.connectors else 1
        counts = (input_ids == self.placeholder_ids["image"]).sum(-1) // per_image  # [B]
        media = None
        if image_tokens is not None and int(counts.max()) > 0:
            media = image_tokens.new_zeros(len(counts), int(counts.max()), *image_tokens.shape[1:])
            row_of = torch.repeat_interleave(torch.arange(len(counts)), counts)  # [N]
            slot_of = torch.cat([torch.arange(int(count)) for count in counts])  # [N]
            media[row_of, slot_of] = image_tokens.to(media.dtype)
        return self.fusion.new_state(media, counts, list(self.placeholder_ids.values()),
                                     self.placeholder_ids["image"], per_image)

    def forward(self, batch: Batch) -> LabelLogits:
        """Fuse the batch's media into its text, run the decoder, and compute logits only at
        the positions that predict a label (`LabelLogits`); the loss is the objective's
        (`objectives.losses`), with the fusion's auxiliary loss when it has one."""
        hidden, aux_losses = self._decode(batch)  # [B, T, D]
        targets = batch.labels[:, 1:]  # token t+1 is predicted at position t
        keep = targets != IGNORE  # [B, T-1]
        image = None
        if self.image_codes is not None:  # codes are scored over the codebook alone
            image = keep & self.image_codes.is_code(targets)
            keep = keep & ~image
        if self.image_flow is not None:  # latents: the flow head's loss, not the LM head's
            latents = keep & (targets == self.image_flow.latent_id)
            keep = keep & ~latents
            if bool(latents.any()):
                aux_losses = [*aux_losses, self._flow_loss(batch, hidden[:, :-1][latents])]
        logits = self.llm.lm_head(hidden[:, :-1][keep])  # [N_labels, V], nothing else
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        output = LabelLogits(logits=logits, targets=targets[keep], label_mask=keep, aux_loss=aux_loss)
        if image is not None and bool(image.any()):
            output.image_logits = self.llm.lm_head.code_logits(hidden[:, :-1][image])  # [N_image, C]
            output.image_targets = self.image_codes.to_codes(targets[image])
            output.image_mask = image
        return output

    def _flow_loss(self, batch: Batch, condition: torch.Tensor) -> torch.Tensor:
        """Kind flow: the flow head's loss on the drawn latents (`Batch.media["drawn_latents"]`
        [N, K, d], reading order) given the hidden states [N * K, D] that predict them (the
        begin marker's predicts latent 0, latent k's position latent k + 1)."""
        latents = batch.media[DRAWN_LATENTS]
        return self.image_flow.loss(latents.reshape(len(condition), -1), condition)

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """The decoder's last hidden states [B, T, D] of the batch, its media fused in."""
        return self._decode(batch)[0]

    def _decode(self, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(last hidden states [B, T, D], the fusion's auxiliary losses) of the batch."""
        embeds, state = self.prepare(batch.input_ids, batch.media, media_features=batch.media_features)
        call = nullcontext() if state is None else state.call(batch.input_ids, branch_ids=batch.branch_ids)
        with call as fusion_call:
            hidden = self.llm.decoder(inputs_embeds=embeds, attention_mask=batch.decoder_attention_mask(),
                                      position_ids=batch.position_ids, use_cache=False).last_hidden_state
        return hidden, [] if fusion_call is None else fusion_call.aux_losses

    def forecast(self, batch: Batch) -> torch.Tensor:
        """The forecast head's values [B, C, H] for a batch of one series per row, in the
        series encoder's normalised space (its `denormalize` maps them back with each input's
        statistics). RuntimeError for a model without a head (`forecast_head` is None)."""
        if self.forecast_head is None:
            raise RuntimeError("this model has no forecast head")
        token_id = self.placeholder_ids[self.forecast_head.config.modality]
        return self.forecast_head(self.hidden_states(batch), batch.input_ids == token_id)

    # ------------------------------------------------------------ training data

    @property
    def image_placeholder(self) -> str:
        return self.llm.image_token

    # ------------------------------------------------------------ files

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json, model.safetensors and the tokenizer files; each file atomically."""
        directory = Path(directory)
        write_model_files(directory, self, self.config, self.architectures)
        self.llm.tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MultimodalLM:
        """Rebuild a saved model: architectures from config.json, weights from model.safetensors.
        Raises UserError naming the file for a missing, damaged or mismatched file (checked
        before the model is allocated; see polymodal.safe_files)."""
        directory = Path(directory)
        record, config = read_model_config(directory)
        tokenizer = load_saved_tokenizer(directory)
        model = build_checked(lambda: cls(config, PartLoader(architectures=record["architectures"]), tokenizer),
                              directory, record)
        load_saved_weights(model, directory)
        return model.eval()



def _rename_old_weights(state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: weights saved before modalities, `encoder.*` and
    `connector.*`, are the image modality's (`encoders.image.*`, `connectors.image.*`)."""
    for name in [name for name in state_dict if name.startswith((f"{prefix}encoder.", f"{prefix}connector."))]:
        part, rest = name[len(prefix):].split(".", 1)
        state_dict[f"{prefix}{part}s.image.{rest}"] = state_dict.pop(name)
