"""Procedurally drawn audio-caption set: tones, chirps and beeps (the demo-audio preset).

    python -m furnace.data.synthetic_audio --out DIR --n N --seed S [--shards 16]

Writes, through the shard writer (`ShardWriter.add_audio`), 1-second 16 kHz mono FLAC clips:
    DIR/train-000000.tar .. train-{shards-1:06d}.tar   N samples: KEY.flac + KEY.txt
    DIR/val-000000.tar                                 max(200, N//20) samples (disjoint seed stream)
    DIR/stats.json, DIR/tokenizer/ (with <audio>), DIR/.complete   as the shapes set

Captions (8, drawn uniformly): "a rising tone" / "a falling tone" (a linear chirp over 0.5-0.85 s,
its end 2.5-4x / 1/4-1/2.5 its start, starting at 250-600 / 625-2400 Hz), "a low hum" (80-160 Hz
with its second harmonic), "a high whistle" (2-3.5 kHz), "a long beep" (0.45-0.8 s at 0.7-1.2
kHz), "one short beep" / "two short beeps" / "three short beeps" (60-120 ms beeps at 0.7-1.2 kHz,
80-150 ms apart). Every clip: a random onset, amplitude 0.3-0.8, 5 ms fades, white noise of
standard deviation 0.003-0.02. Telling them apart takes pitch (hum, beep, whistle), the direction
of a sweep and the count and length of beeps: the time structure the tower's positions carry.
Sample i of split s is drawn from its own RNG seeded by (seed, s, i), as in the shapes set.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys

import numpy as np
from tqdm import tqdm

from furnace.data.audio import encode_audio
from furnace.data.shard_writer import ShardWriter
from furnace.data.synthetic import TRAIN_SHARDS, default_val_count, finish_set
from furnace.data.tokenizer import build_word_tokenizer
from furnace.system import usable_cores

KIND = "audio"
SAMPLE_RATE = 16000
SECONDS = 1.0
CAPTIONS = ("a rising tone", "a falling tone", "a low hum", "a high whistle", "a long beep", "one short beep",
            "two short beeps", "three short beeps")
# Bumped whenever the drawing changes; a set written by another version is rebuilt.
GENERATOR_VERSION = 1


def vocabulary() -> list[str]:
    return sorted({w for c in CAPTIONS for w in c.split()})


def demo_tokenizer():
    """The demo-audio tokenizer: word level over the caption vocabulary, with <audio>."""
    return build_word_tokenizer(vocabulary(), audio=True)


def _tone(x: np.ndarray, rate: int, start: float, dur: float, f0: float, f1: float, amp: float) -> None:
    """Add a linear chirp from f0 to f1 Hz (f0 == f1: a steady tone) with 5 ms fades into x."""
    i0 = int(start * rate)
    n = min(int(dur * rate), len(x) - i0)
    t = np.arange(n) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur))
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.005 * rate))
    x[i0:i0 + n] += amp * fade * np.sin(phase)


def draw_clip(rng: random.Random, rate: int = SAMPLE_RATE, seconds: float = SECONDS) -> tuple[np.ndarray, str]:
    """One (mono float32 samples [rate * seconds], caption) drawn from `rng`."""
    x = np.zeros(int(rate * seconds))
    caption = rng.choice(CAPTIONS)
    amp = rng.uniform(0.3, 0.8)
    if caption in ("a rising tone", "a falling tone"):
        dur = rng.uniform(0.5, 0.85)
        lo = rng.uniform(250, 600)
        hi = lo * rng.uniform(2.5, 4.0)
        f0, f1 = (lo, hi) if caption == "a rising tone" else (hi, lo)
        _tone(x, rate, rng.uniform(0, seconds - dur - 0.02), dur, f0, f1, amp)
    elif caption in ("a low hum", "a high whistle"):
        dur = rng.uniform(0.5, 0.9)
        f = rng.uniform(80, 160) if caption == "a low hum" else rng.uniform(2000, 3500)
        start = rng.uniform(0, seconds - dur - 0.02)
        _tone(x, rate, start, dur, f, f, amp)
        if caption == "a low hum":
            _tone(x, rate, start, dur, 2 * f, 2 * f, amp * 0.5)
    elif caption == "a long beep":
        dur = rng.uniform(0.45, 0.8)
        f = rng.uniform(700, 1200)
        _tone(x, rate, rng.uniform(0, seconds - dur - 0.02), dur, f, f, amp)
    else:
        count = {"one": 1, "two": 2, "three": 3}[caption.split()[0]]
        f = rng.uniform(700, 1200)
        lengths = [rng.uniform(0.06, 0.12) for _ in range(count)]
        gaps = [rng.uniform(0.08, 0.15) for _ in range(count - 1)]
        t = rng.uniform(0, seconds - sum(lengths) - sum(gaps) - 0.02)
        for i, length in enumerate(lengths):
            _tone(x, rate, t, length, f, f, amp)
            t += length + (gaps[i] if i < len(gaps) else 0.0)
    noise = np.random.default_rng(rng.getrandbits(64)).standard_normal(len(x)) * rng.uniform(0.003, 0.02)
    return np.clip(x + noise, -1.0, 1.0).astype(np.float32), caption


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"furnace-synthetic-audio:{seed}:{split}:{index}")


def _draw_index(args) -> tuple[bytes, str]:
    seed, split, i = args
    samples, caption = draw_clip(sample_rng(seed, split, i))
    return encode_audio(samples, SAMPLE_RATE, "flac"), caption


def generate(n: int, seed: int, split: str = "train", workers: int = 1):
    """(FLAC bytes, caption) of samples 0..n-1 in order; `workers` > 1 draws them in a process pool."""
    jobs = ((seed, split, i) for i in range(n))
    if workers <= 1 or n < 200:
        yield from map(_draw_index, jobs)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_draw_index, jobs, chunksize=50)


def write_split(out: str, split: str, n: int, seed: int, shards: int = 1, progress: bool = False) -> dict:
    writer = ShardWriter(out, split, maxcount=max(1, math.ceil(n / max(1, shards))), sample_rate=SAMPLE_RATE)
    for clip, caption in tqdm(generate(n, seed, split, min(8, usable_cores())), total=n,
                              desc=f"synthetic audio {split}", disable=not progress, unit="clip"):
        writer.add_audio(clip, caption)
    stats = writer.close()
    if stats["samples"] != n:  # every clip is written by us: a skip is a bug, not bad input
        raise RuntimeError(f"synthetic audio {split}: {stats['samples']} of {n} clips written ({stats['skipped']})")
    return stats


def build(out: str, n: int, seed: int = 0, image_size: int | None = None, shards: int = TRAIN_SHARDS,
          n_val: int | None = None, progress: bool = False, home: str | None = None) -> dict:
    """Write the whole set into `out` (files as in the module docstring); `home`: the folder it
    will be moved to (the shard patterns in `.complete` name it), default `out`. `image_size` is
    not used (the demo's loader passes data.synthetic_image_size to every set)."""
    os.makedirs(out, exist_ok=True)
    n_val = default_val_count(n) if n_val is None else n_val
    train = write_split(out, "train", n, seed, shards, progress)
    val = write_split(out, "val", n_val, seed, 1, progress)
    return finish_set(out, home, demo_tokenizer(), train, val, kind=KIND, version=GENERATOR_VERSION, n=n,
                      n_val=n_val, seed=seed, sample_rate=SAMPLE_RATE, seconds=SECONDS, shards=shards)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m furnace.data.synthetic_audio",
                                description="Write the synthetic tones-and-beeps audio-caption set.")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=8000, help="training clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=TRAIN_SHARDS, help="number of training shards")
    p.add_argument("--val", type=int, default=None, help="validation clips (default max(200, n//20))")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.n < 1 or a.shards < 1 or (a.val is not None and a.val < 1):
        print("synthetic_audio: error: --n, --shards, --val must be >= 1", file=sys.stderr)
        return 2
    print(json.dumps(build(a.out, a.n, a.seed, None, a.shards, a.val, progress=not a.no_progress)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
