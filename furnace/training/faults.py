"""Fault drills (`debug.faults`): make a run fail on purpose, to see that it recovers.

A comma list of `kind@step[:rank]` (syntax checked by `furnace.config.validate`):
  inf@3          the loss of step 3 is multiplied by inf (fp16: an overflow the scaler must skip)
  nan@2:1        the loss of step 2 on rank 1 becomes NaN
  die-write@6    rank 0 dies (os._exit) while writing the step-6 checkpoint: some files are written
  die-marker@6   ... after every file is written and fsynced, before the tag is marked complete
  die-latest@6   ... after the tag is marked complete, before `latest` names it
Empty (the default): nothing happens.
"""
from __future__ import annotations

import os

import torch

from furnace.config import parse_faults


class Faults:
    def __init__(self, spec: str, rank: int):
        self.rank = rank
        self.specs = parse_faults(spec)

    def corrupt_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        for kind, at, rank in self.specs:
            if kind in ("inf", "nan") and at == step and rank in (None, self.rank):
                return loss * float(kind)
        return loss

    def maybe_die(self, step: int, point: str) -> None:
        """`point`: write | marker | latest, the stage of a checkpoint save."""
        for kind, at, rank in self.specs:
            if kind == f"die-{point}" and at == step and (rank if rank is not None else 0) == self.rank:
                os._exit(17)
