"""Checkpoints: DeepSpeed's (module, optimizer, scheduler) + per-rank furnace state (loader
position, RNG states, step) + the config, under `<run_dir>/checkpoints/stepNNNNNNNN/`.

A tag is complete only once `complete.json` is in it: rank 0 writes that marker (the tag's
files and their sizes, the layout, the tokenizer's fingerprint) after every rank's files are
written and fsynced. `latest` is only a hint for people and tools. Resuming takes the newest
complete tag whose files are all there at their recorded sizes (rank 0 decides, every rank
checks its own state file, all agree before anything loads); a damaged tag is reported by name
and set aside, and the one before it is used. Pruning deletes only complete tags beyond
`train.keep_checkpoints` and partial saves, never the newest complete ones.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from furnace.training.faults import Faults
from furnace.training.safe_load import allowed_global_names

LATEST = "latest"
MARKER = "complete.json"
FULL_MODEL = "full_model.safetensors"  # tp/pp tags of older furnace: the model gathered at save time
ARCHITECTURE = "architecture.json"  # in the run_dir: the decoder's and tower's HF configs (export needs no folder)
TAG = re.compile(r"^step\d{8}$")
log = logging.getLogger("furnace")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message is one line that names the fix."""


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def rank_state_file(rank: int) -> str:
    return f"furnace_rank{rank:05d}.pt"


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the tokenizer's full definition (vocabulary, merges, specials)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


# ------------------------------------------------------------------ RNG state

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((3, tuple(int(x) for x in py[:-1]), py[-1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------ files

def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file under `path` that this host wrote, and the directories naming them."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _tags(ckdir: Path) -> list[Path]:
    """Tag directories, newest first."""
    if not ckdir.is_dir():
        return []
    return sorted((p for p in ckdir.iterdir() if p.is_dir() and TAG.match(p.name)), reverse=True)


def verify(tagdir: Path) -> str | None:
    """None when `tagdir` is a complete checkpoint whose files are all there at their recorded
    sizes, its config readable and every torch file a readable pickle (a file zeroed at its
    size, as after a power loss, is not); else what is wrong ("incomplete": no marker)."""
    marker = tagdir / MARKER
    if not marker.is_file():
        return "incomplete"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MARKER} is unreadable"
    for name, size in files.items():
        p = tagdir / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes where {size} were written"
    try:
        if not isinstance(json.loads((tagdir / "config.json").read_text()), dict):
            raise ValueError
    except (OSError, ValueError):
        return "its config.json is unreadable"
    for p in sorted(tagdir.rglob("*.pt")):
        try:  # reads the pickle's opcodes only, not the tensors
            torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
        except Exception:
            return f"{p.name} is not a readable torch file"
    return None


def read_marker(tagdir: Path) -> dict:
    return json.loads((tagdir / MARKER).read_text())


# ------------------------------------------------------------------ save

@contextlib.contextmanager
def _agreed(tag: str, what: str):
    """Every rank learns whether any rank's error (a full disk, a lost mount; torch reports
    those as RuntimeError) broke this part of the save, and all raise the same CheckpointError
    instead of waiting for the failed rank in the next collective."""
    problem = None
    try:
        yield
    except Exception as e:
        log.exception(f"saving {tag} ({what}) failed")
        problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem)
    failed = [(r, p) for r, p in enumerate(everyone) if p is not None]
    if failed:
        r, p = failed[0]
        raise CheckpointError(f"saving checkpoint {tag} failed ({what}) on rank(s) {[r for r, _ in failed][:8]}: {p}; "
                              "the previous complete checkpoint is kept: free space or fix train.run_dir, then re-run")


def save_checkpoint(engine, run_dir, step: int, rank_state: dict, config: dict, meta: dict, *, keep: int = 2,
                    faults: Faults | None = None) -> str:
    """Collective: every rank calls it. Returns the tag. `meta` goes into the marker (layout,
    tokenizer fingerprint). `faults`: the run's fault drills, which may stop rank 0 at a point of the save."""
    ckdir = checkpoint_dir(run_dir)
    tag = tag_of(step)
    tagdir = ckdir / tag
    rank = dist.get_rank()
    if rank == 0 and (tagdir / MARKER).exists():  # rewriting a tag: it is incomplete until the end
        (tagdir / MARKER).unlink()
        _fsync_dir(tagdir)
    dist.barrier()
    with _agreed(tag, "write"):
        engine.save_checkpoint(str(ckdir), tag=tag, client_state={"step": step}, save_latest=False)
        torch.save(rank_state, tagdir / rank_state_file(rank))
        if rank == 0:
            (tagdir / "config.json").write_text(json.dumps(config, indent=2))
    if faults is not None:
        faults.maybe_die(step, "write")
    dist.barrier()
    with _agreed(tag, "flush"):
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one process a host: the page cache is the host's
            _fsync_tree(tagdir)
    if faults is not None:
        faults.maybe_die(step, "marker")
    if rank == 0:
        files = {str(p.relative_to(tagdir)): p.stat().st_size for p in sorted(tagdir.rglob("*"))
                 if p.is_file() and p.name != MARKER}
        _atomic_write(tagdir / MARKER, json.dumps({"step": step, **meta, "files": files}, indent=1))
    if faults is not None:
        faults.maybe_die(step, "latest")
    if rank == 0:
        _atomic_write(ckdir / LATEST, tag)
        _prune(ckdir, keep, current=tag)
    dist.barrier()
    return tag


def _prune(ckdir: Path, keep: int, current: str) -> None:
    """Drop complete tags beyond the newest `keep` and partial saves newer than the newest
    complete tag; never the current one. An unmarked tag older than that may be a checkpoint
    an older furnace wrote (before markers): it stays."""
    complete = 0
    for p in _tags(ckdir):
        if p.name == current:
            complete += 1
            continue
        if not (p / MARKER).exists():
            if complete == 0:  # a save that never finished, newer than any finished one
                shutil.rmtree(p, ignore_errors=True)
        elif complete >= keep:
            shutil.rmtree(p, ignore_errors=True)
        else:
            complete += 1


# ------------------------------------------------------------------ resume

def choose_resume_tag(run_dir, *, set_aside: bool = True) -> tuple[str | None, list[str]]:
    """(the newest complete, intact tag or None, what was found on the way, one line each).
    With `set_aside`, damaged tags are renamed to `<tag>.damaged` so that no later run trips
    over them (and the next save cannot take their place)."""
    ckdir = checkpoint_dir(run_dir)
    notes: list[str] = []
    tags = _tags(ckdir)
    latest_file = ckdir / LATEST
    hint = latest_file.read_bytes().decode("utf-8", "replace").strip() if latest_file.is_file() else None
    chosen = None
    for p in tags:
        problem = verify(p)
        if problem is None:
            chosen = p.name
            break
        if problem == "incomplete":
            notes.append(f"checkpoint {p.name} is incomplete (its save was interrupted); it is skipped")
            continue
        if not set_aside:
            notes.append(f"checkpoint {p.name} is damaged ({problem}); using an earlier checkpoint")
            continue
        aside = p.with_name(f"{p.name}.damaged")
        n = 1
        while aside.exists():
            aside, n = p.with_name(f"{p.name}.damaged{n}"), n + 1
        p.rename(aside)
        notes.append(f"checkpoint {p.name} is damaged ({problem}); moved to {aside.name}, resuming from an "
                     "earlier checkpoint")
    if chosen is None and tags and not any((p / MARKER).exists() for p in tags) and hint in {p.name for p in tags}:
        chosen = hint  # written before furnace marked complete checkpoints: `latest` was the record
        notes.append(f"checkpoint {hint} has no completion marker (an older furnace wrote it); trusting `latest`")
    if chosen is not None and hint != chosen:
        said = "is missing" if hint is None else f"names {hint!r}"
        notes.append(f"checkpoints/latest {said}; resuming from the newest complete checkpoint, {chosen}")
        if set_aside:  # the hint is for people and tools: make it true again
            _atomic_write(latest_file, chosen)
    return chosen, notes


def unsafe_globals(tagdir: Path) -> list[str]:
    """'file: global' for every pickled global in the tag's .pt files outside the allowlist:
    what loading would have to import and call (`verify` has vetted the files as pickles)."""
    allowed = allowed_global_names()
    return [f"{p.name}: {g}" for p in sorted(tagdir.rglob("*.pt"))
            for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(p)) if g not in allowed]


def load_checkpoint(engine, run_dir, tag: str) -> dict:
    """Collective. Loads `tag` (chosen by `choose_resume_tag` on rank 0 and agreed on), written on
    this layout (or, ZeRO-0, on another data-parallel size: every rank's file is the whole state);
    returns this rank's furnace state. Other layouts: `reshard.load_resharded`, then
    `load_rank_state`."""
    engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag, load_optimizer_states=True,
                           load_lr_scheduler_states=True)
    return load_rank_state(run_dir, tag)


def load_rank_state(run_dir, tag: str) -> dict:
    """This rank's furnace state (loader position, RNG states, step); ranks the saving run did not
    have take rank 0's (the data state in it is the whole run's)."""
    tagdir = checkpoint_dir(run_dir) / tag
    own = tagdir / rank_state_file(dist.get_rank())
    return torch.load(own if own.exists() else tagdir / rank_state_file(0), map_location="cpu", weights_only=True)


def config_snapshot(cfg) -> dict:
    return copy.deepcopy(cfg.to_dict())
