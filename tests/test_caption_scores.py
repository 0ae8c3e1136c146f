"""Caption metrics: pycocoevalcap's scorers behind `caption_scores`, checked on cases worked by
hand (BLEU-1 is clipped unigram precision times the brevity penalty; ROUGE-L the LCS F-measure
with beta 1.2; CIDEr 10 x the mean n-gram cosine similarity)."""
import shutil

import pytest

from furnace.training.caption_scores import caption_scores

REFS = {1: ["a red circle"], 2: ["two blue squares"], 3: ["a green triangle left of a square"]}


def test_hand_worked_scores():
    got = caption_scores({1: "a red square", 2: "two blue squares", 3: "a green triangle left of a square"}, REFS)
    # unigrams: 2/3 + 3/3 + 7/7 clipped matches over 13 predicted words, same length as the references
    assert got["BLEU-1"] == pytest.approx(12 / 13, rel=1e-6)
    # LCS 2 of 3 words in image 1 (P = R = 2/3 -> F = 2/3), perfect elsewhere
    assert got["ROUGE-L"] == pytest.approx((2 / 3 + 1 + 1) / 3, rel=1e-6)
    assert got["captions"] == 3 and "SPICE" in got["skipped"]


def test_a_perfect_corpus_scores_the_maximum_and_tokenization_ignores_case_and_punctuation():
    got = caption_scores({1: "A Red Circle.", 2: "Two blue squares!", 3: "a green triangle, left of a square"}, REFS)
    assert got["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    # CIDEr: 10 x the mean over n = 1..4 of the n-gram cosine similarity (1 when equal); a 3-word
    # caption has no 4-grams (similarity 0): (7.5 + 7.5 + 10) / 3
    assert got["CIDEr"] == pytest.approx(25 / 3, rel=1e-6)
    assert got["ROUGE-L"] == pytest.approx(1.0)


def test_without_java_the_simple_tokenizer_is_used_and_said(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    got = caption_scores({1: "A red circle.", 2: "two blue squares", 3: "a green triangle"}, REFS, meteor=True)
    assert got["tokenizer"] == "simple" and "METEOR" in got["skipped"] and "METEOR" not in got
    assert got["BLEU-1"] < 1.0 and got["CIDEr"] > 0


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer are Java programs")
def test_meteor_and_ptb_tokenizer_with_java():
    got = caption_scores({1: "a red circle", 2: "two blue squares", 3: "a triangle"}, REFS, meteor=True)
    assert got["tokenizer"] == "ptb" and 0 < got["METEOR"] <= 1


def test_ids_that_do_not_match_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"no prediction for \[3\]"):
        caption_scores({1: "a", 2: "b"}, REFS)
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores({1: "a"}, {1: []})
