"""VQA accuracy by the rules of the VQAv2 official evaluation (the VQA API's vqaEval.py,
GT-Vision-Lab/VQA): answers are normalised (whitespace, punctuation, number words, articles,
contractions), and a prediction that k of the other human answers give scores min(k / 3, 1),
averaged over leaving out each human in turn. With 10 answers, 1 match scores 0.3, 2 score 0.6,
3 score 0.9 and 4 or more 1.0.

One difference: the official script expects annotations already in normal form and only strips
punctuation from them (and only when the humans disagree); here the human answers go through the
same normalisation as the prediction, which leaves answers already in normal form unchanged.

    vqa_accuracy("Two", ["2", "two", ...])                                  -> 0.0 .. 1.0
    vqa_score({qid: prediction}, {qid: {"answers": [...], "answer_type": "number"}})
        -> {"accuracy": 0.0 .. 1.0, "questions": n, "by_answer_type": {type: accuracy}}
"""
from __future__ import annotations

import math
import re

# The official contractions map, entry for entry (a few keys can never match: capitalised ones,
# since answers are lower-cased first, and "somebody'd" maps to "somebodyd"; both kept as is).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't",
    "couldve": "could've", "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

# Whole words only, after lower-casing ("none" counts as zero, as in the official map).
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The characters the official rule removes or turns into spaces; the apostrophe is not one of them
# (contractions keep it) and neither is the period, which has its own rule.
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit ("yes." -> "yes", "2.5" kept). The official pattern also writes
# a lookbehind for a preceding digit, but spelt "(?!<=\d)" it is a lookahead that always holds.
_PERIOD = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (32) where re.sub takes its count: at most 32 periods go.
_PERIOD_LIMIT = 32


def _strip_punctuation(text: str) -> str:
    # Each character's fate is decided on the whole input: it is deleted outright when it touches a
    # space anywhere in the text, or when the text holds a comma between two digits ("1,000");
    # otherwise each occurrence becomes a space ("black-and-white" -> "black and white").
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for char in PUNCTUATION:
        if char not in out:
            continue
        glued = has_digit_comma or (char + " ") in text or (" " + char) in text
        out = out.replace(char, "" if glued else " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def _words_in_normal_form(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """An answer in the official evaluation's normal form: newlines and tabs to spaces, stripped,
    punctuation removed, lower-cased, number words to digits, articles dropped, contractions
    restored ("Two dogs." -> "2 dogs", "the 1,000" -> "1000", "dont" -> "don't")."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _words_in_normal_form(_strip_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQAv2 accuracy of one prediction against the human answers (normally 10): for each human
    left out, min(#other humans who gave the prediction / 3, 1), averaged over the humans."""
    if isinstance(answers, str):
        raise TypeError(f"vqa_accuracy takes a list of human answers, not one string ({answers!r})")
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer; got an empty list")
    predicted = normalize_answer(prediction)
    agrees = [normalize_answer(answer) == predicted for answer in answers]
    matches = sum(agrees)
    # Leaving out human i leaves `matches` agreeing answers, less one when human i agreed.
    return math.fsum(min(1.0, (matches - agreed) / 3) for agreed in agrees) / len(agrees)


def _name_ids(ids: set) -> str:
    try:
        ordered = sorted(ids)
    except TypeError:  # ints and strs together
        ordered = sorted(ids, key=repr)
    shown = ", ".join(repr(qid) for qid in ordered[:8])
    return shown + (f" and {len(ordered) - 8} more" if len(ordered) > 8 else "")


def vqa_score(predictions: dict, annotations: dict) -> dict:
    """VQAv2 accuracy over a set of questions.

    predictions: {question_id: answer}; annotations: {question_id: {"answers": [str, ...],
    "answer_type": str (optional)}}. Returns {"accuracy": mean over the questions in [0, 1],
    "questions": n, "by_answer_type": {answer_type: mean over that type's questions}}; questions
    without an answer_type count in "accuracy" only."""
    unanswered = set(annotations) - set(predictions)
    unannotated = set(predictions) - set(annotations)
    if unanswered or unannotated:
        problems = []
        if unanswered:
            problems.append(f"no prediction for {_name_ids(unanswered)}")
        if unannotated:
            problems.append(f"no annotation for {_name_ids(unannotated)}")
        if {str(qid) for qid in unanswered} == {str(qid) for qid in unannotated}:
            problems.append("the same ids as int and str (JSON keys are strings)")
        raise ValueError("predictions and annotations cover different question ids: " + "; ".join(problems))
    if not annotations:
        raise ValueError("vqa_score needs at least one question; got no predictions and no annotations")
    scores = []
    by_type: dict = {}
    for qid, annotation in annotations.items():
        if not annotation["answers"]:
            raise ValueError(f"question {qid!r} has no human answers")
        score = vqa_accuracy(predictions[qid], annotation["answers"])
        scores.append(score)
        answer_type = annotation.get("answer_type")
        if answer_type is not None:
            by_type.setdefault(answer_type, []).append(score)
    return {"accuracy": math.fsum(scores) / len(scores), "questions": len(scores),
            "by_answer_type": {kind: math.fsum(group) / len(group) for kind, group in sorted(by_type.items())}}
