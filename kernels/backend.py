"""Which implementation runs each kernel: one registry for every op.

    auto       Triton on CUDA tensors, the PyTorch reference elsewhere (and, with a warning, where
               the op's Triton code cannot be imported)
    triton     always Triton: CUDA tensors, or the CPU under TRITON_INTERPRET=1; refused with the
               import error when the op's Triton code is unusable
    reference  always the PyTorch reference
"""
from __future__ import annotations

import functools
import importlib
import warnings

import torch

CHOICES = ("auto", "triton", "reference")
# What each op's Triton path imports (the attention kernels compile at import).
TRITON_MODULES = {"attention": "furnace_kernels.flash_attention", "loss_scale": "triton.language",
                  "media_attention": "furnace_kernels.media_attention_triton",
                  "rms_norm": "furnace_kernels.norms", "add_rms_norm": "furnace_kernels.norms",
                  "swiglu": "furnace_kernels.glu", "rope": "furnace_kernels.rope",
                  "linear_cross_entropy": "furnace_kernels.linear_ce_triton"}
_chosen = dict.fromkeys(TRITON_MODULES, "auto")


@functools.cache
def triton_error(op: str) -> str | None:
    """Why `op`'s Triton code cannot be imported here (None when it can); probed once."""
    try:
        importlib.import_module(TRITON_MODULES[op])
        return None
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return f"{type(e).__name__}: {e}"


def _check(op: str, name: str) -> None:
    if op not in TRITON_MODULES:
        raise ValueError(f"unknown kernel op {op!r}; ops: {', '.join(TRITON_MODULES)}")
    if name not in CHOICES:
        raise ValueError(f"{op} backend must be one of {CHOICES}; got {name!r}")
    if name == "triton" and triton_error(op) is not None:
        raise RuntimeError(f"{op} backend 'triton' needs Triton, which failed to import ({triton_error(op)}); "
                           "install triton or choose the auto or reference backend")


def set_backend(op: str, name: str) -> None:
    _check(op, name)
    _chosen[op] = name


def get_backend(op: str) -> str:
    if op not in _chosen:
        raise ValueError(f"unknown kernel op {op!r}; ops: {', '.join(TRITON_MODULES)}")
    return _chosen[op]


def use_triton(op: str, tensor: torch.Tensor | None, override: str | None = None) -> bool:
    """Whether `op` on `tensor` runs the Triton kernel (`override`: a per-call backend name)."""
    if override is not None:
        _check(op, override)
    elif op not in _chosen:
        raise ValueError(f"unknown kernel op {op!r}; ops: {', '.join(TRITON_MODULES)}")
    name = override or _chosen[op]
    if name != "auto":
        return name == "triton"
    if tensor is None or not tensor.is_cuda:
        return False
    if triton_error(op) is not None:
        warnings.warn(f"Triton cannot run {op} ({triton_error(op)}); it runs the PyTorch reference", stacklevel=3)
        return False
    return True
