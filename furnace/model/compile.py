"""`model.compile`: torch.compile for the media path, one block at a time.

Each encoder layer of the vision tower and each attention / feed-forward module of the resampler
gets its `forward` replaced by a compiled one. Per block rather than whole: the graphs stay small,
and the module hooks that ZeRO-3 and the tensor-parallel mappings rely on run outside the
compiled code, as they would in eager mode. Parameter names, state dicts and checkpoints are unchanged.

The tower's batch (the valid images of a step) varies; after the first recompile torch marks
that dimension dynamic instead of compiling once per size.
"""
from __future__ import annotations

import torch
import torch.nn as nn

PARTS = ("vision", "perceiver")


def compile_parts(value: str) -> list[str]:
    """`model.compile`'s parts: "none" -> [], "vision,perceiver" -> both."""
    return [] if value.strip() in ("", "none") else [p.strip() for p in value.split(",")]


def compile_media(model: nn.Module, parts: list[str]) -> int:
    """Compile the named parts' blocks of a FlamingoModel in place; the number compiled."""
    blocks: list[nn.Module] = []
    if "vision" in parts:
        blocks += model.vision.blocks()
    if "perceiver" in parts:
        blocks += model.perceiver.blocks()
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return len(blocks)
