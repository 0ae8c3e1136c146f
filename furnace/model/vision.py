"""Frozen (by default) vision tower: HF CLIP or SigLIP, or an open_clip ViT read as an HF CLIP
(`open_clip_io`) -> patch features (`model.vision.features` says which)."""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from furnace.config import VisionConfig
from furnace.data.images import IMAGE_STATS

from .empty import empty, fill
from .hf_io import WeightReader, read_config
from .open_clip_io import OpenClipReader, hf_vision_config, image_stats, is_open_clip

KINDS = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig, SiglipVisionModel)}
# What the resampler reads of the tower's last layer: every token as HF returns it (before the
# final norm, CLIP's class token included); the patch tokens only, before the final norm (what
# open_flamingo trained on: open_clip <= 2.20's output_tokens); or after it (open_clip >= 2.23's).
FEATURES = ("hidden", "patches", "patches_normed")


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
    """images [N, C, H, W] -> patch features [N, P, d] of the last layer, as `features` says
    (FEATURES; the builder sets it from `model.vision.features`)."""

    def __init__(self, model: nn.Module, kind: str, frozen: bool = True):
        super().__init__()
        self.model = model
        self.kind = kind
        self.features = "hidden"
        self.hidden_size = model.config.hidden_size
        self.image_size = model.config.image_size
        self.frozen = frozen
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def blocks(self) -> list[nn.Module]:
        """The encoder layers, in order (the units `model.compile` compiles)."""
        return list(getattr(self.model, "vision_model", self.model).encoder.layers)

    @property
    def image_stats(self):
        """(mean, std) the tower was trained with; the loader normalises images to match."""
        return IMAGE_STATS[self.kind]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen tower stays in eval mode (no dropout, fixed norms)
        return self

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        h = self.model(pixel_values=images).last_hidden_state
        if self.features == "hidden":
            return h
        if self.kind != "clip":
            raise ValueError(f"model.vision.features={self.features!r} drops CLIP's class token; a {self.kind} tower "
                             "has none: use features=hidden")
        h = h[:, 1:]
        norm = getattr(self.model, "vision_model", self.model).post_layernorm  # transformers 4 nests it
        return norm(h) if self.features == "patches_normed" else h

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(next(self.model.parameters()).dtype)
        if self.frozen:
            with torch.no_grad():
                return self._features(images)
        return self._features(images)


def config_of(tower: VisionTower, path: str | None = None) -> VisionConfig:
    """The VisionConfig describing a built tower (for a loaded one: its checkpoint's shape)."""
    hf = tower.model.config
    return VisionConfig(path=path, kind=tower.kind, image_size=hf.image_size, patch_size=hf.patch_size,
                        hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, features=tower.features)


def tower_config(path) -> dict:
    """The HF config of the tower in a local folder: its config.json, or an open_clip folder's
    translated (checked to be CLIP's image statistics, which the loader normalises with)."""
    if not is_open_clip(path):
        return read_config(path)
    stats = image_stats(path)
    if stats is not None and any(abs(a - b) > 1e-4 for x, y in zip(stats, IMAGE_STATS["clip"]) for a, b in zip(x, y)):
        raise ValueError(f"the open_clip tower at {str(path)!r} was trained on images normalised with mean/std {stats}, "
                         "not CLIP's, which furnace's loader uses")
    return hf_vision_config(path)


def tower_reader(path):
    """The tower's weights by HF name: safetensors read in place, or an open_clip folder translated."""
    return OpenClipReader(path) if is_open_clip(path) else WeightReader(path)


def config_from_path(path: str) -> VisionConfig:
    """The VisionConfig of a local HF CLIP/SigLIP (or open_clip ViT) checkpoint, read from its config alone."""
    raw = tower_config(path)
    kind = _kind_of(raw)
    hf = raw.get("vision_config") or raw
    return VisionConfig(path=path, kind=kind, image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 32),
                        hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"])


def vision_from_hf(path: str, frozen: bool = True, dtype: torch.dtype = torch.float32) -> VisionTower:
    if is_open_clip(path):
        tower = vision_skeleton_from_hf(path, frozen)
        reader = tower_reader(path)
        have = set(reader.names())
        missing = [n for n, _ in tower.model.named_parameters() if n not in have]
        if missing:
            raise ValueError(f"the open_clip tower at {str(path)!r} lacks {missing[:3]}")
        fill(tower.model, reader.read, dtype=dtype, where=str(path))
        return tower
    kind = _kind_of(read_config(path))
    cls = KINDS[kind][1]
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    return VisionTower(model, kind, frozen)


def vision_skeleton_from_hf(path: str, frozen: bool = True) -> VisionTower:
    """The tower a local HF CLIP/SigLIP checkpoint folder describes, its parameters on the meta
    device (buffers real): `furnace.parallel.materialize` fills it in, reading the weights once."""
    if is_open_clip(path):
        with empty():
            return VisionTower(CLIPVisionModel(CLIPVisionConfig(**tower_config(path))), "clip", frozen)
    kind = _kind_of(read_config(path))
    cfg_cls, cls = KINDS[kind]
    with empty():
        return VisionTower(cls(cfg_cls.from_pretrained(path, local_files_only=True)), kind, frozen)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sine-cosine position code, patches in row-major order: a quarter
    of the channels each for sin(x), cos(x), sin(y), cos(y) at geometric frequencies."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / max(q, 1))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    code = torch.cat(parts, 1)
    return torch.cat([code, code.new_zeros(grid * grid, dim - code.shape[1])], 1).float()


def init_sincos_positions(model: nn.Module) -> None:
    """Start a from-scratch tower's learned position embeddings at a 2-D sine-cosine code (the
    MAE / MoCo v3 practice). The default N(0, 0.02) start carries almost no position signal next
    to the patch content, so spatial relations are learnt late; the rows stay trainable."""
    emb = model.embeddings.position_embedding.weight
    n, d = emb.shape
    grid = model.config.image_size // model.config.patch_size
    extra = n - grid * grid  # CLIP's class token has a row of its own (left at 0); SigLIP has none
    if extra not in (0, 1):
        raise ValueError(f"{n} position rows for a {grid}x{grid} patch grid")
    with torch.no_grad():
        emb[extra:] = sincos_2d(grid, d).to(emb.dtype)
        emb[:extra] = 0


def vision_from_config(cfg: VisionConfig, frozen: bool = False) -> VisionTower:
    """A tower trained from scratch, shaped by `cfg` (its `path` is not read here)."""
    if cfg.kind not in KINDS:
        raise ValueError(f"model.vision.kind must be one of {sorted(KINDS)}; got {cfg.kind!r}")
    hf_cfg_cls, cls = KINDS[cfg.kind]
    hf_cfg = hf_cfg_cls(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                        num_attention_heads=cfg.num_heads)
    model = cls(hf_cfg)
    if cfg.sincos_positions:
        init_sincos_positions(model)
    return VisionTower(model, cfg.kind, frozen)


def vision_skeleton(cfg: VisionConfig, frozen: bool = False) -> VisionTower:
    """The shape of `vision_from_config(cfg, frozen)`: parameters on the meta device, buffers real."""
    with empty():
        return vision_from_config(cfg, frozen)
