"""Ranking metrics from a score matrix (higher = likelier). Ties count against the answer: a
wrong candidate scored equal to the right one ranks ahead of it, so a model that scores every
candidate alike gets no credit rather than full marks."""
from __future__ import annotations

import torch


def rank_of_answer(scores: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """scores [N, C], answer [N, C] bool (at least one per row) -> [N] 0-based rank of each row's
    best-scored answer among the wrong candidates."""
    if not bool(answer.any(1).all()):
        raise ValueError("rank_of_answer: every row needs at least one right candidate")
    best = scores.masked_fill(~answer, float("-inf")).max(1).values
    return ((scores >= best[:, None]) & ~answer).sum(1)


def recall_at(ranks: torch.Tensor, ks=(1, 5, 10)) -> dict:
    return {f"R@{k}": float((ranks < k).float().mean()) if ranks.numel() else float("nan") for k in ks}


def retrieval_recall(scores: torch.Tensor, text_image: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """scores [images, texts]; text_image [texts]: the image each text describes. Image -> text:
    an image is found when one of its texts ranks within K; text -> image: a text's own image."""
    n_img, n_txt = scores.shape
    if text_image.shape != (n_txt,) or int(text_image.min()) < 0 or int(text_image.max()) >= n_img:
        raise ValueError(f"retrieval_recall: text_image must give each of the {n_txt} texts an image index "
                         f"below {n_img}")
    truth = text_image[None, :] == torch.arange(n_img)[:, None]  # [images, texts]
    return {"image_to_text": recall_at(rank_of_answer(scores, truth), ks),
            "text_to_image": recall_at(rank_of_answer(scores.t(), truth.t()), ks)}


def top_k_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """scores [images, classes]; labels [images] -> {"top-1": ..., "top-5": ...}."""
    truth = torch.nn.functional.one_hot(labels, scores.shape[1]).bool()
    ranks = rank_of_answer(scores, truth)
    return {f"top-{k}": float((ranks < k).float().mean()) if ranks.numel() else float("nan") for k in ks}
