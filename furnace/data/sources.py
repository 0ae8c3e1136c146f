"""Shard sources: brace patterns expanded to shard paths, and the mixing weights of several.

`data.train_shards` names several sources separated by ';', weighted by `data.train_weights`
("0.7,0.3"); `data.val_shards` is read in order, unweighted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from webdataset.shardlists import expand_urls


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Brace patterns ("a-{000000..000003}.tar"), "::"-joined lists, or a list of them."""
    if isinstance(spec, (str, os.PathLike)):
        return list(expand_urls(os.fspath(spec)))
    out: list[str] = []
    for s in spec:
        out.extend(expand_shards(s))
    return out


@dataclass
class Source:
    """One shard set to mix: `shards` is a brace pattern or a list of paths."""
    shards: str | Sequence[str]
    weight: float = 1.0
    name: str | None = None


def sources_from_config(data_cfg, split: str) -> tuple[list[Source], bool]:
    """(sources, training) for split "train" (weighted, infinite) or "val" (one pass)."""
    if split == "train":
        patterns = [p.strip() for p in data_cfg.train_shards.split(";") if p.strip()]
        wspec = data_cfg.train_weights
        weights = [float(x) for x in str(wspec).split(",")] if wspec else [1.0] * len(patterns)
        if len(weights) != len(patterns):
            raise ValueError(f"data.train_weights has {len(weights)} values for {len(patterns)} sources")
        return [Source(p, w) for p, w in zip(patterns, weights)], True
    if split in ("val", "eval"):
        return [Source(p) for p in data_cfg.val_shards.split(";") if p.strip()], False
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
