"""Frozen (by default) HF vision tower: CLIP or SigLIP -> patch features."""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from .hf_io import read_config

KINDS = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig, SiglipVisionModel)}
# Normalisation the tower was trained with; the loader preprocesses images to match.
IMAGE_STATS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _kind_of(cfg: dict) -> str:
    mt = cfg.get("model_type", "")
    vision_cfg = cfg.get("vision_config")  # a full CLIP/SigLIP checkpoint nests the tower's config
    for kind in KINDS:
        if mt.startswith(kind):
            return kind
    if vision_cfg:
        return _kind_of(vision_cfg)
    raise ValueError(f"unsupported vision model_type {mt!r}; supported: CLIPVisionModel, SiglipVisionModel")


class VisionTower(nn.Module):
    """images [N, C, H, W] -> patch features [N, P, d] (last hidden state, all tokens)."""

    def __init__(self, model: nn.Module, kind: str, frozen: bool = True):
        super().__init__()
        self.model = model
        self.kind = kind
        self.hidden_size = model.config.hidden_size
        self.image_size = model.config.image_size
        self.frozen = frozen
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def image_stats(self):
        return IMAGE_STATS[self.kind]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen tower stays in eval mode (no dropout, fixed norms)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(next(self.model.parameters()).dtype)
        if self.frozen:
            with torch.no_grad():
                return self.model(pixel_values=images).last_hidden_state
        return self.model(pixel_values=images).last_hidden_state


def vision_from_hf(path: str, frozen: bool = True, dtype: torch.dtype = torch.float32) -> VisionTower:
    kind = _kind_of(read_config(path))
    cls = KINDS[kind][1]
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    return VisionTower(model, kind, frozen)


def vision_from_config(kind: str, *, image_size: int, patch_size: int, hidden_size: int, intermediate_size: int,
                       num_layers: int, num_heads: int, frozen: bool = False) -> VisionTower:
    if kind not in KINDS:
        raise ValueError(f"model.vision.kind must be one of {sorted(KINDS)}; got {kind!r}")
    cfg_cls, cls = KINDS[kind]
    cfg = cfg_cls(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_hidden_layers=num_layers, num_attention_heads=num_heads)
    return VisionTower(cls(cfg), kind, frozen)
