"""`data.max_length: 0`: the row length read off the data, for presets that fit any dataset."""
from __future__ import annotations

from collections import Counter

from furnace.config import split_sources
from furnace.data.samples import SampleDecoder
from furnace.data.sources import expand_shards
from furnace.data.tar import ReadLimits, iter_shard_samples
from furnace.data.text import TextEncoder


def longest_sample(data_cfg, tokenizer, cap: int, n: int = 1000) -> int:
    """Tokens in the longest of the first `n` usable samples of each training source (its shards
    in name order), rounded up to a multiple of 8 and capped at `cap` (the LM's positions); longer
    samples are then skipped as too_long, documents cut. Reads text only: no image is decoded.
    Deterministic, so every rank finds the same length without talking to the others."""
    decoder = SampleDecoder(TextEncoder(tokenizer, cap, data_cfg.max_images), image_size=1)
    limits = ReadLimits.from_config(data_cfg)
    longest = 4
    for source in split_sources(data_cfg.train_shards):
        longest = max(longest, _longest_in(source, decoder, limits, n))
    return min(cap, -(-longest // 8) * 8)


def _longest_in(source: str, decoder: SampleDecoder, limits: ReadLimits, n: int) -> int:
    longest, seen = 0, 0
    for url in sorted(expand_shards(source)):
        for raw in iter_shard_samples(url, Counter(), limits):
            if "__skip__" in raw:
                continue
            try:
                ids = decoder.parse(raw)[0]
            except Exception:  # SkipSample, or whatever else a bad sample raises: the loader skips it too
                continue
            longest, seen = max(longest, len(ids)), seen + 1
            if seen >= n:
                return longest
    return longest
