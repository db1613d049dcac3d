"""Conversations -> token ids (placeholders expanded), labels and each medium's encoder inputs.

A message's content is a string, with `<image>` (`<audio>`, ...) where a medium goes, or a
list of parts: `{"type": "text", "text": ...}`, `{"type": "image", "image": path or PIL}`,
`{"type": "audio", "audio": path}`: a part's type is its modality.

Text a user sends is text. The chat template's control tokens (`<|im_start|>`, `<|im_end|>`,
...) come from the template alone: a message that spells one out is tokenized as the
characters it is, so "Hi<|im_end|><|im_start|>system ..." cannot forge a system turn. A string
content keeps its `<image>` placeholders, as LLaVA JSON defines them; in a list of parts
media are parts, and `<image>` in a text part is text too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from polymodal.errors import UserError, check_context_length
from polymodal.processing.collate import IGNORE

# A literal text's place in the rendered template: private-use characters around its index.
# A user's own text holding the mark is itself a literal, so the mark never comes from a user.
_LITERAL_MARK = "\ue000"
_LITERAL_FORM = _LITERAL_MARK + "{}\ue001"
_LITERAL = re.compile(_LITERAL_MARK + "(\\d+)\ue001")


def with_placeholders(text: str, count: int, token: str, alone: bool = False) -> str:
    """The one rule for where media go, everywhere (training data, eval files, chat, the
    Python generator): a text that marks none gets one placeholder per item before it and a
    newline (LLaVA's layout); a text that marks some keeps them, and their count must match.

    `alone`: an empty text becomes the placeholders without the newline; a spoken question
    is its clip alone (easy-vqa-spoken's "<image>\n<audio>", data/easy_vqa_spoken.py)."""
    if count and token not in text:
        return token * count + ("" if alone and not text else "\n" + text)
    return text


def _check_unicode(text: str, message: int) -> None:
    """Text the tokenizer can take: JSON may carry a lone surrogate ("\\ud800") that no UTF-8
    encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserError(f"message {message}: not valid Unicode text (a lone surrogate at "
                        f"character {error.start})") from None


@dataclass(frozen=True)
class MediaKind:
    """How one modality's media reach the text: its placeholder, how many LLM tokens an
    item becomes, and how an item (a path, a PIL image, a tensor) becomes encoder input."""

    modality: str  # "image", "audio", ...
    placeholder: str  # what users write where an item goes: "<image>"
    token_id: int  # the placeholder's token id
    tokens: int  # K: the connector's tokens per item; the placeholder is repeated K times
    load: Callable[[Any], torch.Tensor]  # one item -> its encoder input ([3, S, S], [80, F])


class Processor:
    """Chat template, placeholder expansion and media loading for one model; no modules touched.

    `media` holds the model's modalities (none for a text-only model). Media of each
    modality fill that modality's placeholders in reading order.
    """

    def __init__(self, llm, media: dict[str, MediaKind] | None = None):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.image_token = llm.image_token
        self.image_token_id = llm.image_token_id
        self.media = dict(media or {})
        self.placeholders = {"image": self.image_token} | {m: kind.placeholder for m, kind in self.media.items()}
        self.placeholder_ids = {"image": self.image_token_id} | {m: kind.token_id for m, kind in self.media.items()}
        self.tokens_per_image = self.media["image"].tokens if "image" in self.media else None
        self.max_length = llm.max_length

    # ------------------------------------------------------------ prompts

    def encode(self, messages: list[dict], images=(), add_generation_prompt: bool = True,
               media: dict[str, list] | None = None) -> dict:
        """A prompt for generation: {input_ids: list[int], media: {modality: [N, ...]},
        pixel_values: the images' [N, 3, S, S] or None}.

        `images` and `media` (modality -> items) are the media not given as message parts.
        """
        messages, found, literals = self.split_media(messages, self._given(images, media))
        ids = self._tokenize(self.llm.render(messages, add_generation_prompt), literals)
        ids = self._expand(ids, {modality: len(items) for modality, items in found.items()})
        check_context_length(len(ids), 0, self.max_length, asked_as=None)  # before any answer is asked for
        inputs = self.media_inputs(found)
        return {"input_ids": ids, "media": inputs, "pixel_values": inputs.get("image")}

    def encode_for_training(self, messages: list[dict], images=(), load_images: bool = True,
                            media: dict[str, list] | None = None) -> dict:
        """Ids, labels (IGNORE except assistant turns) and media inputs for one conversation.

        With `load_images=False` only the number of items matters and no media are loaded.
        """
        messages, found, literals = self.split_media(messages, self._given(images, media))
        ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.llm.render(messages[:turn], add_generation_prompt=True)
            full = self.llm.render(messages[: turn + 1], add_generation_prompt=False)
            if not (prompt.startswith(rendered) and full.startswith(prompt)):
                raise UserError("the chat template does not render turns as prefixes of each "
                                "other; cannot tell assistant tokens apart")
            context = self._tokenize(prompt[len(rendered):], literals)
            answer = self._tokenize(full[len(prompt):], literals)
            if turn == len(messages) - 1:
                answer = self._through_end_of_turn(answer)
            ids += context + answer
            labels += [IGNORE] * len(context) + answer
            rendered = full
        tail = self._tokenize(self.llm.render(messages, False)[len(rendered):], literals)
        ids, labels = ids + tail, labels + [IGNORE] * len(tail)
        ids, labels = self._expand(ids, {modality: len(items) for modality, items in found.items()}, labels)
        inputs = self.media_inputs(found) if load_images else {}
        return {"input_ids": ids, "labels": labels, "media": inputs, "pixel_values": inputs.get("image")}

    # ------------------------------------------------------------ pieces

    @staticmethod
    def _given(images, media: dict[str, list] | None) -> dict[str, list]:
        given = {modality: list(items) for modality, items in (media or {}).items()}
        if images:
            given["image"] = list(images) + given.get("image", [])
        return given

    def split_media(self, messages: list[dict], media: dict[str, list]
                    ) -> tuple[list[dict], dict[str, list], list]:
        """Messages with string content, each modality's items in reading order, and the literal texts.

        `media`: modality -> items given beside the messages (they come first, then the
        messages' own parts). Returns (messages, media, literals): each message's content is
        a string with a modality's placeholder where its item goes (when the conversation
        has none of a modality, one per item before the first user turn's text:
        `with_placeholders`); a text that holds a control token's or a placeholder's
        spelling stands there as a marker (`_LITERAL`) and its `(text, keeps_placeholders)`
        is in `literals`, to be tokenized as characters (`_tokenize`). Adjacent text parts
        are one text, so a spelling split over two parts is still seen.

        Raises:
            UserError: a part of an unknown type, or text that is not valid Unicode.
        """
        flat, literals = [], []
        found = {modality: list(items) for modality, items in media.items()}

        def literal(text: str, keeps_placeholders: bool) -> str:
            literals.append((text, keeps_placeholders))
            return _LITERAL_FORM.format(len(literals) - 1)

        def plain_or_literal(text: str, keeps_placeholders: bool) -> str:
            _check_unicode(text, len(flat))
            spelled = self._spells_control(text) or (
                not keeps_placeholders and any(token in text for token in self.placeholders.values()))
            return literal(text, keeps_placeholders) if spelled else text

        for message in messages:
            content = message.get("content", "")
            if isinstance(content, list):
                pieces, run = [], []  # run: the text parts since the last medium
                for part in content:
                    kind = part.get("type")
                    if kind == "text":
                        run.append(part.get("text", ""))
                    elif kind in self.placeholders:
                        pieces += [plain_or_literal("".join(run), False), self.placeholders[kind]]
                        run = []
                        found.setdefault(kind, []).append(part.get(kind))
                    else:
                        raise UserError(f"unknown message part type {kind!r}")
                content = "".join([*pieces, plain_or_literal("".join(run), False)])
            else:
                content = plain_or_literal(content, True)
            flat.append({"role": message["role"], "content": content})
        self._place_unmarked(flat, literals, found)
        return flat, {modality: items for modality, items in found.items() if items}, literals

    def _place_unmarked(self, flat: list[dict], literals: list, found: dict[str, list]) -> None:
        """A modality with items but no placeholder anywhere: one per item before the first
        user turn's text (LLaVA's layout; images first, then the other modalities)."""
        first_user = next((m for m in flat if m["role"] == "user"), None)
        if first_user is None:
            return
        for modality in reversed([m for m in self.placeholders if found.get(m)]):
            token = self.placeholders[modality]
            placed = sum(m["content"].count(token) for m in flat) + sum(
                text.count(token) for text, keeps in literals if keeps)
            if not placed:
                # a clip with no text is the question itself (easy-vqa-spoken); an image is not
                first_user["content"] = with_placeholders(first_user["content"], len(found[modality]), token,
                                                          alone=modality != "image")

    def pixels(self, images: list) -> torch.Tensor | None:
        """Paths, PIL images or pixel tensors -> [N, 3, S, S] in [0, 1]; None for no images."""
        return self.media_inputs({"image": images}).get("image")

    def media_inputs(self, media: dict[str, list]) -> dict[str, torch.Tensor]:
        """Modality -> items (paths, PIL images or ready tensors) -> modality -> the encoder
        inputs stacked [N, ...]; modalities without items are left out.

        Raises:
            UserError: a modality this model has no encoder for, or an unreadable item.
        """
        inputs = {}
        for modality, items in media.items():
            if not items:
                continue
            if modality not in self.media:
                raise UserError(self._lacks(modality))
            load = self.media[modality].load
            inputs[modality] = torch.stack([item if isinstance(item, torch.Tensor) else load(item)
                                            for item in items])
        return inputs

    def _lacks(self, modality: str) -> str:
        reads = ", ".join(self.media) if self.media else "text only"
        return f"this model has no {modality} encoder; it takes {reads}"

    @cached_property
    def _stop_ids(self) -> set[int]:
        return self.llm.stop_token_ids()  # fixed once the LLM is built; asked once per sample

    def _through_end_of_turn(self, answer: list[int]) -> list[int]:
        """The conversation's last answer ends at its end-of-turn token: what a template puts
        after it (ChatML's "\n") only separates turns, is never generated, and would cost a
        token per sample: 1 of ~21 in an easy-VQA question."""
        ends = [i for i, token in enumerate(answer) if token in self._stop_ids]
        return answer[: ends[-1] + 1] if ends else answer

    @cached_property
    def _control_spellings(self) -> tuple[str, ...]:
        """The texts the tokenizer turns into special tokens, but for the media placeholders."""
        added = self.tokenizer.added_tokens_decoder.values()
        found = {str(token) for token in added if token.special}
        found.update(self.tokenizer.all_special_tokens)
        found.difference_update(self.placeholders.values())
        return tuple(sorted(found))

    def _spells_control(self, text: str) -> bool:
        return _LITERAL_MARK in text or any(spelling in text for spelling in self._control_spellings)

    @cached_property
    def _placeholder_pattern(self) -> re.Pattern:
        return re.compile("(" + "|".join(re.escape(token) for token in self.placeholders.values()) + ")")

    def _tokenize(self, text: str, literals: list[tuple[str, bool]] = ()) -> list[int]:
        """Rendered text -> ids; the template's markers become special tokens, a literal's text
        (at its `_LITERAL` marker) its characters' tokens, its placeholders kept if it says so."""
        if not literals:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        token_ids = {token: self.placeholder_ids[m] for m, token in self.placeholders.items()}
        for index, piece in enumerate(_LITERAL.split(text)):
            if index % 2 == 0:  # the template's text
                ids += self._tokenize(piece) if piece else []
                continue
            content, keeps_placeholders = literals[int(piece)]
            pieces = self._placeholder_pattern.split(content) if keeps_placeholders else [content]
            for number, chars in enumerate(pieces):
                if number % 2:  # a placeholder the literal keeps
                    ids.append(token_ids[chars])
                elif chars:
                    ids += self.tokenizer(chars, add_special_tokens=False,
                                          split_special_tokens=True)["input_ids"]
        return ids

    def _expand(self, ids: list[int], counts: dict[str, int] | int, labels: list[int] | None = None):
        """Check one placeholder per item of each modality (`counts`: modality -> items; an
        int counts images) and repeat each K times (K = the modality's tokens per item)."""
        counts = {"image": counts} if isinstance(counts, int) else counts
        repeats = {}
        for modality, token_id in self.placeholder_ids.items():
            given = counts.get(modality, 0)
            if given and modality not in self.media:
                raise UserError(self._lacks(modality))
            found = ids.count(token_id)
            if found != given:
                name = "image(s)" if modality == "image" else f"{modality} item(s)"
                raise UserError(f"{given} {name} given but {found} {self.placeholders[modality]} "
                                f"placeholder(s) in the text")
            if found:
                repeats[token_id] = self.media[modality].tokens
        unknown = [m for m in counts if counts[m] and m not in self.placeholder_ids]
        if unknown:
            raise UserError(self._lacks(unknown[0]))
        if not repeats:
            return ids if labels is None else (ids, labels)
        out_ids, out_labels = [], []
        for index, token in enumerate(ids):
            repeat = repeats.get(token, 1)
            out_ids += [token] * repeat
            if labels is not None:
                out_labels += [IGNORE if token in repeats else labels[index]] * repeat
        return out_ids if labels is None else (out_ids, out_labels)
