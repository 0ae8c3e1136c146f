"""Models built without weights and filled in tensor by tensor, so that loading never holds a
freshly drawn copy next to the loaded one.

`empty()` is accelerate's `init_empty_weights`: parameters are made on the meta device, buffers
(position ids, rotary frequencies) stay real, as a loaded model needs them.
`fill(model, read)` then replaces every meta parameter by `read(name)`, one at a time.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def empty():
    """The context to build a module's shape in (parameters on meta, buffers real)."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def persistent_buffers(model: nn.Module) -> list[str]:
    """The names of the buffers a state_dict of `model` holds (not the non-persistent ones)."""
    keys = set(model.state_dict(keep_vars=True))
    return [n for n, _ in model.named_buffers() if n in keys]


def stored_names(model: nn.Module) -> list[str]:
    """What a weights file of `model` holds, in model order: each parameter once (a tied one under
    its first name) and the persistent buffers."""
    return [n for n, _ in model.named_parameters()] + persistent_buffers(model)


def replace_parameters(model: nn.Module, new: dict[int, nn.Parameter]) -> None:
    """Every reference to an old parameter (by id), tied ones included, now points at its new one."""
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None and id(p) in new:
                mod._parameters[k] = new[id(p)]


def filled(like: nn.Parameter, value: torch.Tensor, *, dtype: torch.dtype | None = None, device=None) -> nn.Parameter:
    """A real parameter holding `value` (cast and moved when asked) to stand in for the meta one
    `like`: its requires_grad and its attributes (tensor-parallel marks) carried over."""
    q = nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=like.requires_grad)
    q.__dict__.update(like.__dict__)
    return q


def fill(model: nn.Module, read: Callable[[str], torch.Tensor], *, dtype: torch.dtype | None = None,
         where: str = "the checkpoint") -> None:
    """Every meta parameter of `model` from `read(name)` (its name in `model.named_parameters()`;
    a tied parameter is read once, under its first name), cast to `dtype` when given."""
    new: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if not p.is_meta:
            continue
        t = read(name)
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{name} is {tuple(t.shape)} in {where} but {tuple(p.shape)} in the model it builds")
        new[id(p)] = filled(p, t, dtype=dtype)
    replace_parameters(model, new)
