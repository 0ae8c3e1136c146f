"""Held-out evaluation: validation loss and caption accuracy (greedy captions vs references).

Under ZeRO-3 a parameter exists whole only inside its module's forward, so decoding through
the engine would all-gather every module at every token. Instead the parameters are gathered
once per evaluation into a plain replica (one collective per parameter), and each rank then
evaluates its share of the validation set locally; only the final sums are all-reduced.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from furnace.model.tokens import IGNORE_INDEX


def refresh_replica(replica: torch.nn.Module, module: torch.nn.Module) -> None:
    """Copy the (possibly ZeRO-3 partitioned) parameters of `module` into `replica`. Collective."""
    import deepspeed

    if getattr(module, "tp_size", 1) > 1:  # tensor-parallel shards: gather them into whole tensors
        from furnace.parallel.apply import full_state_dict

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


def caption_prompts(batch: dict, image_token_id: int, eoc_token_id: int):
    """Split caption-pair rows into a prompt (everything up to the first <image>, inclusive) and the
    reference caption ids (after the <image>, before <|endofchunk|>)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    img_pos = (ids == image_token_id).float().argmax(1)
    prompt_len = img_pos + 1
    width = int(prompt_len.max())
    pmask = (torch.arange(width)[None] < prompt_len[:, None]).long()
    prompt = ids[:, :width].masked_fill(pmask == 0, 0)
    refs = []
    for r in range(ids.shape[0]):
        row = ids[r, : int(mask[r].sum())].tolist()
        start = int(img_pos[r]) + 1
        end = row.index(eoc_token_id, start) if eoc_token_id in row[start:] else len(row)
        refs.append(row[start:end])
    return prompt, pmask, refs


@torch.no_grad()
def evaluate_local(model, loader, tokenizer, *, device, max_new_tokens: int, accuracy_fn=None,
                   max_batches: int | None = None) -> torch.Tensor:
    """[loss x tokens, tokens, correct captions, captions] over this rank's validation share."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64)
    eos = tokenizer.eos_token_id
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        dev = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        n_tok = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        stats[0] += float(model(dev)) * n_tok
        stats[1] += n_tok
        prompt, pmask, ref_ids = caption_prompts(batch, model.image_token_id, model.eoc_token_id)
        out = model.generate(prompt.to(device), pmask.to(device), dev["images"], dev["media_valid"],
                             max_new_tokens=max_new_tokens, eos_token_id=model.eoc_token_id,
                             pad_token_id=tokenizer.pad_token_id or 0).cpu()
        preds, refs = [], []
        for r in range(out.shape[0]):
            row = out[r].tolist()
            for stop in (model.eoc_token_id, eos):
                if stop is not None and stop in row:
                    row = row[: row.index(stop)]
            preds.append(tokenizer.decode(row, skip_special_tokens=True))
            refs.append(tokenizer.decode(ref_ids[r], skip_special_tokens=True))
        if accuracy_fn is not None:
            stats[2] += accuracy_fn(preds, refs) * len(preds)
        stats[3] += len(preds)
        if i == 0:
            evaluate_local.examples = list(zip(preds[:2], refs[:2]))
    return stats


def summarize(stats: torch.Tensor, group=None) -> dict:
    if dist.is_initialized():
        dist.all_reduce(stats, group=group)
    return {"val_loss": float(stats[0] / stats[1].clamp(min=1)),
            "caption_accuracy": float(stats[2] / stats[3].clamp(min=1)), "val_samples": int(stats[3]),
            "examples": getattr(evaluate_local, "examples", [])}
