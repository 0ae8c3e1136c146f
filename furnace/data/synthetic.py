"""Procedurally drawn image-caption set for the demo and the tests.

    python -m furnace.data.synthetic --out DIR --n N --seed S [--image-size 32] [--shards 16]

Writes, through the shard writer (`furnace.data.shards.ShardWriter`):
    DIR/train-000000.tar .. train-{shards-1:06d}.tar   N samples (ceil(N/shards) per shard)
    DIR/val-000000.tar                                 max(200, N//20) samples (disjoint seed stream)
    DIR/stats.json                                     per split: shards, sample counts, skips
    DIR/tokenizer/                                     the demo word-level HF tokenizer
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
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys

from PIL import Image, ImageDraw

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
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_draw_index, jobs, chunksize=250)


def default_val_count(n: int) -> int:
    return max(200, n // 20)


def write_split(out: str, split: str, n: int, seed: int, image_size: int = 32, shards: int = 1,
                progress: bool = False) -> dict:
    from tqdm import tqdm

    from furnace.data.shards import ShardWriter

    maxcount = max(1, math.ceil(n / max(1, shards)))
    writer = ShardWriter(out, split, maxcount=maxcount, image_format="png")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # macOS lacks it
    workers = min(8, cpus)
    for img, cap in tqdm(generate(n, seed, split, image_size, workers), total=n, desc=f"synthetic {split}",
                         disable=not progress, unit="sample"):
        writer.add_caption(img, cap)
    return writer.close()


def build(out: str, n: int, seed: int = 0, image_size: int = 32, shards: int = TRAIN_SHARDS,
          n_val: int | None = None, progress: bool = False, home: str | None = None) -> dict:
    """Write the whole synthetic set into `out` (files as in the module docstring). `home`: the
    folder the set will be moved to (the shard patterns in `.complete` name it), default `out`."""
    from furnace.data.tokenizer import build_demo_tokenizer

    os.makedirs(out, exist_ok=True)
    n_val = default_val_count(n) if n_val is None else n_val
    train = write_split(out, "train", n, seed, image_size, shards, progress)
    val = write_split(out, "val", n_val, seed, image_size, 1, progress)
    build_demo_tokenizer(os.path.join(out, "tokenizer"))
    meta = {"version": GENERATOR_VERSION, "n": n, "n_val": n_val, "seed": seed, "image_size": image_size,
            "shards": shards,
            "train_pattern": shard_pattern(home or out, "train", len(train["shards"])),
            "val_pattern": shard_pattern(home or out, "val", len(val["shards"]))}
    with open(os.path.join(out, COMPLETE_MARKER), "w") as f:
        json.dump(meta, f)
    return meta


def shard_pattern(out: str, split: str, count: int) -> str:
    if count == 1:
        return os.path.join(out, f"{split}-000000.tar")
    return os.path.join(out, f"{split}-{{000000..{count - 1:06d}}}.tar")


# ---------------------------------------------------------------------------- demo data

@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _all_exist(pattern: str) -> bool:
    from furnace.data.loader import expand_shards

    files = expand_shards(pattern)
    return bool(files) and all(os.path.isfile(f) for f in files)


def _stale(out: str) -> bool:
    """`out` holds a complete synthetic set drawn by another generator version. (Sets written
    with other n/seed/image_size are kept: tests and users build those on purpose.)"""
    try:
        with open(os.path.join(out, COMPLETE_MARKER)) as f:
            return json.load(f).get("version", 1) != GENERATOR_VERSION
    except (OSError, ValueError):
        return False


def ensure_demo_data(data_cfg, *, progress: bool = False) -> dict:
    """Build the synthetic set into `data_cfg.synthetic_dir` unless the configured shards exist
    (a set drawn by another generator version is rebuilt).

    Safe when several ranks (processes on one machine) call it at once: an exclusive file
    lock (`<synthetic_dir>.lock`) serialises them; the set is built in a temporary folder, moved
    into place, and `.complete` is written last. Returns {"train_shards", "val_shards",
    "tokenizer"} (tokenizer: the configured dir, or the demo tokenizer dir, or None).
    """
    out = data_cfg.synthetic_dir
    tok_dir = data_cfg.tokenizer
    stale = bool(out) and _stale(out)
    if not stale and _all_exist(data_cfg.train_shards) and _all_exist(data_cfg.val_shards):
        if tok_dir is None and out and os.path.isdir(os.path.join(out, "tokenizer")):
            tok_dir = os.path.join(out, "tokenizer")
        return {"train_shards": data_cfg.train_shards, "val_shards": data_cfg.val_shards, "tokenizer": tok_dir}
    if not out:
        raise FileNotFoundError(f"data.train_shards={data_cfg.train_shards!r} / data.val_shards="
                                f"{data_cfg.val_shards!r} not found and data.synthetic_dir is unset; "
                                "write shards with furnace-shards or set data.synthetic_dir")
    out = os.path.abspath(out).rstrip("/")
    n = int(getattr(data_cfg, "synthetic_n", 20000))
    seed = int(getattr(data_cfg, "synthetic_seed", 0))
    size = int(getattr(data_cfg, "synthetic_image_size", 32))
    with _file_lock(out + ".lock"):
        if not os.path.exists(os.path.join(out, COMPLETE_MARKER)) or _stale(out):
            tmp = f"{out}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp, n, seed, size, progress=progress, home=out)
            os.makedirs(out, exist_ok=True)
            for name in sorted(os.listdir(tmp), key=lambda x: x == COMPLETE_MARKER):  # marker last
                dst = os.path.join(out, name)
                if os.path.isdir(dst) and not os.path.islink(dst):
                    shutil.rmtree(dst)
                os.replace(os.path.join(tmp, name), dst)
            shutil.rmtree(tmp, ignore_errors=True)
    for key in ("train_shards", "val_shards"):
        if not _all_exist(getattr(data_cfg, key)):
            with open(os.path.join(out, COMPLETE_MARKER)) as f:
                meta = json.load(f)
            raise FileNotFoundError(
                f"data.{key}={getattr(data_cfg, key)!r} does not match the synthetic set in {out} "
                f"(it holds {meta['train_pattern' if key == 'train_shards' else 'val_pattern']}); "
                f"fix data.{key} or remove {out} to rebuild")
    return {"train_shards": data_cfg.train_shards, "val_shards": data_cfg.val_shards,
            "tokenizer": tok_dir if tok_dir is not None else os.path.join(out, "tokenizer")}


# ---------------------------------------------------------------------------- scoring

def normalize_caption(text: str) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip().lower()
    return text.rstrip(" .")


def caption_accuracy(preds, refs) -> float:
    """Exact-match accuracy after whitespace/case normalisation (and a trailing '.')."""
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise ValueError(f"caption_accuracy: {len(preds)} predictions for {len(refs)} references")
    if not refs:
        return 0.0
    return sum(normalize_caption(p) == normalize_caption(r) for p, r in zip(preds, refs)) / len(refs)


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
