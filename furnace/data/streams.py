"""Canonical streams: the training order as a function of (seed, sources and weights, stream),
never of the cluster shape (the scheme: `furnace/data/loader.py` and docs/data.md).

`StreamReader.batches(c, position)` replays canonical stream c from a saved position: per source
a seeded epoch plan and shuffle buffer (`furnace/data/replay.py`), a per-sample weighted choice of
the source, decoding (`furnace/data/samples.py`) and packing into micro-batches. A position is
{"mix": samples drawn, "sources": [[epoch, raw samples taken], ...]}; `merge_states` joins the
positions the ranks hold into the state of the whole stream.
"""
from __future__ import annotations

import random
from collections import Counter

import numpy as np

from furnace.data.replay import MAX_EMPTY_EPOCHS, Replay
from furnace.data.samples import SampleDecoder
from furnace.data.tar import ReadLimits
from furnace.data.text import SkipSample


class StreamReader:
    """The canonical streams of a set of sources; holds settings only, no position."""

    def __init__(self, sources: list[dict], weights, samples: SampleDecoder, *, seed: int, streams: int,
                 shuffle_buffer: int, batch_size: int, epochs: int | None, limits: ReadLimits,
                 pack: tuple[int, int] | None = None):
        """`pack`: (tokens, images) a row holds: samples go into rows back to back (data.pack)."""
        self.sources, self.samples, self.seed, self.n_streams = sources, samples, seed, streams
        self.pack = pack
        self.shuffle_buffer, self.batch_size, self.epochs, self.limits = shuffle_buffer, batch_size, epochs, limits
        w = np.asarray(weights, dtype=np.float64)
        self._cum = np.cumsum(w / w.sum()).tolist()

    def choose(self, stream: int, i: int) -> int:
        """The source of the stream's i-th sample: a seeded, counter-based weighted draw."""
        if len(self.sources) == 1:
            return 0
        u = random.Random(f"mix:{self.seed}:{stream}:{i}").random()
        for s, c in enumerate(self._cum):
            if u < c:
                return s
        return len(self.sources) - 1

    def batches(self, c: int, start: dict, counter: Counter):
        """Canonical stream c's micro-batches from position `start`: (rows, keys, sources, position);
        with packing, each row a pack of sample rows (`_packed`)."""
        if self.pack is not None:
            yield from self._packed(c, start, counter)
            return
        yield from self._batches(c, start, counter)

    def _packed(self, c: int, start: dict, counter: Counter):
        """Samples in stream order, greedily into rows of at most `pack` tokens and images; a
        batch is `batch_size` rows. The sample that closes a batch's last row opens the next
        batch: the batch's position is the one before it, so a resumed stream reads it again and
        packs exactly what the uninterrupted one does."""
        max_tokens, max_images = self.pack
        packs, cur, keys, srcs = [], [], [], []
        used = [0, 0]
        for row, key, src, before, after in self._samples(c, start, counter):
            n_tok, n_img = len(row[0]), len(row[1])
            if cur and (used[0] + n_tok > max_tokens or used[1] + n_img > max_images):
                packs.append(cur)
                cur, used = [], [0, 0]
                if len(packs) == self.batch_size:
                    yield packs, keys, srcs, before
                    packs, keys, srcs = [], [], []
            cur.append(row)
            keys.append(key)
            srcs.append(src)
            used[0] += n_tok
            used[1] += n_img
            last = after
        if cur:
            packs.append(cur)
        if packs:
            yield packs, keys, srcs, last

    def _samples(self, c: int, start: dict, counter: Counter):
        """Canonical stream c's decoded samples from position `start`: (row, key, source,
        position before it, position after it)."""
        for rows, keys, srcs, pos, before in self._batches(c, start, counter, one=True):
            yield rows[0], keys[0], srcs[0], before, pos

    def _batches(self, c: int, start: dict, counter: Counter, one: bool = False):
        streams = [iter(Replay(src["urls"], si, c, self.n_streams, self.seed, self.shuffle_buffer, counter,
                               start=tuple(start["sources"][si]), epochs=self.epochs, limits=self.limits))
                   for si, src in enumerate(self.sources)]
        pos = [list(x) for x in start["sources"]]
        last_good = [p[0] for p in pos]  # epoch of the last good sample per source
        i = start["mix"]
        exhausted = [False] * len(streams)
        rows, keys, srcs = [], [], []
        while not all(exhausted):
            s = self.choose(c, i)
            if exhausted[s]:
                s = next(k for k in range(len(streams)) if not exhausted[k])
            got = False
            while not got:
                try:
                    e, k, raw = next(streams[s])
                except StopIteration:
                    exhausted[s] = True
                    break
                at = {"mix": i, "sources": [list(p) for p in pos]}  # the position before this sample
                at["sources"][s] = [e, k]
                pos[s] = [e, k + 1]
                try:
                    rows.append(self.samples.row(raw))
                    keys.append(raw["__key__"])
                    srcs.append(s)
                    got = True
                    last_good[s] = e
                except SkipSample as x:
                    counter[x.reason] += 1
                    if e - last_good[s] >= MAX_EMPTY_EPOCHS:  # fail loudly rather than spin forever
                        raise RuntimeError(
                            f"canonical stream {c} found no usable sample in "
                            f"{MAX_EMPTY_EPOCHS} epochs of {self.sources[s]['name']!r}; skipped so far: "
                            f"{dict(counter)}") from None
            if got:
                i += 1
            if rows and (len(rows) == (1 if one else self.batch_size) or all(exhausted)):
                after = {"mix": i, "sources": [list(p) for p in pos]}
                yield (rows, keys, srcs, after, at) if one else (rows, keys, srcs, after)
                rows, keys, srcs = [], [], []


def copy_pos(p: dict) -> dict:
    return {"mix": int(p["mix"]), "sources": [[int(e), int(k)] for e, k in p["sources"]]}


def merge_states(states: list[dict]) -> dict:
    """One loader state from the states of all ranks (tp/pp peers repeat their dp rank's)."""
    out = {k: states[0][k] for k in ("version", "fingerprint", "micro_batches", "dp_size")}
    out["streams"], out["skipped"] = {}, {}
    for st in states:
        if st["micro_batches"] != out["micro_batches"] or st["fingerprint"] != out["fingerprint"]:
            raise ValueError("loader states of the ranks disagree (micro-batch count or fingerprint): "
                             "the ranks are out of lockstep")
        out["streams"].update(st["streams"])
        out["skipped"].update(st["skipped"])
    return out
