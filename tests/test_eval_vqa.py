"""VQAv2 accuracy (furnace/eval/vqa.py) on cases worked by hand from the official evaluation's
rules. No installed library ships the VQA evaluation (pycocoevalcap has the caption metrics only),
so nothing here is compared against a second implementation."""
import pytest

from furnace.eval.vqa import CONTRACTIONS, normalize_answer, vqa_accuracy, vqa_score


@pytest.mark.parametrize("raw, normal", [
    # whitespace
    ("  yes\n", "yes"),
    ("red\tcar", "red car"),
    # periods: removed unless a digit follows
    ("yes.", "yes"),
    ("2.5", "2.5"),
    ("5.", "5"),
    ("St. Louis", "st louis"),
    # a comma between digits goes without a space, and then so does every other punctuation mark
    ("1,000", "1000"),
    ("1,000 people/day", "1000 peopleday"),
    # otherwise a mark becomes a space, unless it touches a space somewhere in the text
    ("people/day", "people day"),
    ("black-and-white", "black and white"),
    ("yes, it is", "yes it is"),
    ("x-y z- w", "xy z w"),
    ("what?!", "what"),
    ("(left)", "left"),
    # the apostrophe is no punctuation mark here
    ("don't", "don't"),
    # lower-case, number words as whole words, articles dropped
    ("Two", "2"),
    ("two dogs", "2 dogs"),
    ("TEN", "10"),
    ("none", "0"),
    ("eleven", "eleven"),
    ("someone", "someone"),
    ("The dog", "dog"),
    ("a cat and an apple", "cat and apple"),
    ("the", ""),
    # contractions restored from the official map
    ("dont", "don't"),
    ("Isnt", "isn't"),
    ("it isnt a dog", "it isn't dog"),
    ("oclock", "o'clock"),
])
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_period_limit_and_contraction_map_follow_the_official_script():
    # The official call hands re.UNICODE (32) to re.sub as its count: only 32 periods are removed.
    assert normalize_answer("." * 40 + "x") == "." * 8 + "x"
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["youve"] == "you've" and CONTRACTIONS["yall'd've"] == "y'all'd've"


@pytest.mark.parametrize("matching, expected", [
    # k of 10 humans agree. Leaving out an agreeing human leaves k - 1, a disagreeing one k:
    # (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10
    (0, 0.0),
    (1, 0.3),   # (1 * 0 + 9 * 1/3) / 10
    (2, 0.6),   # (2 * 1/3 + 8 * 2/3) / 10
    (3, 0.9),   # (3 * 2/3 + 7 * 1) / 10
    (4, 1.0),   # (4 * 1 + 6 * 1) / 10
])
def test_accuracy_with_ten_answers(matching, expected):
    answers = ["cat"] * matching + ["dog"] * (10 - matching)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)


def test_accuracy_compares_normalised_answers():
    # "Two." "2" and "two" are one answer; "the 2" too; "2.0" is not
    answers = ["2", "two", "The 2"] + ["2.0"] * 7
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("2.0", answers) == pytest.approx(1.0)


def test_accuracy_with_fewer_answers():
    # 3 humans, 1 agrees: left out, 0 others agree; each of the 2 others leaves 1 -> (0 + 1/3 + 1/3) / 3
    assert vqa_accuracy("yes", ["yes", "no", "no"]) == pytest.approx(2 / 9)
    # a single human leaves nobody to agree with, as in the official leave-one-out
    assert vqa_accuracy("yes", ["yes"]) == 0.0


def test_accuracy_refuses_no_answers():
    with pytest.raises(ValueError, match="at least one human answer") as info:
        vqa_accuracy("yes", [])
    assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="list of human answers"):
        vqa_accuracy("yes", "yes")


def test_score_by_answer_type():
    annotations = {
        1: {"answers": ["yes"] * 10, "answer_type": "yes/no"},                 # "Yes" -> 1.0
        2: {"answers": ["no"] * 3 + ["yes"] * 7, "answer_type": "yes/no"},     # "no" -> 0.9
        3: {"answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number"},        # "two" -> 0.6
        4: {"answers": ["red"] * 10},                                          # "blue" -> 0, no type
    }
    got = vqa_score({1: "Yes", 2: "no", 3: "two", 4: "blue"}, annotations)
    assert got["questions"] == 4
    assert got["accuracy"] == pytest.approx((1.0 + 0.9 + 0.6 + 0.0) / 4)
    assert got["by_answer_type"] == pytest.approx({"yes/no": 0.95, "number": 0.6})


def test_score_refuses_different_question_ids():
    annotations = {1: {"answers": ["yes"] * 10}, 3: {"answers": ["no"] * 10}}
    with pytest.raises(ValueError) as info:
        vqa_score({1: "yes", 2: "no"}, annotations)
    message = str(info.value)
    assert "\n" not in message
    assert "no prediction for 3" in message and "no annotation for 2" in message
    # ids read back from JSON are strings
    with pytest.raises(ValueError, match="int and str"):
        vqa_score({"1": "yes", "3": "no"}, annotations)


def test_score_refuses_nothing_to_score_and_a_question_without_answers():
    with pytest.raises(ValueError, match="at least one question"):
        vqa_score({}, {})
    with pytest.raises(ValueError, match="question 7 has no human answers"):
        vqa_score({7: "yes"}, {7: {"answers": []}})
