"""Shard sources: brace patterns expanded to shard paths, and the mixing weights of several.

`data.train_shards` names several sources separated by ';', weighted by `data.train_weights`
("0.7,0.3"); `data.val_shards` is read in order, unweighted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from webdataset.shardlists import expand_urls

from furnace.config import ConfigError, split_sources


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


def drawn_on_demand(pattern: str, data_cfg) -> bool:
    """The pattern names the synthetic set's own shards, which are drawn when missing."""
    home = data_cfg.synthetic_dir
    return bool(home) and os.path.abspath(pattern).startswith(os.path.abspath(home).rstrip("/") + "/")


def check_sources(data_cfg, *, training: bool = True) -> None:
    """Before any process group: training has shards, and every source of data.train_shards and
    data.val_shards names at least one existing shard (the synthetic set's own, drawn on first
    use, excepted). One ConfigError line naming the key and the pattern otherwise."""
    if training and not split_sources(data_cfg.train_shards):
        raise ConfigError("data.train_shards is empty: point it at your shards (furnace-shards writes them), e.g. "
                          "--set data.train_shards='data/mine/train-{000000..000009}.tar', or train the demo "
                          "with --config demo")
    for key in ("train_shards", "val_shards") if training else ("val_shards",):
        for pattern in split_sources(getattr(data_cfg, key)):
            try:
                files = expand_shards(pattern)
            except ValueError as e:
                raise ConfigError(f"data.{key}: {pattern!r} is not a shard pattern ({e})") from None
            if not any(os.path.isfile(f) for f in files) and not drawn_on_demand(pattern, data_cfg):
                raise ConfigError(f"data.{key}: no shard matches {pattern!r} ({len(files)} paths, first "
                                  f"{files[0]!r}); write shards first (furnace-shards) or fix data.{key}")


def sources_from_config(data_cfg, split: str) -> tuple[list[Source], bool]:
    """(sources, training) for split "train" (weighted, infinite) or "val" (one pass)."""
    if split == "train":
        patterns = split_sources(data_cfg.train_shards)
        wspec = data_cfg.train_weights
        weights = [float(x) for x in str(wspec).split(",")] if wspec else [1.0] * len(patterns)
        if len(weights) != len(patterns):
            raise ValueError(f"data.train_weights has {len(weights)} values for {len(patterns)} sources")
        return [Source(p, w) for p, w in zip(patterns, weights)], True
    if split in ("val", "eval"):
        return [Source(p) for p in split_sources(data_cfg.val_shards)], False
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
