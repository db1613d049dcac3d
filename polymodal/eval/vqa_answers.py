"""VQAv2 answer normalisation and accuracy, as the official evaluation script does them
(GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py), so that our numbers
compare with published ones: punctuation, number words, articles, contractions, and the
accuracy averaged over the ten leave-one-out subsets of the human answers."""

from __future__ import annotations

import re

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!"]
# Contractions written without their apostrophe, mapped to the spelling the references use.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# The official script means "a period not between digits", but its lookbehind is misspelt
# as a lookahead, so it drops every period not followed by a digit; we keep its behaviour.
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or DIGIT_COMMA_DIGIT.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa(answer: str) -> str:
    """"Two dogs." -> "2 dogs"; "The cat" -> "cat"; "dont" -> "don't"."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(answer))


def soft_accuracy(prediction: str, references: list[str]) -> float:
    """VQA accuracy in [0, 1], as the official script computes it: for each of the N
    references, drop it and score min(1, matches among the other N - 1 / 3); the mean of
    the N scores. "2" against 2 x "2" and 8 x "3" scores (2 * 1/3 + 8 * 2/3) / 10 = 0.6.

    Both sides are normalised with `normalize_vqa`. The official script normalises the
    prediction fully but the references only for punctuation (VQAv2's stored answers are
    already lower case, with digits and without articles), so the two agree on VQAv2 and
    ours also reads raw references ("Two") in user files. With a single reference there
    is no other answer to count, so it scores exact match (1.0 or 0.0) instead of the
    official formula's constant 0. Raises ValueError when there is no reference.
    """
    if not references:
        raise ValueError("soft_accuracy needs at least one reference answer")
    answer = normalize_vqa(prediction)
    same = [normalize_vqa(reference) == answer for reference in references]
    if len(same) == 1:
        return float(same[0])
    matches = sum(same)
    return sum(min(1.0, (matches - dropped) / 3.0) for dropped in same) / len(same)
