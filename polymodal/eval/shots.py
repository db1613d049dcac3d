"""Few-shot prompting (`polymodal eval --shots K`): K solved examples, each with its media, as
earlier user/assistant turns of the conversation, then the question (Flamingo, Alayrac et al.
2022, whose headline result is accuracy against the number of shots; IDEFICS evaluates so too).

Where the examples come from: the same task's items, all of them (not only the `--limit`
sample), other than the question itself and every other question about the same images (one
about the question's own image could give its answer away: easy-VQA asks ~10 per image). They
are drawn at random, seeded per question (`seed` and the question's id), so a question gets the
same examples whatever else is sampled with it. An example's answer is its most common reference
(VQAv2's majority answer; the only one for tasks with one). A task may draw its own
(`Task.with_shots`: the fast-binding task names shapes per question).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from polymodal.data.sample import Item
from polymodal.errors import UserError
from polymodal.processing.processor import with_placeholders


@dataclass
class FewShotItem(Item):
    """A question after its solved examples.

    `images` and `media` hold the examples' items, then the question's own, in reading order
    (what answering loads, caches and groups by); `question`, `references` and `info` are the
    question's; `placeholders`: modality -> its placeholder's spelling (`Processor.placeholders`),
    to mark each turn's media where it stands.
    """

    examples: list[Item] = field(default_factory=list)
    query: Item | None = None
    placeholders: dict[str, str] = field(default_factory=dict)

    def prompt(self, placeholder: str = "<image>") -> dict:
        """Each example as a user turn (its media, its question) and an assistant turn (its
        answer), then the question's user turn; each turn laid out as a one-turn prompt is."""
        messages, images, media = [], [], {}
        for number, item in enumerate([*self.examples, self.query]):
            shown = item.prompt(placeholder)
            messages.append({"role": "user", "content": self._marked(shown["messages"][0]["content"], shown["media"])})
            if number < len(self.examples):
                messages.append({"role": "assistant", "content": example_answer(item)})
            images += shown["images"]
            for modality, items in shown["media"].items():
                media.setdefault(modality, []).extend(items)
        return {"messages": messages, "images": images, "media": media}

    def _marked(self, content: str, media: dict[str, list]) -> str:
        """`content` with a placeholder for each of its other media, as `Processor` places them
        in a one-turn prompt (before the text; a clip with no text is the question itself):
        with several turns the processor cannot tell which turn an unmarked item belongs to."""
        for modality in reversed([m for m in self.placeholders if m != "image" and media.get(m)]):
            content = with_placeholders(content, len(media[modality]), self.placeholders[modality], alone=True)
        return content


def example_answer(item: Item) -> str:
    """The answer an example shows: its most common reference (the first among equals)."""
    return Counter(item.references).most_common(1)[0][0]


def with_examples(query: Item, examples: list[Item], placeholders: dict[str, str]) -> FewShotItem:
    """`query` after `examples` (each answered by `example_answer`), as one item to answer."""
    media: dict[str, list] = {}
    for item in [*examples, query]:
        for modality, items in item.media.items():
            media.setdefault(modality, []).extend(items)
    images = [image for item in [*examples, query] for image in item.images]
    return FewShotItem(query.id, query.question, images, query.references, query.info, media,
                       examples=list(examples), query=query, placeholders=dict(placeholders))


def shown_media(item: Item) -> frozenset:
    """The media an item shows, by value for paths and by identity for objects."""
    return frozenset(m if isinstance(m, str) else id(m)
                     for m in [*item.images, *(x for items in item.media.values() for x in items)])


def few_shot_items(items: list[Item], pool: list[Item], shots: int, seed: int = 0,
                   placeholders: dict[str, str] | None = None) -> list[FewShotItem]:
    """Each item after `shots` examples drawn from `pool` (the module's docstring says which).

    Raises UserError when a question has fewer than `shots` other questions to draw from.
    """
    keys = [shown_media(example) for example in pool]
    placeholders = placeholders or {"image": "<image>"}
    found = []
    for item in items:
        own = shown_media(item)
        candidates = [example for example, key in zip(pool, keys)
                      if example.id != item.id and not (key & own)]
        if len(candidates) < shots:
            raise UserError(f"--shots {shots}: question {item.id} has only {len(candidates)} other "
                            f"questions (about other images) to draw examples from")
        examples = random.Random(f"{seed}:{item.id}").sample(candidates, shots)
        found.append(with_examples(item, examples, placeholders))
    return found
