"""The demo's data: the synthetic shapes set, drawn into `data.synthetic_dir` when the
configured shards are missing (or were drawn by another generator version)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil

from furnace.data.sources import expand_shards
from furnace.data.synthetic import COMPLETE_MARKER, GENERATOR_VERSION, build


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _all_exist(pattern: str) -> bool:
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
    n, seed, size = data_cfg.synthetic_n, data_cfg.synthetic_seed, data_cfg.synthetic_image_size
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
