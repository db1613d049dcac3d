"""`easy-vqa-draw`: one drawing sample per easy-VQA image, captions as easy-vqa-captions
derives them, a deterministic unconditional share; the 24 prompts of text-to-image."""

import pytest

from conftest import needs_package
from polymodal.data.easy_vqa import COLORS, SHAPES, read_easy_vqa_captions
from polymodal.data.easy_vqa_draw import EasyVQADrawOptions, draw_prompts, is_unconditional
from polymodal.errors import ConfigError
from polymodal.train.mixture import read_dataset


@needs_package("easy_vqa")
def test_one_drawing_per_image_with_its_caption():
    samples = read_dataset(EasyVQADrawOptions(split="test", unconditional=0.0))
    assert len(samples) == 1000  # every image of the split
    captions = {s.id: s.messages[1]["content"] for s in read_easy_vqa_captions("test")}
    for sample in samples:
        assert sample.images == [] and len(sample.draws) == 1 and sample.draws[0].endswith(f"/{sample.id}.png")
        user, assistant = sample.messages
        assert user["role"] == "user" and assistant == {"role": "assistant", "content": ""}
        # easy-vqa-captions' caption ("a red circle") asked for; no caption known: the empty prompt
        assert user["content"] == (f"Draw {captions[sample.id]}." if sample.id in captions else "")
    asked = [s.messages[0]["content"] for s in samples]
    assert "Draw a red triangle." in asked and sum(text == "" for text in asked) == 1000 - len(captions)


@needs_package("easy_vqa")
def test_unconditional_share_is_deterministic_and_near_the_option():
    plain = read_dataset(EasyVQADrawOptions(split="train", unconditional=0.0))
    dropped = read_dataset(EasyVQADrawOptions(split="train", unconditional=0.1))
    again = read_dataset(EasyVQADrawOptions(split="train", unconditional=0.1))
    newly_empty = [b.id for a, b in zip(plain, dropped)
                   if a.messages[0]["content"] and not b.messages[0]["content"]]
    conditional = sum(bool(s.messages[0]["content"]) for s in plain)
    assert 0.085 < len(newly_empty) / conditional < 0.115  # 10% of 3,961 captioned images, by hash
    assert [s.messages for s in dropped] == [s.messages for s in again]
    assert all(is_unconditional(identifier, 0.1) for identifier in newly_empty)
    everything = read_dataset(EasyVQADrawOptions(split="test", unconditional=1.0, limit=20))
    assert all(s.messages[0]["content"] == "" and s.draws for s in everything)


def test_unconditional_option_is_checked():
    with pytest.raises(ConfigError, match=r"unconditional: a share from 0 to 1, got 1\.5"):
        EasyVQADrawOptions(unconditional=1.5)


def test_the_24_prompts_and_their_labels():
    prompts = draw_prompts()
    assert len(prompts) == 24 and len({p.text for p in prompts}) == 24
    assert {(p.shape, p.color) for p in prompts} == {(s, c) for s in SHAPES for c in COLORS}
    assert prompts[0].text == "Draw a red circle." and ("Draw a teal triangle.", "triangle", "teal") in prompts
