"""The demo's data: the synthetic shapes set (or, with data.synthetic_kind=video, the moving
shapes clips of `furnace.data.synthetic_video`; with audio, the tones and beeps of
`furnace.data.synthetic_audio`), drawn into `data.synthetic_dir` when the
configured shards are missing (or were drawn by another generator version)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys

from furnace.config import ConfigError, split_sources
from furnace.data.sources import drawn_on_demand, expand_shards
from furnace.data import synthetic, synthetic_audio, synthetic_video
from furnace.data.synthetic import COMPLETE_MARKER

# data.synthetic_kind -> the module that draws that set (its build() and GENERATOR_VERSION)
SETS = {"shapes": synthetic, "video": synthetic_video, "audio": synthetic_audio}


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


def _marker(out: str) -> dict | None:
    try:
        with open(os.path.join(out, COMPLETE_MARKER)) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def _stale(out: str, kind: str = "shapes") -> bool:
    """`out` holds a complete synthetic set drawn by another generator version. (Sets written
    with other n/seed/image_size are kept: tests and users build those on purpose.) A set of
    another kind is never replaced: a ConfigError names the two keys to fix."""
    meta = _marker(out)
    if meta is None:
        return False
    if meta.get("kind", "shapes") != kind:
        raise ConfigError(f"data.synthetic_dir={out!r} holds the synthetic {meta.get('kind', 'shapes')!r} set, not "
                         f"data.synthetic_kind={kind!r}; point data.synthetic_dir at another folder")
    return meta.get("version", 1) != SETS[kind].GENERATOR_VERSION


def ensure_demo_data(data_cfg, *, progress: bool = False) -> None:
    """Draw the synthetic set into `data_cfg.synthetic_dir` when a configured source that lies in
    it has shards missing (or the set there was drawn by another generator version). Nothing to
    do without `synthetic_dir`, or for sources elsewhere (`check_sources` vets those).

    Safe when several ranks (processes on one machine) call it at once: an exclusive file
    lock (`<synthetic_dir>.lock`) serialises them; the set is built in a temporary folder, moved
    into place, and `.complete` is written last. The set's tokenizer lands in `<synthetic_dir>/tokenizer`.
    """
    out = data_cfg.synthetic_dir
    if not out:
        return
    ours = [(key, p) for key in ("train_shards", "val_shards") for p in split_sources(getattr(data_cfg, key))
            if drawn_on_demand(p, data_cfg)]
    kind = data_cfg.synthetic_kind
    if not _stale(out, kind) and all(_all_exist(p) for _, p in ours):
        return
    out = os.path.abspath(out).rstrip("/")
    n, seed, size = data_cfg.synthetic_n, data_cfg.synthetic_seed, data_cfg.synthetic_image_size
    with _file_lock(out + ".lock"):
        if not os.path.exists(os.path.join(out, COMPLETE_MARKER)) or _stale(out, kind):
            tmp = f"{out}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            bar = progress and sys.stderr.isatty()  # in a log file: one line, not a bar's redraws
            if progress and not bar:
                print(f"drawing the synthetic {kind} set ({n} samples) into {out}", file=sys.stderr, flush=True)
            SETS[kind].build(tmp, n, seed, size, progress=bar, home=out)
            os.makedirs(out, exist_ok=True)
            for name in sorted(os.listdir(tmp), key=lambda x: x == COMPLETE_MARKER):  # marker last
                dst = os.path.join(out, name)
                if os.path.isdir(dst) and not os.path.islink(dst):
                    shutil.rmtree(dst)
                os.replace(os.path.join(tmp, name), dst)
            shutil.rmtree(tmp, ignore_errors=True)
    for key, pattern in ours:
        if not _all_exist(pattern):
            with open(os.path.join(out, COMPLETE_MARKER)) as f:
                meta = json.load(f)
            raise FileNotFoundError(
                f"data.{key} names {pattern!r}, which the synthetic set in {out} does not hold (it holds "
                f"{meta['train_pattern' if key == 'train_shards' else 'val_pattern']}); fix data.{key} or "
                f"remove {out} to rebuild")
