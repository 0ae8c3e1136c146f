"""A deterministic, resumable stream of one source's raw samples for one canonical stream.

Epoch e of a source has a seeded plan: the shard list is permuted with (seed, source, e) and
shard j goes to stream j % streams. With n shards < streams, stream c reads shard c % n and
keeps every m-th of its raw samples (offset c // n), m being the number of streams sharing that
shard: each shard is read by about streams / n streams, never by all. Samples then pass a
shuffle buffer seeded with (seed, source, e, stream). Epochs follow each other forever (or for
`epochs`).
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Iterator

from furnace.data.tar import ReadLimits, iter_shard_samples

MAX_EMPTY_EPOCHS = 3


class Replay:
    """Yields (epoch, raw_index, raw_sample) of stream `stream` of `streams`; raw_index counts
    samples leaving the shuffle buffer within the epoch. Starting at (epoch, skip) fast-forwards
    without decoding."""

    def __init__(self, shards, src_idx, stream, streams, seed, shuffle_buffer, counter, start=(0, 0),
                 epochs=None, limits: ReadLimits = ReadLimits()):
        self.shards, self.src_idx, self.stream, self.streams = shards, src_idx, stream, streams
        self.seed, self.buf, self.counter = seed, shuffle_buffer, counter
        self.start, self.epochs, self.limits = start, epochs, limits

    def plan(self, epoch: int) -> tuple[list[str], int, int]:
        """(shards to read, stride, offset): raw sample i of them is this stream's when i % stride == offset."""
        n = len(self.shards)
        order = list(range(n))
        random.Random(f"shards:{self.seed}:{self.src_idx}:{epoch}").shuffle(order)
        if n >= self.streams:
            return [self.shards[order[j]] for j in range(self.stream, n, self.streams)], 1, 0
        sharing = len(range(self.stream % n, self.streams, n))
        return [self.shards[order[self.stream % n]]], sharing, self.stream // n

    def epoch_raw(self, epoch: int, counter) -> Iterator[dict]:
        urls, stride, offset = self.plan(epoch)
        # When streams share a shard, its own problems are counted by one of them only.
        counter = counter if offset == 0 else Counter()
        i = 0
        for url in urls:
            for s in iter_shard_samples(url, counter, self.limits):
                if i % stride == offset:
                    yield s
                i += 1

    def shuffled(self, epoch: int, counter) -> Iterator[dict]:
        raw = self.epoch_raw(epoch, counter)
        if self.buf <= 1:
            yield from raw
            return
        rng = random.Random(f"buffer:{self.seed}:{self.src_idx}:{epoch}:{self.stream}")
        buf: list = []
        for s in raw:
            buf.append(s)
            if len(buf) >= self.buf:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        epoch, skip = self.start
        empty = 0
        while self.epochs is None or epoch < self.epochs:
            # Counts made while fast-forwarding were recorded before the restart: send them to a
            # throwaway counter until the first new sample.
            sink = CounterProxy(Counter() if skip else self.counter)
            n = 0
            for k, s in enumerate(self.shuffled(epoch, sink)):
                if k < skip:
                    if k == skip - 1:  # reading ahead for sample `skip` counts again
                        sink.target = self.counter
                    continue
                n += 1
                yield epoch, k, s
            sink.target = self.counter
            empty = empty + 1 if (n == 0 and skip == 0) else 0
            if self.epochs is None and empty >= MAX_EMPTY_EPOCHS:
                raise RuntimeError(
                    f"canonical stream {self.stream} of {self.streams} gets no samples from {len(self.shards)} "
                    f"shard(s) of source {self.src_idx}; write more shards or samples, or lower "
                    "data.canonical_streams")
            epoch, skip = epoch + 1, 0


class CounterProxy:
    """`proxy[k] += 1` lands in whichever Counter `target` is at that moment."""

    def __init__(self, target: Counter):
        self.target = target

    def __getitem__(self, k):
        return self.target[k]

    def __setitem__(self, k, v):
        self.target[k] = v
