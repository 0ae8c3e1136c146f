"""Rows -> one padded batch: the batch contract of the model.

input_ids / labels / attention_mask LongTensor [B, L] (right padding to `max_length`, or to the
longest row), images FloatTensor [B, max_images, 1, 3, S, S] (valid images first, exact zeros
after), media_valid BoolTensor [B, max_images]; row b holds exactly media_valid[b].sum()
<image> tokens. Filler rows are labelled IGNORE_INDEX throughout.
"""
from __future__ import annotations

import torch

from furnace.data.images import normalize
from furnace.data.text import TextEncoder
from furnace.tokens import IGNORE_INDEX, build_labels


def collate(rows, encoder: TextEncoder, *, max_length, max_images, image_size, mean, std, pad_to_max) -> dict:
    B = len(rows)
    L = max_length if pad_to_max else max(len(r[0]) for r in rows)
    input_ids = torch.full((B, L), encoder.pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    imgs = torch.zeros((B, max_images, 1, 3, image_size, image_size), dtype=torch.uint8)
    imgs_np = imgs.numpy()  # numpy copies: no torch intra-op threads for 150 KB moves
    valid = torch.zeros((B, max_images), dtype=torch.bool)
    inter = torch.zeros((B,), dtype=torch.bool)
    filler = torch.zeros((B,), dtype=torch.bool)
    for b, (ids, images, is_doc, is_filler) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[b, : len(ids)] = 1
        for t, arr in enumerate(images):
            imgs_np[b, t, 0] = arr.transpose(2, 0, 1)
            valid[b, t] = True
        inter[b] = is_doc
        filler[b] = is_filler
    labels = build_labels(input_ids, attention, image_token_id=encoder.image_id, eoc_token_id=encoder.eoc_id,
                          interleaved=inter)
    labels[filler] = IGNORE_INDEX
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # Built in shared memory: handing the batch to the main process then needs no copy.
        out = torch.empty(imgs.shape, dtype=torch.float32).share_memory_()
    images = normalize(imgs, mean, std, channels_last=False, out=out)
    if not bool(valid.all()):
        images[~valid] = 0.0  # missing media are exact zeros (not the normalised black)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "images": images, "media_valid": valid}
