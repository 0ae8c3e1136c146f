"""Flamingo's special tokens and the masks derived from token ids.

Kept apart from the modules so the data loader and the model agree on one definition.
"""
from __future__ import annotations

import torch

IMAGE_TOKEN = "<image>"
AUDIO_TOKEN = "<audio>"  # in tokenizers of runs with an audio tower only
EOC_TOKEN = "<|endofchunk|>"
IGNORE_INDEX = -100


def is_media(input_ids: torch.Tensor, media_ids) -> torch.Tensor:
    """[B, L] bool: the media tokens. `media_ids`: the <image> id, or a tuple of the media
    tokens' ids (<image>, <audio>): each starts a medium the same way."""
    if not isinstance(media_ids, (tuple, list)):
        return input_ids == media_ids
    out = input_ids == media_ids[0]
    for i in media_ids[1:]:
        out = out | (input_ids == i)
    return out


def positions(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] 0..L-1 in every row (an expanded view): the positions of unpacked rows."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


def text_time(input_ids: torch.Tensor, image_token_id: int, segment_ids: torch.Tensor | None = None,
              reset_id: int | None = None) -> torch.Tensor:
    """[B, L] image index each token belongs to: 0 before the first <image>, k from the k-th on.
    `image_token_id`: an id or a tuple of media ids (`is_media`): <audio> starts a medium as <image> does.

    The <image> token itself belongs to its own image, so it (and the text after it, up to the
    next <image>) cross-attends to that image's latents only. In a packed row (`segment_ids`: the
    sample each token belongs to) the count stays global, so a sample's tokens see only its own
    images, and the tokens of a sample before its first <image> get 0 (they see none).
    `reset_id` (IDEFICS' rule): the tokens after one equal to it get 0 until the next <image>.
    """
    is_image = is_media(input_ids, image_token_id).to(torch.long)
    tt = torch.cumsum(is_image, dim=1)
    if reset_id is not None:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        none = torch.full_like(pos, -1)
        last_image = torch.where(is_image.bool(), pos, none).cummax(dim=1).values
        last_reset = torch.where(input_ids == reset_id, pos, none).cummax(dim=1).values
        after_reset = torch.cat([none[:, :1], last_reset[:, :-1]], dim=1) > last_image  # the reset token still sees
        tt = tt.masked_fill(after_reset, 0)
    if segment_ids is None:
        return tt
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    # images before each token's sample began (non-decreasing along the row: a running max carries it)
    before = torch.where(starts, torch.cumsum(is_image, dim=1) - is_image, torch.zeros_like(tt)).cummax(dim=1).values
    return torch.where(tt > before, tt, torch.zeros_like(tt))


def build_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    image_token_id: int,
    eoc_token_id: int,
    interleaved: bool | torch.Tensor = False,
) -> torch.Tensor:
    """Next-token labels with IGNORE_INDEX where no loss is taken.

    Masked: padding, <image> tokens (every media token of `image_token_id`, an id or a tuple:
    `is_media`), and for interleaved documents (per sample when
    `interleaved` is a [B] bool tensor) the text before the first <image> and the text between
    an <|endofchunk|> and the next <image>. <|endofchunk|> itself keeps its label: the model
    learns where a chunk ends.
    """
    labels = input_ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = IGNORE_INDEX
    is_image = is_media(input_ids, image_token_id)
    if isinstance(interleaved, bool):
        interleaved = torch.full((input_ids.shape[0],), interleaved, dtype=torch.bool, device=input_ids.device)
    if interleaved.any():
        # A token is outside a chunk when no <image> came yet, or when an <|endofchunk|> strictly
        # before it is newer than the latest <image> at or before it.
        pos = positions(input_ids)
        none = torch.full_like(pos, -1)
        last_image = torch.where(is_image, pos, none).cummax(dim=1).values
        last_eoc = torch.where(input_ids == eoc_token_id, pos, none).cummax(dim=1).values
        last_eoc_before = torch.cat([none[:, :1], last_eoc[:, :-1]], dim=1)
        outside = (last_image < 0) | (last_eoc_before > last_image)
        labels[outside & interleaved[:, None]] = IGNORE_INDEX
    labels[is_image] = IGNORE_INDEX
    return labels
