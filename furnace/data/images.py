"""Image decoding and normalisation (PIL only; never a pickle decoder).

Matches the vision tower's processor: resize (bicubic) to `image_size` x `image_size`, scale to
[0, 1], normalise with the tower's mean/std (`IMAGE_STATS`: CLIP's, or SigLIP's 0.5 / 0.5).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# (mean, std) each tower family was trained with, by `model.vision.kind`.
IMAGE_STATS = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}

# The only image members shards may carry, and the PIL formats they may decode as.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PIL_FORMATS = ("JPEG", "PNG", "WEBP")


def is_image_member(ext: str) -> bool:
    """`jpg` or an indexed member like `0.jpg` (interleaved documents)."""
    return ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


class ImageTooLarge(ValueError):
    pass


def decode_image(data: bytes, image_size: int, max_pixels: int = 40_000_000) -> np.ndarray:
    """Bytes -> uint8 [image_size, image_size, 3]. Raises on undecodable data, and raises
    ImageTooLarge, before decoding any pixel, when the header declares more than `max_pixels`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge("over PIL's own pixel bound") from None
    if img.width * img.height > max_pixels:
        raise ImageTooLarge(f"{img.width}x{img.height} pixels")
    if img.format == "JPEG":
        img.draft("RGB", (image_size, image_size))  # DCT-domain downscale of big JPEGs (>= target)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)  # read-only view of one copy; the collate copies it again
    if arr.shape != (image_size, image_size, 3):
        raise ValueError(f"decoded image has shape {arr.shape}")
    return arr


def normalize(images_u8: torch.Tensor, mean, std, *, channels_last: bool = True,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [..., H, W, C] (or [..., C, H, W] with channels_last=False) -> float32 [..., C, H, W]
    holding (x / 255 - mean) / std, computed in one fused pass (into `out` when given)."""
    x = images_u8.movedim(-1, -3) if channels_last else images_u8
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = x.to(torch.float32).contiguous()
    if out is None:
        return torch.addcmul(-m / s, x, 1.0 / (255.0 * s))
    return torch.addcmul(-m / s, x, 1.0 / (255.0 * s), out=out)
