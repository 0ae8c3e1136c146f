"""Rows -> one padded batch: the batch contract of the model.

input_ids / labels / attention_mask LongTensor [B, L] (right padding to `max_length`, or to the
longest row), images FloatTensor [B, max_images, F, 3, S, S] (valid media first, exact zeros
after; F = `frames`, data.video_frames: a clip's sampled frames in order, a still image repeated
in each of the F), media_valid BoolTensor [B, max_images]; row b holds exactly
media_valid[b].sum() <image> tokens. Filler rows are labelled IGNORE_INDEX throughout.

With `audio_samples` > 0 (a run with an audio tower) the batch also holds audio FloatTensor
[B, max_images, S] (each clip's mono samples, zero-padded; S = audio_samples, the tower's window,
or with pad_to_max off the longest clip) and audio_valid BoolTensor [B, max_images]: slot t of
row b is an audio clip (media_valid too; its `images` slot is zeros). Media tokens (<image> and
<audio>) are counted together, in slot order: the k-th one's kind is slot k's.
"""
from __future__ import annotations

import torch

from furnace.data.images import normalize
from furnace.data.text import TextEncoder
from furnace.tokens import IGNORE_INDEX, build_labels


class _Audio:
    """The batch's audio slots (`audio_samples` > 0), filled row by row."""

    def __init__(self, rows, B: int, T: int, samples: int, pad_to_max: bool):
        clips = [a for r in rows for a in _media_of(r) if a.ndim == 1]
        S = samples if pad_to_max else max([1] + [min(len(a), samples) for a in clips])
        self.audio = torch.zeros((B, T, S), dtype=torch.float32)
        self.valid = torch.zeros((B, T), dtype=torch.bool)
        self.np = self.audio.numpy()

    def put(self, b: int, t: int, arr) -> None:
        n = min(len(arr), self.np.shape[2])
        self.np[b, t, :n] = arr[:n]
        self.valid[b, t] = True

    def into(self, out: dict, images: torch.Tensor) -> dict:
        if bool(self.valid.any()):
            images[self.valid] = 0.0  # an audio slot holds no image
        return out | {"audio": self.audio, "audio_valid": self.valid}


def _media_of(row_or_pack):
    """The media of a row (ids, media, ...) or of every row of a pack."""
    if row_or_pack and isinstance(row_or_pack[0], tuple):
        return [m for r in row_or_pack for m in r[1]]
    return row_or_pack[1]


def _put(dst, arr) -> None:
    """A medium into its [F, 3, S, S] slot: a clip's frames [F, S, S, 3], or a still [S, S, 3]
    in every frame."""
    dst[...] = arr.transpose(0, 3, 1, 2) if arr.ndim == 4 else arr.transpose(2, 0, 1)[None]


def collate(rows, encoder: TextEncoder, *, max_length, max_images, image_size, mean, std, pad_to_max,
            frames: int = 1, audio_samples: int = 0) -> dict:
    B = len(rows)
    L = max_length if pad_to_max else max(len(r[0]) for r in rows)
    input_ids = torch.full((B, L), encoder.pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    imgs = torch.zeros((B, max_images, frames, 3, image_size, image_size), dtype=torch.uint8)
    imgs_np = imgs.numpy()  # numpy copies: no torch intra-op threads for 150 KB moves
    valid = torch.zeros((B, max_images), dtype=torch.bool)
    inter = torch.zeros((B,), dtype=torch.bool)
    filler = torch.zeros((B,), dtype=torch.bool)
    audio = _Audio(rows, B, max_images, audio_samples, pad_to_max) if audio_samples else None
    for b, (ids, images, is_doc, is_filler) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[b, : len(ids)] = 1
        for t, arr in enumerate(images):
            if arr.ndim == 1:
                audio.put(b, t, arr)
            else:
                _put(imgs_np[b, t], arr)
            valid[b, t] = True
        inter[b] = is_doc
        filler[b] = is_filler
    labels = build_labels(input_ids, attention, image_token_id=encoder.media_ids, eoc_token_id=encoder.eoc_id,
                          interleaved=inter)
    labels[filler] = IGNORE_INDEX
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # Built in shared memory: handing the batch to the main process then needs no copy.
        out = torch.empty(imgs.shape, dtype=torch.float32).share_memory_()
    images = normalize(imgs, mean, std, channels_last=False, out=out)
    if not bool(valid.all()):
        images[~valid] = 0.0  # missing media are exact zeros (not the normalised black)
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "images": images,
           "media_valid": valid}
    return out if audio is None else audio.into(out, images)


def collate_packed(packs, encoder: TextEncoder, *, max_length, max_images, image_size, mean, std,
                   pad_to_max, frames: int = 1, audio_samples: int = 0) -> dict:
    """Packed rows -> one batch (`data.pack`): each row holds several samples back to back (a
    pack: a list of rows as `collate` takes them), plus position_ids [B, L] restarting at 0 with
    each sample and segment_ids [B, L] (1, 2, ... per sample, 0 on padding) that keep
    self-attention within a sample (and, through text_time, each sample's text on its own
    images). Labels are each sample's own, and a sample's first token is no target: the loss is
    the one the samples give unpacked, token for token."""
    B = len(packs)
    L = max_length if pad_to_max else max(sum(len(r[0]) for r in p) for p in packs)
    input_ids = torch.full((B, L), encoder.pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    segment_ids = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    imgs = torch.zeros((B, max_images, frames, 3, image_size, image_size), dtype=torch.uint8)
    imgs_np = imgs.numpy()
    valid = torch.zeros((B, max_images), dtype=torch.bool)
    audio = _Audio(packs, B, max_images, audio_samples, pad_to_max) if audio_samples else None
    for b, pack in enumerate(packs):
        off = t = 0
        for k, (ids, images, is_doc, is_filler) in enumerate(pack):
            n = len(ids)
            row = torch.tensor(ids, dtype=torch.long)
            input_ids[b, off: off + n] = row
            attention[b, off: off + n] = 1
            position_ids[b, off: off + n] = torch.arange(n)
            segment_ids[b, off: off + n] = k + 1
            if not is_filler:
                lab = build_labels(row[None], None, image_token_id=encoder.media_ids, eoc_token_id=encoder.eoc_id,
                                   interleaved=bool(is_doc))[0]
                lab[0] = IGNORE_INDEX  # the previous sample's last token does not predict this one
                labels[b, off: off + n] = lab
            for arr in images:
                if arr.ndim == 1:
                    audio.put(b, t, arr)
                else:
                    _put(imgs_np[b, t], arr)
                valid[b, t] = True
                t += 1
            off += n
    out = None
    if torch.utils.data.get_worker_info() is not None:
        out = torch.empty(imgs.shape, dtype=torch.float32).share_memory_()
    images = normalize(imgs, mean, std, channels_last=False, out=out)
    if not bool(valid.all()):
        images[~valid] = 0.0
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "position_ids": position_ids,
           "segment_ids": segment_ids, "images": images, "media_valid": valid}
    return out if audio is None else audio.into(out, images)
