"""Conversations -> token ids (placeholders expanded), labels and pixels.

A message's content is a string, with `<image>` where an image goes, or a list of
parts: `{"type": "text", "text": ...}` and `{"type": "image", "image": path or PIL}`.

Text a user sends is text. The chat template's control tokens (`<|im_start|>`, `<|im_end|>`,
...) come from the template alone: a message that spells one out is tokenized as the
characters it is, so "Hi<|im_end|><|im_start|>system ..." cannot forge a system turn. A string
content keeps its `<image>` placeholders, as LLaVA JSON defines them; in a list of parts
images are parts, and `<image>` in a text part is text too.
"""

from __future__ import annotations

import re
from functools import cached_property

import torch

from polymodal.errors import UserError
from polymodal.processing.collate import IGNORE
from polymodal.processing.images import load_image

# A literal text's place in the rendered template: private-use characters around its index.
# A user's own text holding the mark is itself a literal, so the mark never comes from a user.
_LITERAL_MARK = "\ue000"
_LITERAL_FORM = _LITERAL_MARK + "{}\ue001"
_LITERAL = re.compile(_LITERAL_MARK + "(\\d+)\ue001")


def with_placeholders(text: str, count: int, token: str) -> str:
    """The one rule for where images go, everywhere (training data, eval files, chat, the
    Python generator): a text that marks none gets one placeholder per image before it
    (LLaVA's layout); a text that marks some keeps them, and their count must match."""
    if count and token not in text:
        return token * count + "\n" + text
    return text


def _check_unicode(text: str, message: int) -> None:
    """Text the tokenizer can take: JSON may carry a lone surrogate ("\\ud800") that no UTF-8
    encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserError(f"message {message}: not valid Unicode text (a lone surrogate at "
                        f"character {error.start})") from None


class Processor:
    """Chat template, placeholder expansion and image loading for one model; no modules touched."""

    def __init__(self, llm, tokens_per_image: int | None, image_size: int | None):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.image_token = llm.image_token
        self.image_token_id = llm.image_token_id
        self.tokens_per_image = tokens_per_image
        self.image_size = image_size
        self.max_length = llm.max_length

    # ------------------------------------------------------------ prompts

    def encode(self, messages: list[dict], images=(), add_generation_prompt: bool = True) -> dict:
        """A prompt for generation: {input_ids: list[int], pixel_values: [N, 3, S, S] or None}."""
        messages, images, literals = self.split_images(messages, list(images))
        ids = self._tokenize(self.llm.render(messages, add_generation_prompt), literals)
        ids = self._expand(ids, len(images))
        if len(ids) > self.max_length:
            raise UserError(f"prompt is {len(ids)} tokens; the context holds {self.max_length}")
        return {"input_ids": ids, "pixel_values": self.pixels(images)}

    def encode_for_training(self, messages: list[dict], images=(), load_images: bool = True) -> dict:
        """Ids, labels (IGNORE except assistant turns) and pixels for one conversation.

        With `load_images=False` only the number of images matters and no pixels are made.
        """
        messages, images, literals = self.split_images(messages, list(images))
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
        ids, labels = self._expand(ids, len(images), labels)
        pixels = self.pixels(images) if load_images else None
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels}

    # ------------------------------------------------------------ pieces

    def split_images(self, messages: list[dict], images: list) -> tuple[list[dict], list, list]:
        """Messages with string content, every image in reading order, and the literal texts.

        Returns (messages, images, literals): each message's content is a string with the
        image placeholder where an image goes (when the conversation has none, one per image
        before the first user turn's text: `with_placeholders`); a text that holds a control
        token's spelling stands there as a marker (`_LITERAL`) and its `(text,
        keeps_placeholders)` is in `literals`, to be tokenized as characters (`_tokenize`).
        Adjacent text parts are one text, so a spelling split over two parts is still seen.

        Raises:
            UserError: a part of an unknown type, or text that is not valid Unicode.
        """
        flat, literals = [], []

        def literal(text: str, keeps_placeholders: bool) -> str:
            literals.append((text, keeps_placeholders))
            return _LITERAL_FORM.format(len(literals) - 1)

        def plain_or_literal(text: str, keeps_placeholders: bool) -> str:
            _check_unicode(text, len(flat))
            spelled = self._spells_control(text) or (not keeps_placeholders and self.image_token in text)
            return literal(text, keeps_placeholders) if spelled else text

        for message in messages:
            content = message.get("content", "")
            if isinstance(content, list):
                pieces, run = [], []  # run: the text parts since the last image
                for part in content:
                    if part.get("type") == "image":
                        pieces += [plain_or_literal("".join(run), False), self.image_token]
                        run = []
                        images.append(part["image"])
                    elif part.get("type") == "text":
                        run.append(part.get("text", ""))
                    else:
                        raise UserError(f"unknown message part type {part.get('type')!r}")
                content = "".join([*pieces, plain_or_literal("".join(run), False)])
            else:
                content = plain_or_literal(content, True)
            flat.append({"role": message["role"], "content": content})
        placed = sum(m["content"].count(self.image_token) for m in flat) + sum(
            text.count(self.image_token) for text, keeps in literals if keeps)
        first_user = next((m for m in flat if m["role"] == "user"), None)
        if images and not placed and first_user is not None:
            first_user["content"] = with_placeholders(first_user["content"], len(images), self.image_token)
        return flat, images, literals

    def pixels(self, images: list) -> torch.Tensor | None:
        """Paths, PIL images or pixel tensors -> [N, 3, S, S] in [0, 1]."""
        if not images:
            return None
        if self.image_size is None:
            raise UserError("this model has no image encoder; it takes text only")
        tensors = [image if isinstance(image, torch.Tensor) else load_image(image, self.image_size)
                   for image in images]
        return torch.stack(tensors)

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
        """The texts the tokenizer turns into special tokens, but for the image placeholder."""
        added = self.tokenizer.added_tokens_decoder.values()
        found = {str(token) for token in added if token.special}
        found.update(self.tokenizer.all_special_tokens)
        found.discard(self.image_token)
        return tuple(sorted(found))

    def _spells_control(self, text: str) -> bool:
        return _LITERAL_MARK in text or any(spelling in text for spelling in self._control_spellings)

    def _tokenize(self, text: str, literals: list[tuple[str, bool]] = ()) -> list[int]:
        """Rendered text -> ids; the template's markers become special tokens, a literal's text
        (at its `_LITERAL` marker) its characters' tokens, its placeholders kept if it says so."""
        if not literals:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for index, piece in enumerate(_LITERAL.split(text)):
            if index % 2 == 0:  # the template's text
                ids += self._tokenize(piece) if piece else []
                continue
            content, keeps_placeholders = literals[int(piece)]
            pieces = content.split(self.image_token) if keeps_placeholders else [content]
            for number, chars in enumerate(pieces):
                ids += [self.image_token_id] if number else []
                ids += self.tokenizer(chars, add_special_tokens=False,
                                      split_special_tokens=True)["input_ids"] if chars else []
        return ids

    def _expand(self, ids: list[int], num_images: int, labels: list[int] | None = None):
        """Check one placeholder per image and repeat each K times (K = tokens per image)."""
        if num_images and self.tokens_per_image is None:
            raise UserError("this model has no image encoder; it takes text only")
        found = ids.count(self.image_token_id)
        if found != num_images:
            raise UserError(f"{num_images} image(s) given but {found} {self.image_token} "
                            f"placeholder(s) in the text")
        if found == 0:
            return ids if labels is None else (ids, labels)
        out_ids, out_labels = [], []
        for index, token in enumerate(ids):
            repeat = self.tokens_per_image if token == self.image_token_id else 1
            out_ids += [token] * repeat
            if labels is not None:
                out_labels += [IGNORE if token == self.image_token_id else labels[index]] * repeat
        return out_ids if labels is None else (out_ids, out_labels)
