"""Fault drills (`debug.faults`): make a run fail on purpose, to see that it recovers.

A comma list of `kind@step[:rank]`:
  inf@3      the loss of step 3 is multiplied by inf (fp16: an overflow the scaler must skip)
  nan@2:1    the loss of step 2 on rank 1 becomes NaN
  die@6      rank 0 dies (os._exit) while saving the step-6 checkpoint: its files are written,
             `latest` has not moved yet
Empty (the default): nothing happens.
"""
from __future__ import annotations

import os

import torch

KINDS = ("inf", "nan", "die")


class Faults:
    def __init__(self, spec: str, rank: int):
        self.rank = rank
        self.specs: list[tuple[str, int, int | None]] = []
        for item in filter(None, (x.strip() for x in spec.split(","))):
            kind, _, where = item.partition("@")
            at, _, rank_s = where.partition(":")
            if kind not in KINDS or not at.isdigit() or (rank_s and not rank_s.isdigit()):
                raise ValueError(f"debug.faults: {item!r} is not kind@step[:rank] with kind in {KINDS}")
            self.specs.append((kind, int(at), int(rank_s) if rank_s else None))

    def corrupt_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        for kind, at, rank in self.specs:
            if kind in ("inf", "nan") and at == step and rank in (None, self.rank):
                return loss * float(kind)
        return loss

    def maybe_die(self, step: int) -> None:
        for kind, at, rank in self.specs:
            if kind == "die" and at == step and (rank if rank is not None else 0) == self.rank:
                os._exit(17)
