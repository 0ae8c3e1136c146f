"""Caption metrics as the field reports them: pycocoevalcap's (the COCO caption evaluation code)
BLEU-1..4, ROUGE-L and CIDEr, and METEOR when asked for and Java is on PATH (its scorer is a Java
program). Captions are tokenized as the COCO server does, with Stanford's PTB tokenizer (Java);
without Java they are lower-cased and split at whitespace and punctuation instead, and the result
says which (`tokenizer`). SPICE needs Stanford CoreNLP models that pycocoevalcap downloads on
first use; nothing is downloaded here, so it is listed under `skipped`.

    caption_scores({id: prediction}, {id: [reference, ...]}) -> {"BLEU-4": ..., "CIDEr": ..., ...}
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys

_PUNCTUATION = re.compile(r"[^\w\s]")


def _simple_tokens(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


@contextlib.contextmanager
def _stderr_quiet():
    """File descriptor 2 (a child process's stderr too) to /dev/null for the block."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _tokenize(captions: dict) -> tuple[dict, str]:
    """{id: [caption, ...]} -> the same, tokenized; and which tokenizer did it."""
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        try:
            with _stderr_quiet():  # the Java tokenizer reports its speed on the terminal
                return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()}), "ptb"
        except OSError:  # pycocoevalcap writes its temporary file beside the jar: a read-only install
            pass
    return {k: [_simple_tokens(c) for c in v] for k, v in captions.items()}, "simple"


def caption_scores(predictions: dict, references: dict, *, meteor: bool = False) -> dict:
    """Corpus scores of one prediction per id against that id's references (at least one)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        missing = sorted(set(references) - set(predictions), key=str)[:3]
        extra = sorted(set(predictions) - set(references), key=str)[:3]
        raise ValueError(f"caption_scores: predictions and references cover different ids (no prediction for "
                         f"{missing}, no reference for {extra})")
    if not predictions:
        return {"captions": 0, "skipped": {}}
    if any(not refs for refs in references.values()):
        raise ValueError("caption_scores: every id needs at least one reference caption")
    # one tokenizer run for both sides: prediction ids are tagged so they cannot collide
    both, tokenizer = _tokenize({**{("ref", k): list(v) for k, v in references.items()},
                                 **{("pred", k): [p] for k, p in predictions.items()}})
    gts = {i: both[("ref", k)] for i, k in enumerate(references)}
    res = {i: both[("pred", k)] for i, k in enumerate(references)}
    out: dict = {"captions": len(res), "tokenizer": tokenizer, "skipped": {}}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor and shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        out["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    elif meteor:
        out["skipped"]["METEOR"] = "needs Java on PATH"
    out["skipped"]["SPICE"] = "needs Stanford CoreNLP models pycocoevalcap downloads on first use"
    return out
