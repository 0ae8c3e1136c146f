"""Procedurally drawn image-caption set for the demo and the tests.

    python -m furnace.data.synthetic --out DIR --n N --seed S [--image-size 32] [--shards 16]

Writes, through the shard writer (`furnace.data.shard_writer.ShardWriter`):
    DIR/train-000000.tar .. train-{shards-1:06d}.tar   N samples (ceil(N/shards) per shard)
    DIR/val-000000.tar                                 max(200, N//20) samples (disjoint seed stream)
    DIR/stats.json                                     per split: shards, sample counts, skips
    DIR/tokenizer/                                     the demo word-level HF tokenizer (`demo_tokenizer`)
    DIR/.complete                                      written last (the set is usable)

Caption grammar (every caption is a deterministic function of the image):
    one object  (1/3): "a {size} {colour} {shape}"              e.g. "a small red circle"
    two objects (2/3): "a {colour} {shape} {relation} a {colour} {shape}"
        the larger object is named first; relation = where it is relative to the smaller one
        e.g. "a blue square left of a yellow triangle". The two centres are half the image apart
        along the relation's axis and close across it, so the relation is never ambiguous.
    size: small | large; colour: red | green | blue | yellow; shape: circle | square | triangle;
    relation: left of | right of | above | below.
Sample i of split s is drawn from its own RNG seeded by (seed, s, i): train and validation
streams are disjoint and any prefix of a larger set equals the smaller set.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys

from PIL import Image, ImageDraw
from tqdm import tqdm

from furnace.data.shard_writer import ShardWriter
from furnace.system import usable_cores
from furnace.data.tokenizer import build_word_tokenizer, save_tokenizer

COLOURS = {
    "red": (220, 45, 40),
    "green": (40, 175, 65),
    "blue": (45, 90, 235),
    "yellow": (240, 215, 35),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
SUPERSAMPLE = 4
COMPLETE_MARKER = ".complete"
# Bumped whenever the drawing changes; a demo set written by another version is rebuilt.
# 2: relations unambiguous (objects centred across the axis), larger objects.
GENERATOR_VERSION = 2
TRAIN_SHARDS = 16


def vocabulary() -> list[str]:
    words = {"a"} | set(COLOURS) | set(SHAPES) | set(SIZES)
    for r in RELATIONS:
        words |= set(r.split())
    return sorted(words)


def demo_tokenizer(audio: bool = False):
    """The demo tokenizer: word level over the caption vocabulary (deterministic); `audio`: with <audio>."""
    return build_word_tokenizer(vocabulary(), audio)


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, colour):
    h = side / 2
    if shape == "circle":
        d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=colour)
    elif shape == "square":
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour)
    else:  # triangle pointing up, same bounding box
        d.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=colour)


def draw_sample(rng: random.Random, image_size: int = 32) -> tuple[Image.Image, str]:
    """One (image, caption) drawn from `rng`."""
    S = image_size * SUPERSAMPLE
    bg = rng.randint(10, 60)
    img = Image.new("RGB", (S, S), (bg, bg, bg))
    d = ImageDraw.Draw(img)
    colour_names = list(COLOURS)
    if rng.random() < 1 / 3:
        size = rng.choice(SIZES)
        colour, shape = rng.choice(colour_names), rng.choice(SHAPES)
        side = S * (0.5 if size == "large" else 0.3) * rng.uniform(0.92, 1.08)
        m = side / 2 + S * 0.03
        _draw_shape(d, shape, rng.uniform(m, S - m), rng.uniform(m, S - m), side, COLOURS[colour])
        caption = f"a {size} {colour} {shape}"
    else:
        (c1, s1), (c2, s2) = [(rng.choice(colour_names), rng.choice(SHAPES)) for _ in range(2)]
        # bounding-box sides 0.48 vs 0.30 of the image: even a big triangle (half its box) covers
        # more pixels than a small square, so "the larger one" is never ambiguous
        big = S * 0.48 * rng.uniform(0.95, 1.05)
        small = S * 0.30 * rng.uniform(0.95, 1.05)
        horizontal = rng.random() < 0.5
        big_first = rng.random() < 0.5          # the big object is left (or top)
        q = S / 4
        along = [q + rng.uniform(-0.03, 0.03) * S, 3 * q + rng.uniform(-0.03, 0.03) * S]
        if not big_first:
            along.reverse()

        # Centres half the image apart along the relation's axis and within 0.12 of it across:
        # free placement across made some pairs as far apart across as along ("left of" or
        # "below"?), captions no one could get right.
        def across():
            return S / 2 + rng.uniform(-0.06, 0.06) * S

        pos_big = (along[0], across())
        pos_small = (along[1], across())
        if not horizontal:
            pos_big, pos_small = pos_big[::-1], pos_small[::-1]
        _draw_shape(d, s1, *pos_big, big, COLOURS[c1])
        _draw_shape(d, s2, *pos_small, small, COLOURS[c2])
        if horizontal:
            rel = "left of" if big_first else "right of"
        else:
            rel = "above" if big_first else "below"
        caption = f"a {c1} {s1} {rel} a {c2} {s2}"
    img = img.resize((image_size, image_size), Image.LANCZOS)
    return img, caption


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"furnace-synthetic:{seed}:{split}:{index}")


def _draw_index(args):
    seed, split, i, image_size = args
    return draw_sample(sample_rng(seed, split, i), image_size)


def generate(n: int, seed: int, split: str = "train", image_size: int = 32, workers: int = 1):
    """Samples 0..n-1 in order; `workers` > 1 draws them in a process pool (same output: each
    sample has its own RNG)."""
    jobs = ((seed, split, i, image_size) for i in range(n))
    if workers <= 1 or n < 1000:
        yield from map(_draw_index, jobs)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_draw_index, jobs, chunksize=250)


def default_val_count(n: int) -> int:
    return max(200, n // 20)


def write_split(out: str, split: str, n: int, seed: int, image_size: int = 32, shards: int = 1,
                progress: bool = False) -> dict:
    maxcount = max(1, math.ceil(n / max(1, shards)))
    writer = ShardWriter(out, split, maxcount=maxcount, image_format="png")
    workers = min(8, usable_cores())
    for img, cap in tqdm(generate(n, seed, split, image_size, workers), total=n, desc=f"synthetic {split}",
                         disable=not progress, unit="sample"):
        writer.add_caption(img, cap)
    return writer.close()


def build(out: str, n: int, seed: int = 0, image_size: int = 32, shards: int = TRAIN_SHARDS,
          n_val: int | None = None, progress: bool = False, home: str | None = None) -> dict:
    """Write the whole synthetic set into `out` (files as in the module docstring). `home`: the
    folder the set will be moved to (the shard patterns in `.complete` name it), default `out`."""
    os.makedirs(out, exist_ok=True)
    n_val = default_val_count(n) if n_val is None else n_val
    train = write_split(out, "train", n, seed, image_size, shards, progress)
    val = write_split(out, "val", n_val, seed, image_size, 1, progress)
    return finish_set(out, home, demo_tokenizer(), train, val, version=GENERATOR_VERSION, n=n, n_val=n_val, seed=seed,
                      image_size=image_size, shards=shards)


def finish_set(out: str, home: str | None, tokenizer, train: dict, val: dict, **fields) -> dict:
    """A drawn set's last step (the shapes, video and audio sets): its tokenizer saved, then the
    `.complete` marker holding `fields` and the shard patterns (under `home`, the folder the set
    is moved to; default `out`). Returns the marker's contents."""
    save_tokenizer(tokenizer, os.path.join(out, "tokenizer"))
    meta = {**fields, "train_pattern": shard_pattern(home or out, "train", len(train["shards"])),
            "val_pattern": shard_pattern(home or out, "val", len(val["shards"]))}
    with open(os.path.join(out, COMPLETE_MARKER), "w") as f:
        json.dump(meta, f)
    return meta


def shard_pattern(out: str, split: str, count: int) -> str:
    if count == 1:
        return os.path.join(out, f"{split}-000000.tar")
    return os.path.join(out, f"{split}-{{000000..{count - 1:06d}}}.tar")


# ---------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m furnace.data.synthetic",
                                description="Write the synthetic shapes image-caption set.")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=20000, help="training samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--shards", type=int, default=TRAIN_SHARDS, help="number of training shards")
    p.add_argument("--val", type=int, default=None, help="validation samples (default max(200, n//20))")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.n < 1 or a.image_size < 8 or a.shards < 1 or (a.val is not None and a.val < 1):
        print("synthetic: error: --n, --shards, --val must be >= 1 and --image-size >= 8", file=sys.stderr)
        return 2
    meta = build(a.out, a.n, a.seed, a.image_size, a.shards, a.val, progress=not a.no_progress)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
