"""polymodal/processing/processor.py: where media placeholders go."""

from polymodal.data.easy_vqa_spoken import SPOKEN_PROMPT
from polymodal.processing.processor import with_placeholders


def test_unmarked_media_go_before_the_text_with_a_newline_and_a_spoken_question_stands_alone():
    assert with_placeholders("what is it?", 2, "<image>") == "<image><image>\nwhat is it?"
    assert with_placeholders("", 1, "<image>") == "<image>\n"  # analyze with no question, chat --image X ""
    assert with_placeholders("a <image> b", 1, "<image>") == "a <image> b"
    # chat --image X --audio Y "": the clip is the question, as easy-vqa-spoken trains it
    spoken = with_placeholders("", 1, "<audio>", alone=True)
    assert with_placeholders(spoken, 1, "<image>") == SPOKEN_PROMPT
