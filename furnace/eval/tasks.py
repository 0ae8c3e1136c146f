"""The four evaluation tasks, split in two halves: what one rank computes over its share of the
set (`*_outputs`, model calls) and how the gathered outputs are scored (`score`, on one rank).

    caption    generate after `<image>Output:`; pycocoevalcap BLEU-1..4, ROUGE-L, CIDEr (METEOR with Java)
    vqa        generate after `<image>Question:{q} Short answer:`; VQAv2 accuracy
    retrieval  log p(caption | image) for every (image, caption), or with a model trained with the
               contrastive objective and no shots, the cosine of their embeddings; image->text and
               text->image R@1/5/10
    classify   log p(class name | image) for every class; top-1 / top-5
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from furnace.data.text import TextEncoder
from furnace.eval import prompts
from furnace.eval.ranking import retrieval_recall, top_k_accuracy
from furnace.eval.scoring import ModelScorer, UnreadableImage
from furnace.eval.vqa import vqa_score
from furnace.training.caption_scores import caption_scores

GENERATIVE = ("caption", "vqa")
# open_flamingo's VQA post-processing: a short answer ends where the model starts a new turn
_VQA_STOPS = ("Question", "Answer", "Short answer", "\n")


@dataclass
class Settings:
    task: str
    template: str
    shots: int = 0
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 20
    decoding: dict = field(default_factory=dict)
    reduce: str = "mean"  # likelihood tasks: per-token mean or sum of a candidate's log-probs
    class_names: list = field(default_factory=list)
    ranking: str = "auto"  # retrieval: embeddings | likelihood | auto (embeddings when the model has them)


def _fields(s: Settings, item: dict, *, demo: bool) -> dict:
    if s.task in ("caption", "retrieval"):
        return {"caption": item["captions"][0]} if demo else {}
    if s.task == "vqa":
        out = {"question": item["question"]}
        if demo:  # the answer most humans gave
            out["answer"] = collections.Counter(item["answers"]).most_common(1)[0][0]
        return out
    return {"label": s.class_names[item["label"]]} if demo else {}


def _context(s: Settings, scorer: ModelScorer, item: dict, index: int, pool: list, pool_is_set: bool):
    """(prompt text, its images) of one query with its demonstrations; raises UnreadableImage."""
    demos = prompts.draw_demonstrations(len(pool), s.shots, s.seed, item["id"],
                                        exclude=index if pool_is_set else None)
    text = "".join(prompts.demonstration(s.template, **_fields(s, pool[d], demo=True)) for d in demos)
    text += prompts.query(s.template, **_fields(s, item, demo=False))
    images = [pool[d]["image"] for d in demos] + [item["image"]]
    for im in images:
        scorer.pixels(im)  # decoded (and kept) now: an unreadable one drops this query alone
    return text, images


def generation_outputs(s: Settings, scorer: ModelScorer, items: list, share: list[int], pool: list,
                       pool_is_set: bool, skipped: collections.Counter, progress=None) -> list[dict]:
    out = []
    for start in range(0, len(share), s.batch_size):
        batch, texts, images = [], [], []
        for i in share[start: start + s.batch_size]:
            try:
                text, ims = _context(s, scorer, items[i], i, pool, pool_is_set)
            except UnreadableImage:
                skipped["unreadable_image"] += 1
                continue
            batch.append(i)
            texts.append(text)
            images.append(ims)
        if batch:
            preds = scorer.generate(texts, images, max_new_tokens=s.max_new_tokens, **s.decoding)
            for i, text, pred in zip(batch, texts, preds):
                row = {"index": i, "id": items[i]["id"], "prediction": pred}
                if s.task == "vqa":
                    row.update(prediction=TextEncoder.cut_at(pred, _VQA_STOPS), question=items[i]["question"],
                               answers=items[i]["answers"])
                else:
                    row["references"] = items[i]["captions"]
                out.append(row)
        if progress is not None:
            progress.update(len(share[start: start + s.batch_size]))
    return out


def likelihood_outputs(s: Settings, scorer: ModelScorer, items: list, share: list[int], pool: list,
                       pool_is_set: bool, skipped: collections.Counter, progress=None) -> list[dict]:
    """Per query image: the score of every candidate (all the set's captions, or every class)."""
    tail = prompts.answer_tail(s.template)
    if s.task == "retrieval":
        candidates = [c for it in items for c in it["captions"]]
        if s.ranking == "embeddings" and not scorer.has_embeddings:
            raise ValueError("--ranking embeddings needs a model trained with the contrastive objective "
                             "(model.contrastive.dim > 0); use --ranking likelihood")
        if s.ranking == "embeddings" or (s.ranking == "auto" and scorer.has_embeddings):
            return embedding_outputs(s, scorer, items, share, candidates, skipped, progress)
    else:
        candidates = list(s.class_names)
    out = []
    for i in share:
        try:
            text, ims = _context(s, scorer, items[i], i, pool, pool_is_set)
        except UnreadableImage:
            skipped["unreadable_image"] += 1
        else:
            scores = scorer.loglik(text, ims, [c + tail for c in candidates], batch_size=s.batch_size,
                                   reduce=s.reduce)
            row = {"index": i, "id": items[i]["id"], "scores": scores.tolist()}
            if s.task == "classify":
                row.update(label=items[i]["label"], predicted=int(scores.argmax()))
            out.append(row)
        if progress is not None:
            progress.update(1)
    return out


def embedding_outputs(s: Settings, scorer: ModelScorer, items: list, share: list[int], candidates: list[str],
                      skipped: collections.Counter, progress=None) -> list[dict]:
    """Retrieval by the contrastive heads: each query image's cosine with every caption."""
    texts = scorer.embed_texts(candidates, batch_size=max(s.batch_size, 64))
    out = []
    for start in range(0, len(share), s.batch_size):
        batch = []
        for i in share[start: start + s.batch_size]:
            try:
                scorer.pixels(items[i]["image"])
                batch.append(i)
            except UnreadableImage:
                skipped["unreadable_image"] += 1
        if batch:
            sims = scorer.embed_images([items[i]["image"] for i in batch]) @ texts.t()
            out += [{"index": i, "id": items[i]["id"], "scores": row.tolist(), "ranking": "contrastive embeddings"}
                    for i, row in zip(batch, sims)]
        if progress is not None:
            progress.update(len(share[start: start + s.batch_size]))
    return out


def outputs(s: Settings, *args, **kw) -> list[dict]:
    return (generation_outputs if s.task in GENERATIVE else likelihood_outputs)(s, *args, **kw)


def score(s: Settings, items: list, rows: list[dict], *, meteor: bool = True) -> dict:
    """The task's scores over every rank's outputs (`rows`, any order)."""
    rows = sorted(rows, key=lambda r: r["index"])
    if s.task == "caption":
        return caption_scores({r["id"]: r["prediction"] for r in rows},
                              {r["id"]: items[r["index"]]["captions"] for r in rows}, meteor=meteor)
    if s.task == "vqa":
        return vqa_score({r["id"]: r["prediction"] for r in rows},
                         {r["id"]: {"answers": items[r["index"]]["answers"],
                                    "answer_type": items[r["index"]]["answer_type"]} for r in rows})
    scores = torch.tensor([r["scores"] for r in rows], dtype=torch.float64)
    if s.task == "classify":
        return {"images": len(rows), "classes": len(s.class_names),
                **top_k_accuracy(scores.reshape(len(rows), -1), torch.tensor([r["label"] for r in rows], dtype=torch.long))}
    # retrieval: the texts are every caption of every item (the query images may be fewer: skips)
    text_item = torch.tensor([k for k, it in enumerate(items) for _ in it["captions"]])
    kept = torch.tensor([r["index"] for r in rows])
    position = torch.full((len(items),), -1, dtype=torch.long)
    position[kept] = torch.arange(len(rows))
    keep = position[text_item] >= 0  # texts of an image that could not be read have no right answer
    ranking = rows[0].get("ranking", "caption log-likelihood") if rows else "caption log-likelihood"
    return {"images": len(rows), "texts": int(keep.sum()), "ranking": ranking,
            **retrieval_recall(scores.reshape(len(rows), -1)[:, keep], position[text_item][keep])}
