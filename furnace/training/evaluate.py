"""Held-out evaluation: validation loss and caption exact match (greedy captions vs references).

Each rank evaluates its share of the validation set with the model as training holds it (its
tensor-parallel shards, ZeRO-3 partitions gathered module by module as they run, or its pipeline
stage through `parallel.staged`); only the final sums are all-reduced. Every rank runs the same
number of forwards (the loader gives each the same number of batches; filler rows are decoded
and not scored), which ZeRO-3's collective gathers need.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from furnace.data.text import TextEncoder
from furnace.tokens import IGNORE_INDEX, is_media
from furnace.training.distributed import all_reduce_host


def normalize_caption(text: str) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip().lower()
    return text.rstrip(" .")


def caption_accuracy(preds, refs) -> float:
    """Exact-match accuracy after whitespace/case normalisation (and a trailing '.')."""
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise ValueError(f"caption_accuracy: {len(preds)} predictions for {len(refs)} references")
    if not refs:
        return 0.0
    return sum(normalize_caption(p) == normalize_caption(r) for p, r in zip(preds, refs)) / len(refs)


def caption_prompts(batch: dict, image_token_id):
    """Prompts for captioning: each row up to and including its first <image> (its first media
    token, `image_token_id` an id or a tuple: `is_media`; left part of the row, right-padded to
    the longest prompt) and the prompt mask."""
    ids = batch["input_ids"]
    prompt_len = is_media(ids, image_token_id).float().argmax(1) + 1
    width = int(prompt_len.max())
    pmask = (torch.arange(width)[None] < prompt_len[:, None]).long()
    return ids[:, :width].masked_fill(pmask == 0, 0), pmask


@torch.no_grad()
def evaluate_local(model, loader, tokenizer, *, device, max_new_tokens: int, accuracy_fn=None,
                   max_batches: int | None = None, synced_group=None) -> tuple[torch.Tensor, list]:
    """([loss x tokens, tokens, correct captions, captions], every (prediction, reference) pair)
    over this rank's validation share. `model`: a FlamingoModel or `parallel.staged.StagedFlamingo`;
    `synced_group`: the ranks that decode in lockstep (ZeRO-3).
    Filler rows (no image: the loader's padding of uneven shares) count for nothing."""
    text = TextEncoder(tokenizer, max_length=0, max_images=1)  # decoding only: lengths unused
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64)
    examples = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        model.check_media(batch["input_ids"], batch["media_valid"], batch.get("audio_valid"))  # on the CPU batch
        dev = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        n_tok = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = float(model(dev))  # a batch of filler rows too: every rank runs the same forwards
        if n_tok:
            stats[0] += loss * n_tok
            stats[1] += n_tok
        prompt, pmask = caption_prompts(batch, model.media_ids)
        clips = {"audio": dev["audio"], "audio_valid": dev["audio_valid"]} if "audio" in dev else {}
        out = model.generate(prompt.to(device), pmask.to(device), dev["images"], dev["media_valid"],
                             max_new_tokens=max_new_tokens, eos_token_id=model.eoc_token_id,
                             pad_token_id=tokenizer.pad_token_id or 0, synced_group=synced_group, **clips).cpu()
        rows = batch["media_valid"].any(1).nonzero().flatten().tolist()
        if not rows:
            continue
        preds = [text.decode(out[r]) for r in rows]
        refs = [text.reference_caption(batch["input_ids"][r]) for r in rows]
        if accuracy_fn is not None:
            stats[2] += accuracy_fn(preds, refs) * len(preds)
        stats[3] += len(preds)
        examples.extend(zip(preds, refs))
    return stats, examples


def summarize(stats: torch.Tensor, examples=(), group=None) -> dict:
    """Sums over the ranks of `group` (the data-parallel one) and every rank's (prediction,
    reference) pairs; a score with nothing behind it (no labelled token, no caption) is NaN,
    never a 0 that reads like a result."""
    examples = list(examples)
    if dist.is_initialized():
        all_reduce_host(stats, group=group)
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, examples, group=group)
        examples = [pair for share in everyone for pair in share]
    nan = float("nan")
    return {"val_loss": float(stats[0] / stats[1]) if stats[1] > 0 else nan,
            "caption_accuracy": float(stats[2] / stats[3]) if stats[3] > 0 else nan, "val_samples": int(stats[3]),
            "examples": list(examples)}
