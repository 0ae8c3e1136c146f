"""A deterministic, resumable stream of one source's raw samples for one loader slot.

Epoch e of a source has a seeded plan: the shard list is permuted with (seed, source, e) and
shard j goes to slot j % slots; with fewer shards than slots every slot reads every shard and
keeps raw sample i when i % slots == slot. Samples then pass a shuffle buffer seeded with
(seed, source, e, slot). Epochs follow each other forever (or for `epochs`).
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Iterator

from furnace.data.tar import ReadLimits, iter_shard_samples

MAX_EMPTY_EPOCHS = 3


class Replay:
    """Yields (epoch, raw_index, raw_sample); raw_index counts samples leaving the shuffle
    buffer within the epoch. Starting at (epoch, skip) fast-forwards without decoding."""

    def __init__(self, shards, src_idx, slot, slots, seed, shuffle_buffer, counter, start=(0, 0),
                 epochs=None, limits: ReadLimits = ReadLimits()):
        self.shards, self.src_idx, self.slot, self.slots = shards, src_idx, slot, slots
        self.seed, self.buf, self.counter = seed, shuffle_buffer, counter
        self.start, self.epochs, self.limits = start, epochs, limits

    def plan(self, epoch: int) -> tuple[list[str], int, int]:
        order = list(range(len(self.shards)))
        random.Random(f"shards:{self.seed}:{self.src_idx}:{epoch}").shuffle(order)
        if len(self.shards) >= self.slots:
            return [self.shards[order[j]] for j in range(self.slot, len(order), self.slots)], 1, 0
        return [self.shards[o] for o in order], self.slots, self.slot

    def epoch_raw(self, epoch: int, counter) -> Iterator[dict]:
        urls, stride, offset = self.plan(epoch)
        # When slots share shards, each shard's own problems are counted by one slot only.
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
        rng = random.Random(f"buffer:{self.seed}:{self.src_idx}:{epoch}:{self.slot}")
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
                    f"data slot {self.slot} of {self.slots} gets no samples from {len(self.shards)} "
                    f"shard(s) of source {self.src_idx}; use fewer dp ranks x workers or more shards")
            epoch, skip = epoch + 1, 0


class CounterProxy:
    """`proxy[k] += 1` lands in whichever Counter `target` is at that moment."""

    def __init__(self, target: Counter):
        self.target = target

    def __getitem__(self, k):
        return self.target[k]

    def __setitem__(self, k, v):
        self.target[k] = v
