"""Fault injection for the failure tests, driven by FURNACE_FAULT (never set in normal runs).

FURNACE_FAULT is a comma list of `kind@step[:rank]`:
  inf@3      the loss of step 3 is multiplied by inf (fp16: an overflow the scaler must skip)
  nan@2:1    the loss of step 2 on rank 1 becomes NaN
  die@6      rank 0 dies (os._exit) while saving the step-6 checkpoint: its files are written,
             `latest` has not moved yet
"""
from __future__ import annotations

import os

import torch


def _specs():
    raw = os.environ.get("FURNACE_FAULT", "")
    for item in filter(None, (x.strip() for x in raw.split(","))):
        kind, _, where = item.partition("@")
        at, _, rank = where.partition(":")
        yield kind, at, (int(rank) if rank else None)


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def corrupt_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    for kind, at, rank in _specs():
        if kind in ("inf", "nan") and at == str(step) and rank in (None, _rank()):
            return loss * float(kind)
    return loss


def maybe_die(step: int) -> None:
    for kind, at, rank in _specs():
        if kind == "die" and at == str(step) and (rank if rank is not None else 0) == _rank():
            os._exit(17)
