"""Which implementation runs each kernel: one registry for every op.

    auto       Triton on CUDA tensors, the PyTorch reference elsewhere (and, with a warning, where
               Triton cannot be imported)
    triton     always Triton: CUDA tensors, or the CPU under TRITON_INTERPRET=1; refused with the
               import error when Triton is unusable
    reference  always the PyTorch reference
"""
from __future__ import annotations

import warnings

import torch

CHOICES = ("auto", "triton", "reference")
OPS = ("attention", "loss_scale")
_chosen = dict.fromkeys(OPS, "auto")
_triton_error: list = []  # [] = not probed yet; [None] = importable; [message] = why not


def triton_error() -> str | None:
    """Why Triton cannot be imported here (None when it can); probed once."""
    if not _triton_error:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _triton_error.append(None)
        except Exception as e:  # ImportError, or a broken install raising anything at import
            _triton_error.append(f"{type(e).__name__}: {e}")
    return _triton_error[0]


def _check(op: str, name: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; ops: {', '.join(OPS)}")
    if name not in CHOICES:
        raise ValueError(f"{op} backend must be one of {CHOICES}; got {name!r}")
    if name == "triton" and triton_error() is not None:
        raise RuntimeError(f"{op} backend 'triton' needs Triton, which failed to import ({triton_error()}); "
                           "install triton or choose the auto or reference backend")


def set_backend(op: str, name: str) -> None:
    _check(op, name)
    _chosen[op] = name


def get_backend(op: str) -> str:
    return _chosen[op]


def use_triton(op: str, tensor: torch.Tensor | None, override: str | None = None) -> bool:
    """Whether `op` on `tensor` runs the Triton kernel (`override`: a per-call backend name)."""
    name = override or _chosen[op]
    _check(op, name)
    if name != "auto":
        return name == "triton"
    if tensor is None or not tensor.is_cuda:
        return False
    if triton_error() is not None:
        warnings.warn(f"Triton cannot be imported ({triton_error()}); {op} runs the PyTorch reference", stacklevel=3)
        return False
    return True
