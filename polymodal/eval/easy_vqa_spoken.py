"""`easy-vqa-spoken`: the easy-VQA questions asked aloud (data/easy_vqa_spoken.py: the
test split's voices, never heard in training), scored as `easy-vqa` scores the written
ones: exact match after normalising, by question type."""

from __future__ import annotations

from polymodal.data.easy_vqa_spoken import EasyVQASpokenOptions
from polymodal.eval.easy_vqa import EasyVQA
from polymodal.eval.tasks import Item, TaskOptions, check_data_folder, register_task, seeded_sample


@register_task("easy-vqa-spoken")
class EasyVQASpoken(EasyVQA):
    """easy-VQA questions spoken (an image and a clip): exact match, by question type."""

    def items(self, options: TaskOptions) -> list[Item]:
        check_data_folder(options, "easy-vqa-spoken")
        spoken = EasyVQASpokenOptions.for_evaluation(options.split, options.data)
        return seeded_sample(spoken.question_items(), options.limit, options.seed)
