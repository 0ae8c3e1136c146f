"""Rank grid (pp, dp, tp) with tp fastest, then dp, then pp, and the process groups.

The same order as Megatron and DeepSpeed's PipeModelDataParallelTopology, so a DeepSpeed
PipelineModule built with this grid agrees on which ranks are stage peers. `Topology` doubles
as the `mpu` object `deepspeed.initialize(mpu=...)` expects: ZeRO then partitions over the
data-parallel group only, and tensor-parallel peers keep identical optimizer shards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Coord:
    pp: int
    dp: int
    tp: int


class Topology:
    def __init__(self, tp: int = 1, pp: int = 1, world_size: int | None = None, rank: int | None = None,
                 create_groups: bool = True):
        self.world_size = world_size if world_size is not None else dist.get_world_size()
        self.rank = rank if rank is not None else dist.get_rank()
        if self.world_size % (tp * pp):
            raise ValueError(f"world size {self.world_size} is not divisible by tp*pp = {tp * pp}")
        self.tp, self.pp = tp, pp
        self.dp = self.world_size // (tp * pp)
        self.coord = self.coord_of(self.rank)
        self._groups: dict[str, object] = {}
        if create_groups:
            self._create_groups()

    # -------------------------------------------------------------- pure rank arithmetic

    def coord_of(self, rank: int) -> Coord:
        return Coord(pp=rank // (self.dp * self.tp), dp=(rank // self.tp) % self.dp, tp=rank % self.tp)

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def group_ranks(self, axis: str) -> list[list[int]]:
        """All groups along one axis: ranks that differ only in that coordinate."""
        sizes = {"pp": self.pp, "dp": self.dp, "tp": self.tp}
        others = [a for a in ("pp", "dp", "tp") if a != axis]
        groups = []
        for i in range(sizes[others[0]]):
            for j in range(sizes[others[1]]):
                fixed = {others[0]: i, others[1]: j}
                groups.append([self.rank_of(**{**fixed, axis: k}) for k in range(sizes[axis])])
        return groups

    def model_parallel_ranks(self) -> list[list[int]]:
        """Ranks sharing one dp index (all tp and pp peers): one model replica."""
        return [[self.rank_of(p, d, t) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]

    def _create_groups(self) -> None:
        # Every rank must create every group, in the same order (torch.distributed's rule).
        for axis in ("tp", "dp", "pp"):
            for ranks in self.group_ranks(axis):
                g = dist.new_group(ranks)
                if self.rank in ranks:
                    self._groups[axis] = g
        for ranks in self.model_parallel_ranks():
            g = dist.new_group(ranks)
            if self.rank in ranks:
                self._groups["mp"] = g

    # -------------------------------------------------------------- the mpu interface DeepSpeed uses

    def get_data_parallel_group(self):
        return self._groups["dp"]

    def get_data_parallel_rank(self) -> int:
        return self.coord.dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_model_parallel_group(self):
        return self._groups["mp"]

    def get_model_parallel_rank(self) -> int:
        return self.coord.pp * self.tp + self.coord.tp

    def get_model_parallel_world_size(self) -> int:
        return self.tp * self.pp

    def get_tensor_model_parallel_group(self):
        return self._groups["tp"]

    def get_tensor_model_parallel_rank(self) -> int:
        return self.coord.tp

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_pipe_parallel_group(self):
        return self._groups["pp"]

    def get_pipe_parallel_rank(self) -> int:
        return self.coord.pp

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp

    def __repr__(self) -> str:
        return f"Topology(tp={self.tp}, dp={self.dp}, pp={self.pp}, rank={self.rank}, coord={self.coord})"
