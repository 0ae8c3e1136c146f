"""Prompts and in-context demonstrations, as open_flamingo evaluates.

A template is the text of one example with `{fields}`; its last field is the answer the model
writes (`{caption}`, `{answer}`, `{label}`). A demonstration is the whole template; the query is
the template cut just before its answer field. Demonstrations are drawn from a pool with a
generator seeded by (seed, query id), so each query sees the same demonstrations however the
set is split over ranks.
"""
from __future__ import annotations

import random
import string

from furnace.tokens import IMAGE_TOKEN

TEMPLATES = {
    "caption": f"{IMAGE_TOKEN}Output:{{caption}}<|endofchunk|>",
    "vqa": f"{IMAGE_TOKEN}Question:{{question}} Short answer:{{answer}}<|endofchunk|>",
    "classify": f"{IMAGE_TOKEN}Output:{{label}}<|endofchunk|>",
}
ANSWER_FIELD = {"caption": "caption", "vqa": "answer", "classify": "label", "retrieval": "caption"}


def check_template(template: str, task: str) -> None:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    answer = ANSWER_FIELD[task]
    if template.count(IMAGE_TOKEN) != 1 or not fields or fields[-1] != answer:
        raise ValueError(f"--template {template!r}: a {task} template holds one {IMAGE_TOKEN} and ends with the "
                         f"{{{answer}}} field, e.g. {TEMPLATES.get(task, TEMPLATES['caption'])!r}")


def query(template: str, **fields) -> str:
    """The template up to its answer field, filled: what the model continues."""
    head = template[: template.rindex("{")]
    return head.format(**fields)


def demonstration(template: str, **fields) -> str:
    return template.format(**fields)


def answer_tail(template: str) -> str:
    """The template's text after its answer field (`<|endofchunk|>`): scored with each candidate."""
    return template[template.index("}", template.rindex("{")) + 1:]


def draw_demonstrations(pool_size: int, shots: int, seed: int, query_id, exclude: int | None = None) -> list[int]:
    """`shots` distinct pool indices for one query, never `exclude` (the query itself when the
    pool is the evaluated set)."""
    if shots == 0:
        return []
    candidates = [i for i in range(pool_size) if i != exclude]
    if len(candidates) < shots:
        raise ValueError(f"--shots {shots} needs at least {shots} demonstrations but the pool holds "
                         f"{len(candidates)}: use fewer shots or a larger --demo set")
    return random.Random(f"{seed}/{query_id}").sample(candidates, shots)
