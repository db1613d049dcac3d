"""`easy-vqa-spoken`: easy-VQA's questions asked aloud. Each sample is an easy-VQA image and
one of its questions spoken by espeak-ng (data/speech.py), the answer as text:

    user: <image> <audio>      (the clip says "what color is the shape?")
    assistant: blue

Each question is said by one of the split's voices in turn (`speech.VOICES`): the 107
distinct questions of the training split in its 8 voices make 856 clips, each heard with
many images; the test split's 2 voices are never heard in training. Clips are cached and
written atomically (speech.speak). The eval task `easy-vqa-spoken` scores a model on them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from polymodal.data.easy_vqa import (
    EasyVQASplit,
    easy_vqa_folder,
    flipped_yes_no,
    question_type,
    questions_by_image,
    read_questions,
)
from polymodal.data.sample import Item, Sample
from polymodal.data.speech import VOICES, speak, speech_cache
from polymodal.registry import register_dataset_format

SPOKEN_PROMPT = "<image>\n<audio>"  # the question is the clip: no text but the placeholders


@dataclass(frozen=True)
class SpokenQuestion:
    id: str  # "{image stem}:{question number}"
    image: str
    clip: str  # the WAV file saying the question
    voice: str  # "{espeak voice}-{speed}"
    question: str  # what the clip says
    answer: str


def question_clip(question: str, voice: str, speed: int) -> Path:
    """The cached WAV file of `question` in `voice` at `speed` words per minute (made once)."""
    name = re.sub(r"[^a-z0-9]+", "_", question.lower()).strip("_")
    return speak(question, voice, speed, speech_cache() / f"{voice}-{speed}" / f"{name}.wav")


def spoken_questions(split: str = "train", folder: str | Path | None = None,
                     flip_yes_no: bool = False) -> list[SpokenQuestion]:
    """Every question of the split, in file order, each said by the split's next voice.

    `flip_yes_no`: instead, the yes/no questions re-asked about the attribute each image
    has, answer flipped (`easy_vqa.flipped_yes_no`): easy-VQA asks mostly about absent
    colours, so "no unless the question says not" answers 83% of its yes/no questions
    without looking; mixed in, these leave that prior nothing to win.
    """
    voices = VOICES["test" if split == "test" else "train"]
    location = easy_vqa_folder(split, folder)
    triples = read_questions(location)
    if flip_yes_no:
        triples = [(question, answer, image) for image, pairs in questions_by_image(location).items()
                   for question, answer in flipped_yes_no(pairs)]
    found = []
    for number, (question, answer, image) in enumerate(triples):
        voice, speed = voices[number % len(voices)]
        clip = question_clip(question, voice, speed)
        found.append(SpokenQuestion(f"{Path(image).stem}:{number}", image, str(clip), f"{voice}-{speed}",
                                    question, answer))
    return found


@dataclass
class EasyVQASpokenOptions(EasyVQASplit):
    """easy-VQA's questions spoken in the split's voices; what the `easy-vqa-spoken` task asks."""

    format: str = "easy-vqa-spoken"
    # Instead of answering: each distinct clip once, to be written down ("<audio>" -> "what
    # color is the shape?"): the alignment stage of speech LLMs (an ASR task that teaches the
    # audio connector the LLM's words), as captions align the image connector.
    transcribe: bool = False
    flip_yes_no: bool = False  # the yes/no questions flipped to the attribute the image has (spoken_questions)

    def question_items(self) -> list[Item]:
        return [Item(spoken.id, SPOKEN_PROMPT, [spoken.image], [spoken.answer],
                     {"type": question_type(spoken.answer), "voice": spoken.voice, "question": spoken.question},
                     media={"audio": [spoken.clip]})
                for spoken in spoken_questions(self.split, self.path)]


@register_dataset_format("easy-vqa-spoken", config=EasyVQASpokenOptions)
def read_easy_vqa_spoken(options: EasyVQASpokenOptions) -> list[Sample]:
    """easy-VQA images with their questions spoken (espeak-ng), one question per sample."""
    questions = spoken_questions(options.split, options.path, options.flip_yes_no)
    if options.transcribe:
        return transcripts(questions)
    return [Sample(spoken.id, [{"role": "user", "content": SPOKEN_PROMPT},
                               {"role": "assistant", "content": spoken.answer}],
                   [spoken.image], media={"audio": [spoken.clip]})
            for spoken in questions]


def transcripts(questions: list[SpokenQuestion]) -> list[Sample]:
    """Each distinct clip once, its words as the answer (no image)."""
    clips = {spoken.clip: spoken for spoken in questions}
    return [Sample(f"{spoken.voice}:{spoken.question}", [{"role": "user", "content": "<audio>"},
                                                         {"role": "assistant", "content": spoken.question}],
                   [], media={"audio": [clip]})
            for clip, spoken in sorted(clips.items())]
