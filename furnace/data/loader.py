"""Streaming webdataset loader -> padded Flamingo batches, with exact resume.

    loader = ShardLoader("data/demo/train-{000000..000015}.tar", tokenizer, batch_size=16,
                         dp_rank=r, dp_size=dp, seed=1234, image_size=32, num_workers=1)
    loader = ShardLoader.from_config(cfg.data, tokenizer, split="train", batch_size=16, ...)
    it = iter(loader); batch = next(it)     # {input_ids, labels, attention_mask, images, media_valid}
    state = loader.state_dict()             # after any number of batches
    loader2 = ShardLoader(...same args...); loader2.load_state_dict(state)
    # iter(loader2) yields exactly the batches `it` would have yielded next

Batches follow the contract in `furnace/data/collate.py`; with `pack=True` (data.pack) training
rows hold several samples each, with position and segment ids (`collate_packed`). `frames`
(data.video_frames) is F, the frames each medium has in the batch: clips and frame folders are
sampled to F frames, stills repeated (`furnace/data/samples.py`). `audio` (an AudioSpec: a run with
an audio tower) reads audio clips too, into the batch's audio / audio_valid (`collate.py`).

Training mode (`training=True`, the default) is an infinite stream whose order depends on the
seed, the sources and their weights, never on the cluster shape. It is cut into C canonical
streams (`canonical_streams`). Each stream replays each source's seeded epoch plan and shuffle
buffer (`furnace/data/replay.py`), mixes sources per sample with a counter-based seeded choice
(seed, stream, sample index) weighted by `weight`, decodes and tokenises the samples
(`furnace/data/samples.py`) and packs micro-batches of `batch_size`. Global micro-batch j is the
next micro-batch of stream j % C; data-parallel rank r of D (D divides C) takes the micro-batches
j = r, r + D, r + 2D ... and so reads only streams r, r + D, ... (their shards, never another
rank's samples). With a global batch of G micro-batches a step, step s is micro-batches
[sG, (s+1)G) for every D: the same samples in the same micro-batches on 1 rank or 64.
Worker w of a rank owns the streams w, w + W, ... of its list (W divides C / D) and makes the
rank's micro-batches t = w, w + W, ... (torch DataLoader's in-order round robin). Epochs follow
each other, so no rank ever runs dry and ranks stay in lockstep; a stream with fewer samples
starts its next epoch earlier: count training in steps, not epochs.

Exact resume: each batch carries its stream's position (per source: epoch and number of raw
samples taken from that epoch's shuffled stream; the mixing counter). `state_dict()` holds this
rank's streams and the global micro-batch count; `streams.merge_states` joins all ranks' into
one state that any data-parallel size dividing C resumes from. A resumed stream rebuilds the epoch plan and
shuffle buffer and fast-forwards over the raw samples it already used without decoding them
(cost: re-reading at most one epoch of that stream's tar bytes per source; no image decode, no
tokenisation). Resuming needs the same sources, seed, batch_size, canonical_streams,
shuffle_buffer and max_length/max_images (checked: a mismatch raises).

Evaluation mode (`training=False`): one pass, no shuffling; every worker reads every shard in
name order; raw sample i goes to dp rank i % dp_size, that rank's j-th sample to batch
j // batch_size, batch k to worker k % num_workers. Every rank yields the same number of batches
(ceil(ceil(N / dp_size) / batch_size)); a batch made short by corrupt samples is smaller, and one
left with no sample holds a single filler row (labels all IGNORE_INDEX, no image, media_valid
False) that metrics must skip (`TextEncoder.reference_caption` returns None for it).

Corrupt data never raises: truncated/unreadable shards, undecodable images or clips, clips with
fewer than F frames, audio clips that are undecodable, at another rate, too long or too short,
missing captions or images, bad JSON, over-long captions are skipped and counted by reason in `loader.skipped`
(included in the state dict). Which members are read at all: `furnace/data/tar.py`.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from furnace.data.audio import AudioSpec
from furnace.data.collate import collate, collate_packed
from furnace.data.images import CLIP_MEAN, CLIP_STD
from furnace.data.samples import SampleDecoder
from furnace.data.sources import Source, expand_shards, sources_from_config
from furnace.data.streams import StreamReader, copy_pos
from furnace.data.tar import MEMBER_REASONS, SHARD_REASONS, ReadLimits, iter_shard_samples
from furnace.data.text import SkipSample, TextEncoder
from furnace.data.video import MAX_VIDEO_FRAMES

STATE_VERSION = 2
log = logging.getLogger(__name__)


class _Dataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs; holds no torch state of its own. DataLoader worker j
    makes the rank's micro-batches t0 + j, t0 + j + W, ..."""

    def __init__(self, loader: "ShardLoader", t0: int):
        self.loader, self.t0 = loader, t0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        j = 0 if info is None else info.id
        if self.loader.training:
            yield from self.loader._train_worker(self.t0 + j)
        else:
            yield from self.loader._eval_worker(j)


def _identity(x):
    return x


def _leave_stop_signals_to_the_rank(_worker_id):
    """SIGINT and SIGTERM (a terminal's Ctrl-C, a scheduler's kill of the process group) reach
    the workers too: the rank stops at the end of its step and saves, so a worker must not end
    itself on them (torch's worker handlers would) and break that step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ShardLoader:
    """Streaming loader over webdataset shards; see the module docstring for the scheme.

    sources: brace pattern / list of paths / Source / list of Source (weighted mixing).
    mean/std: the vision tower's normalisation (CLIP's by default; SigLIP: 0.5/0.5).
    canonical_streams: the training order's streams (a multiple of dp_size); num_workers is
    lowered to the largest divisor of canonical_streams / dp_size it does not exceed.
    """

    def __init__(self, sources, tokenizer, *, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, max_length: int = 64, max_images: int = 1, image_size: int = 224,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 num_workers: int = 0, canonical_streams: int = 64, shuffle_buffer: int = 128,
                 training: bool = True, epochs: int | None = None, pad_to_max_length: bool = True,
                 prefetch_factor: int = 2, pin_memory: bool = False, multiprocessing_context: str | None = None,
                 check_files: bool = True, limits: ReadLimits = ReadLimits(), max_image_pixels: int = 40_000_000,
                 pack: bool = False, frames: int = 1, max_video_frames: int = MAX_VIDEO_FRAMES,
                 audio: AudioSpec | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if batch_size < 1 or max_length < 4 or max_images < 1 or image_size < 1 or frames < 1:
            raise ValueError("batch_size >= 1, max_length >= 4, max_images >= 1, image_size >= 1 and frames >= 1 "
                             "are required")
        if training and (canonical_streams < 1 or canonical_streams % dp_size):
            raise ValueError(f"data.canonical_streams={canonical_streams} is not a multiple of the data-parallel "
                             f"size {dp_size}; set it to a multiple of {dp_size}")
        self.sources = self._normalise_sources(sources)
        for src in self.sources:
            if check_files and not any(os.path.isfile(p) for p in src["urls"]):
                raise FileNotFoundError(f"no shard of {src['name']!r} exists ({len(src['urls'])} paths, first "
                                        f"{src['urls'][0]!r}); write shards first (furnace-shards / "
                                        "python -m furnace.data.synthetic)")
        self.tokenizer = tokenizer
        self.encoder = TextEncoder(tokenizer, max_length, max_images)
        self.samples = SampleDecoder(self.encoder, image_size, max_image_pixels, frames, max_video_frames, audio)
        self.frames = frames
        self.audio_samples = 0 if audio is None else audio.samples
        self.limits = limits
        self.batch_size, self.dp_rank, self.dp_size, self.seed = batch_size, dp_rank, dp_size, seed
        self.max_length, self.max_images, self.image_size = max_length, max_images, image_size
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        self.streams = canonical_streams
        # this rank's streams, in the order its micro-batches cycle through them
        self.my_streams = list(range(dp_rank, canonical_streams, dp_size)) if training else []
        wanted = max(1, num_workers)
        if training:  # a worker owns whole streams: the worker count must divide the rank's streams
            wanted = max(w for w in range(1, wanted + 1) if len(self.my_streams) % w == 0)
            if num_workers > 0 and wanted != num_workers:
                log.warning("data.num_workers=%d lowered to %d: a worker count must divide this rank's %d "
                            "canonical streams", num_workers, wanted, len(self.my_streams))
        self.num_workers_eff = wanted
        self.num_workers = wanted if num_workers > 0 else 0
        self.shuffle_buffer = shuffle_buffer if training else 0
        self.training, self.epochs = training, epochs
        self.pad_to_max = pad_to_max_length
        self.prefetch_factor = prefetch_factor
        self.pin_memory, self.mp_context = pin_memory, multiprocessing_context
        weights = np.array([s["weight"] for s in self.sources], dtype=np.float64)
        if (weights <= 0).any():
            raise ValueError("source weights must be positive")
        self.pack = pack and training  # evaluation rows stay one sample each
        self.reader = StreamReader(self.sources, weights, self.samples, seed=seed, streams=canonical_streams,
                                   shuffle_buffer=self.shuffle_buffer, batch_size=batch_size, epochs=epochs,
                                   limits=limits, pack=(max_length, max_images) if self.pack else None)
        self._reset_state()

    @classmethod
    def from_config(cls, data_cfg, tokenizer, *, split: str = "train", batch_size: int, dp_rank: int = 0,
                    dp_size: int = 1, seed: int = 0, image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
                    num_workers: int | None = None, audio_rate: int = 0, audio_samples: int = 0,
                    pin_memory: bool = False) -> "ShardLoader":
        """The train (infinite, shuffled, resumable) or val (one pass) loader of a DataConfig;
        `audio_rate` / `audio_samples`: the audio tower's rate and window (0: no audio);
        `pin_memory`: workers hand on page-locked batches (a copy to the GPU that does not block)."""
        sources, training = sources_from_config(data_cfg, split)
        audio = (AudioSpec(audio_rate, audio_samples, data_cfg.max_audio_seconds, data_cfg.min_audio_seconds)
                 if audio_samples else None)
        return cls(sources, tokenizer, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                   max_length=data_cfg.max_length, max_images=data_cfg.max_images, image_size=image_size,
                   mean=mean, std=std, num_workers=data_cfg.num_workers if num_workers is None else num_workers,
                   canonical_streams=data_cfg.canonical_streams, shuffle_buffer=data_cfg.shuffle_buffer,
                   training=training, limits=ReadLimits.from_config(data_cfg),
                   max_image_pixels=data_cfg.max_image_pixels, pack=data_cfg.pack, frames=data_cfg.video_frames,
                   max_video_frames=data_cfg.max_video_frames, audio=audio, pin_memory=pin_memory)

    # ------------------------------------------------------------------ config helpers
    @staticmethod
    def _normalise_sources(sources) -> list[dict]:
        if isinstance(sources, (str, os.PathLike, Source)):
            sources = [sources]
        elif isinstance(sources, (list, tuple)) and sources and all(isinstance(s, (str, os.PathLike)) for s in sources):
            sources = [Source(list(sources))]
        out = []
        for i, s in enumerate(sources):
            if not isinstance(s, Source):
                s = Source(s)
            urls = expand_shards(s.shards)
            if not urls:
                raise ValueError(f"source {i} has no shards")
            out.append({"urls": urls, "weight": float(s.weight),
                        "name": s.name or (s.shards if isinstance(s.shards, str) else f"source{i}")})
        if not out:
            raise ValueError("no data sources given")
        return out

    def _fingerprint(self) -> dict:
        """What the sample order depends on (the cluster shape is not part of it)."""
        return {"sources": [[s["urls"], s["weight"]] for s in self.sources], "seed": self.seed,
                "batch_size": self.batch_size, "canonical_streams": self.streams,
                "shuffle_buffer": self.shuffle_buffer, "max_length": self.max_length,
                "max_images": self.max_images, "training": self.training, **({"pack": True} if self.pack else {})}

    def _reset_state(self):
        fresh = {"mix": 0, "sources": [[0, 0] for _ in self.sources]}
        self._positions = {c: copy_pos(fresh) for c in self.my_streams}
        self._batches = 0
        self._skip_base: Counter = Counter()
        self._worker_skips: list[Counter] = [Counter() for _ in range(self.num_workers_eff)]
        self.last_keys: list[str] = []      # sample keys of the last batch (tests, debugging)
        self.last_sources: list[int] = []   # source index of each of those samples
        self.last_meta: dict = {}           # worker id, stream, position, CPU seconds of the producing process

    # ------------------------------------------------------------------ per-sample work
    def _batch(self, rows) -> dict:
        """Rows (or packs of rows, `data.pack`) -> the batch."""
        return (collate_packed if self.pack else collate)(
            rows, self.encoder, max_length=self.max_length, max_images=self.max_images, image_size=self.image_size,
            mean=self.mean, std=self.std, pad_to_max=self.pad_to_max, frames=self.frames,
            audio_samples=self.audio_samples)

    # ------------------------------------------------------------------ worker bodies
    def _train_worker(self, t: int):
        """Micro-batches t, t + W, t + 2W ... of this rank; micro-batch t comes from its stream
        t % len(my_streams), so this worker reads only the streams w, w + W, ... of that list."""
        W, L = self.num_workers_eff, len(self.my_streams)
        w = t % W
        counter: Counter = Counter()
        gens = {l: self.reader.batches(self.my_streams[l], self._positions[self.my_streams[l]], counter)
                for l in range(w, L, W)}
        while gens:
            l = t % L
            t += W
            if l not in gens:  # finite epochs: this stream has run out
                continue
            try:
                rows, keys, srcs, pos = next(gens[l])
            except StopIteration:
                del gens[l]
                continue
            meta = {"worker": w, "stream": self.my_streams[l], "pos": pos, "skipped": dict(counter),
                    "keys": keys, "sources": srcs, "cpu": time.process_time()}
            yield self._batch(rows), meta

    def _eval_worker(self, w: int):
        W, dp, B = self.num_workers_eff, self.dp_size, self.batch_size
        counter: Counter = Counter()
        rows, keys, cur = [], [], None
        emitted = set()

        def emit(k):
            nonlocal rows, keys
            batch_rows = rows or [self.samples.filler()]
            meta = {"worker": w, "pos": None, "skipped": dict(counter), "keys": keys or [None],
                    "sources": [0] * max(1, len(keys)), "index": k}
            emitted.add(k)
            out = (self._batch(batch_rows), meta)
            rows, keys = [], []
            return out

        n = 0
        for si, src in enumerate(self.sources):
            for url in sorted(src["urls"]):
                # shard-level problems are counted once (worker 0), sample-level ones by their owner
                for raw in iter_shard_samples(url, counter if w == 0 else Counter(), self.limits):
                    i = n
                    n += 1
                    if i % dp != self.dp_rank:
                        continue
                    k = (i // dp) // B
                    if k % W != w:
                        continue
                    if cur is not None and k != cur:
                        yield emit(cur)
                    cur = k
                    try:
                        rows.append(self.samples.row(raw))
                        keys.append(raw["__key__"])
                    except SkipSample as x:
                        counter[x.reason] += 1
        if cur is not None:
            yield emit(cur)
        total = -(-(-(-n // dp)) // B)  # ceil(ceil(n / dp) / B)
        for k in range(w, total, W):
            if k not in emitted:
                yield emit(k)
        yield None, {"worker": w, "pos": None, "skipped": dict(counter)}  # the final counts, with no batch

    # ------------------------------------------------------------------ iteration / state
    def __iter__(self):
        W = self.num_workers_eff
        ds = _Dataset(self, self._batches if self.training else 0)
        if self.num_workers > 0:
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_identity, prefetch_factor=self.prefetch_factor,
                                             persistent_workers=False, pin_memory=self.pin_memory,
                                             multiprocessing_context=self.mp_context,
                                             worker_init_fn=_leave_stop_signals_to_the_rank)
        else:
            dl = ds
        # Counters restart in fresh workers: fold what they reported into the base first.
        for w in range(W):
            self._skip_base.update(self._worker_skips[w])
            self._worker_skips[w] = Counter()
        for batch, meta in dl:
            w = meta["worker"]
            if meta["pos"] is not None:
                self._positions[meta["stream"]] = meta["pos"]
            self._worker_skips[w] = Counter(meta["skipped"])
            if batch is None:
                continue
            self._batches += 1
            self.last_keys, self.last_sources = meta["keys"], meta["sources"]
            self.last_meta = meta
            yield batch

    @property
    def skipped(self) -> dict[str, int]:
        """Samples / members skipped so far, by reason (survives resume)."""
        total = Counter(self._skip_base)
        for c in self._worker_skips:
            total.update(c)
        return dict(sorted(total.items()))

    @property
    def skipped_samples(self) -> int:
        """Samples skipped so far (shard- and member-level counts left out)."""
        return sum(n for reason, n in self.skipped.items() if reason not in SHARD_REASONS + MEMBER_REASONS)

    @property
    def batches_yielded(self) -> int:
        return self._batches

    def state_dict(self) -> dict:
        """This rank's part of the data state: its streams' positions. `merge_states` joins the
        parts of all ranks into the state of the whole stream, which any layout can load."""
        if not self.training:
            raise RuntimeError("evaluation loaders are single-pass and not resumable")
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint(),
                "micro_batches": self._batches * self.dp_size,
                "streams": {str(c): copy_pos(p) for c, p in self._positions.items()},
                "skipped": {str(self.dp_rank): self.skipped}, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state of this rank or a merged one, saved under any data-parallel size
        dividing the canonical stream count, at a step boundary."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}; the data stream "
                             "cannot continue (train.allow_config_change=true starts it over)")
        mine, theirs = self._fingerprint(), state["fingerprint"]
        diff = [k for k in mine if json.dumps(mine[k]) != json.dumps(theirs.get(k))]
        if diff:
            raise ValueError(f"loader state was saved with different {', '.join(diff)}; resume needs the same "
                             "sources, seed, micro-batch size, canonical streams, shuffle buffer and lengths")
        missing = [c for c in self.my_streams if str(c) not in state["streams"]]
        if missing or state["micro_batches"] % self.dp_size:
            raise ValueError(f"loader state lacks streams {missing[:4]} of dp rank {self.dp_rank} or was saved "
                             f"mid-step ({state['micro_batches']} micro-batches, dp size {self.dp_size}); "
                             "load the merged state of all ranks (merge_states)")
        self._reset_state()
        self._positions = {c: copy_pos(state["streams"][str(c)]) for c in self.my_streams}
        self._batches = state["micro_batches"] // self.dp_size
        skipped = state.get("skipped", {})
        if state.get("dp_size") == self.dp_size:
            self._skip_base = Counter(skipped.get(str(self.dp_rank), {}))
        elif self.dp_rank == 0:  # another layout: the totals carry on, on dp rank 0
            self._skip_base = sum((Counter(v) for v in skipped.values()), Counter())
