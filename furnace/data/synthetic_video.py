"""Procedurally drawn video-caption set: one shape moving across the frame (the demo-video preset).

    python -m furnace.data.synthetic_video --out DIR --n N --seed S [--image-size 32] [--shards 16]

Writes, through the shard writer (`ShardWriter.add_video`), real H.264 MP4 clips:
    DIR/train-000000.tar .. train-{shards-1:06d}.tar   N samples: KEY.mp4 + KEY.txt
    DIR/val-000000.tar                                 max(200, N//20) samples (disjoint seed stream)
    DIR/stats.json, DIR/tokenizer/, DIR/.complete      as the shapes set (`furnace.data.synthetic`)

Caption grammar: "a {colour} {shape} moves {direction}", e.g. "a red square moves left";
colour: red | green | blue | yellow; shape: circle | square | triangle; direction: left | right |
up | down (48 captions). A clip has 8 to 16 frames (8 fps); the shape travels 35-50% of the frame
along its direction at a constant speed, anywhere across it.

The direction is in the frame order only: a "moves left" clip's frames are, as a set, those of a
"moves right" clip with the same positions (start and end positions are drawn symmetrically),
so a model that ignores which frame is which (no media-time embeddings) cannot tell them apart.
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
from PIL import Image, ImageDraw
from tqdm import tqdm

from furnace.data.shard_writer import ShardWriter
from furnace.data.synthetic import COLOURS, SHAPES, SUPERSAMPLE, TRAIN_SHARDS, _draw_shape, default_val_count, \
    finish_set
from furnace.data.tokenizer import build_word_tokenizer
from furnace.data.video import encode_clip
from furnace.system import usable_cores

KIND = "video"
DIRECTIONS = ("left", "right", "up", "down")
MIN_FRAMES, MAX_FRAMES = 8, 16
FPS = 8
# Bumped whenever the drawing changes; a set written by another version is rebuilt.
GENERATOR_VERSION = 1


def vocabulary() -> list[str]:
    return sorted({"a", "moves"} | set(COLOURS) | set(SHAPES) | set(DIRECTIONS))


def demo_tokenizer():
    """The demo-video tokenizer: word level over the caption vocabulary."""
    return build_word_tokenizer(vocabulary())


def draw_clip(rng: random.Random, image_size: int = 32) -> tuple[np.ndarray, str]:
    """One (frames uint8 [N, S, S, 3], caption) drawn from `rng`."""
    S = image_size * SUPERSAMPLE
    n = rng.randint(MIN_FRAMES, MAX_FRAMES)
    bg = rng.randint(10, 60)
    colour, shape, direction = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(DIRECTIONS)
    side = S * 0.34 * rng.uniform(0.92, 1.08)
    m = side / 2 + S * 0.03
    travel = S * rng.uniform(0.35, 0.5)
    # Along the motion: the earlier end of the path is uniform over [m, S - m - travel] moving
    # right/down, over [m + travel, S - m] moving left/up: the same positions either way.
    forward = direction in ("right", "down")
    start = rng.uniform(m, S - m - travel) + (0.0 if forward else travel)
    step = (travel if forward else -travel) / (n - 1)
    across = rng.uniform(m, S - m)
    frames = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for t in range(n):
        along = start + step * t
        cx, cy = (along, across) if direction in ("left", "right") else (across, along)
        img = Image.new("RGB", (S, S), (bg, bg, bg))
        _draw_shape(ImageDraw.Draw(img), shape, cx, cy, side, COLOURS[colour])
        frames[t] = np.asarray(img.resize((image_size, image_size), Image.LANCZOS))
    return frames, f"a {colour} {shape} moves {direction}"


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"furnace-synthetic-video:{seed}:{split}:{index}")


def _draw_index(args) -> tuple[bytes, str]:
    seed, split, i, image_size = args
    frames, caption = draw_clip(sample_rng(seed, split, i), image_size)
    return encode_clip(frames, "mp4", fps=FPS), caption


def generate(n: int, seed: int, split: str = "train", image_size: int = 32, workers: int = 1):
    """(MP4 bytes, caption) of samples 0..n-1 in order; `workers` > 1 draws them in a process
    pool (the same bytes: each sample has its own RNG, the encoder one thread)."""
    jobs = ((seed, split, i, image_size) for i in range(n))
    if workers <= 1 or n < 200:
        yield from map(_draw_index, jobs)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_draw_index, jobs, chunksize=50)


def write_split(out: str, split: str, n: int, seed: int, image_size: int = 32, shards: int = 1,
                progress: bool = False) -> dict:
    writer = ShardWriter(out, split, maxcount=max(1, math.ceil(n / max(1, shards))), max_video_frames=MAX_FRAMES)
    for clip, caption in tqdm(generate(n, seed, split, image_size, min(8, usable_cores())), total=n,
                              desc=f"synthetic video {split}", disable=not progress, unit="clip"):
        writer.add_video(clip, caption)
    stats = writer.close()
    if stats["samples"] != n:  # every clip is written by us: a skip is a bug, not bad input
        raise RuntimeError(f"synthetic video {split}: {stats['samples']} of {n} clips written ({stats['skipped']})")
    return stats


def build(out: str, n: int, seed: int = 0, image_size: int = 32, shards: int = TRAIN_SHARDS,
          n_val: int | None = None, progress: bool = False, home: str | None = None) -> dict:
    """Write the whole set into `out` (files as in the module docstring); `home`: the folder it
    will be moved to (the shard patterns in `.complete` name it), default `out`."""
    if image_size % 2:
        raise ValueError(f"image_size must be even (4:2:0 video); got {image_size}")
    os.makedirs(out, exist_ok=True)
    n_val = default_val_count(n) if n_val is None else n_val
    train = write_split(out, "train", n, seed, image_size, shards, progress)
    val = write_split(out, "val", n_val, seed, image_size, 1, progress)
    return finish_set(out, home, demo_tokenizer(), train, val, kind=KIND, version=GENERATOR_VERSION, n=n,
                      n_val=n_val, seed=seed, image_size=image_size, shards=shards)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m furnace.data.synthetic_video",
                                description="Write the synthetic moving-shapes video-caption set.")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=8000, help="training clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--shards", type=int, default=TRAIN_SHARDS, help="number of training shards")
    p.add_argument("--val", type=int, default=None, help="validation clips (default max(200, n//20))")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.n < 1 or a.image_size < 8 or a.image_size % 2 or a.shards < 1 or (a.val is not None and a.val < 1):
        print("synthetic_video: error: --n, --shards, --val must be >= 1 and --image-size even and >= 8",
              file=sys.stderr)
        return 2
    print(json.dumps(build(a.out, a.n, a.seed, a.image_size, a.shards, a.val, progress=not a.no_progress)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
