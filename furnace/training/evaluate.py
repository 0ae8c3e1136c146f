"""Held-out evaluation: validation loss and caption exact match (greedy captions vs references).

Under ZeRO-3 a parameter exists whole only inside its module's forward, so decoding through
the engine would all-gather every module at every token. Instead the parameters are gathered
once per evaluation into a plain replica (one collective per parameter), and each rank then
evaluates its share of the validation set locally; only the final sums are all-reduced.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from furnace.data.text import TextEncoder
from furnace.parallel.apply import full_state_dict
from furnace.tokens import IGNORE_INDEX
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


def refresh_replica(replica: torch.nn.Module, module: torch.nn.Module) -> None:
    """Copy the (possibly ZeRO-3 partitioned) parameters of `module` into `replica`. Collective."""
    import deepspeed

    if getattr(module, "tp_size", 1) > 1:  # tensor-parallel shards: gather them into whole tensors
        state = full_state_dict(module)
        with torch.no_grad():
            for name, dst in replica.named_parameters():
                dst.data.copy_(state[name])
        return
    src = dict(module.named_parameters())
    with torch.no_grad():
        for name, dst in replica.named_parameters():
            p = src[name]
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                dst.data.copy_(p.data.view_as(dst) if p.numel() == dst.numel() else p.data)


def caption_prompts(batch: dict, image_token_id: int):
    """Prompts for captioning: each row up to and including its first <image> (left part of the
    row, right-padded to the longest prompt) and the prompt mask."""
    ids = batch["input_ids"]
    prompt_len = (ids == image_token_id).float().argmax(1) + 1
    width = int(prompt_len.max())
    pmask = (torch.arange(width)[None] < prompt_len[:, None]).long()
    return ids[:, :width].masked_fill(pmask == 0, 0), pmask


@torch.no_grad()
def evaluate_local(model, loader, tokenizer, *, device, max_new_tokens: int, accuracy_fn=None,
                   max_batches: int | None = None) -> tuple[torch.Tensor, list]:
    """([loss x tokens, tokens, correct captions, captions], a few (prediction, reference) pairs)
    over this rank's validation share.
    Filler rows (no image: the loader's padding of uneven shares) count for nothing."""
    text = TextEncoder(tokenizer, max_length=0, max_images=1)  # decoding only: lengths unused
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64)
    examples = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        model.check_media(batch["input_ids"], batch["media_valid"])  # on the CPU batch, as in training
        dev = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        n_tok = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if n_tok:
            stats[0] += float(model(dev)) * n_tok
            stats[1] += n_tok
        rows = batch["media_valid"].any(1).nonzero().flatten().tolist()
        if not rows:
            continue
        prompt, pmask = caption_prompts({"input_ids": batch["input_ids"][rows]}, model.image_token_id)
        out = model.generate(prompt.to(device), pmask.to(device), dev["images"][rows], dev["media_valid"][rows],
                             max_new_tokens=max_new_tokens, eos_token_id=model.eoc_token_id,
                             pad_token_id=tokenizer.pad_token_id or 0).cpu()
        preds = [text.decode(o) for o in out]
        refs = [text.reference_caption(batch["input_ids"][r]) for r in rows]
        if accuracy_fn is not None:
            stats[2] += accuracy_fn(preds, refs) * len(preds)
        stats[3] += len(preds)
        examples.extend(list(zip(preds, refs))[: 3 - len(examples)])
    return stats, examples


def summarize(stats: torch.Tensor, examples=(), group=None) -> dict:
    """Sums over the ranks; a score with nothing behind it (no labelled token, no caption) is
    NaN, never a 0 that reads like a result."""
    if dist.is_initialized():
        all_reduce_host(stats, group=group)
    nan = float("nan")
    return {"val_loss": float(stats[0] / stats[1]) if stats[1] > 0 else nan,
            "caption_accuracy": float(stats[2] / stats[3]) if stats[3] > 0 else nan, "val_samples": int(stats[3]),
            "examples": list(examples)}
