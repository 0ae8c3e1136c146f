"""Checkpoints: DeepSpeed's (module, optimizer, scheduler) + per-rank furnace state (loader
position, RNG states, step) + the config, under `<run_dir>/checkpoints/stepNNNNNNNN/`.

`latest` is written last, atomically, after every rank finished: a kill at any point of a save
leaves `latest` on the previous complete one.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from furnace.training.faults import Faults

LATEST = "latest"
FULL_MODEL = "full_model.safetensors"


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


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir) -> str | None:
    f = checkpoint_dir(run_dir) / LATEST
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if (checkpoint_dir(run_dir) / tag).is_dir() else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)



def save_checkpoint(engine, run_dir, step: int, rank_state: dict, config: dict, *, keep: int = 2,
                    full_state: dict | None = None, faults: Faults | None = None) -> str:
    """Collective: every rank calls it. Returns the tag. `full_state` (tensor/pipeline-parallel
    layouts: the model gathered into one plain state_dict) is written by rank 0 next to
    DeepSpeed's files, for export; resuming uses DeepSpeed's per-rank files. `faults`: the
    run's fault drills (debug.faults), which may stop a rank between the files and `latest`."""
    ckdir = checkpoint_dir(run_dir)
    tag = f"step{step:08d}"
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckdir), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save(rank_state, ckdir / tag / f"furnace_rank{rank:05d}.pt")
    if rank == 0:
        (ckdir / tag / "config.json").write_text(json.dumps(config, indent=2))
        if full_state is not None:
            save_file({k: v.contiguous() for k, v in full_state.items()}, str(ckdir / tag / FULL_MODEL))
    dist.barrier()
    if faults is not None:
        faults.maybe_die(step)
    if rank == 0:
        _atomic_write(ckdir / LATEST, tag)
        _prune(ckdir, keep, current=tag)
    dist.barrier()
    return tag


def _prune(ckdir: Path, keep: int, current: str) -> None:
    tags = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step"))
    complete = [p for p in tags if p.name <= current]
    for p in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    # Directories newer than `latest` are partial saves from a killed run: drop them too.
    for p in tags:
        if p.name > current:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine, run_dir) -> dict | None:
    """Collective. Loads `latest` if any; returns this rank's furnace state (or None)."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    ckdir = checkpoint_dir(run_dir)
    engine.load_checkpoint(str(ckdir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    path = ckdir / tag / f"furnace_rank{dist.get_rank():05d}.pt"
    if not path.exists():
        raise RuntimeError(f"{path} missing: checkpoint {tag} was written with another world size; "
                           "resume with the same layout (parallel.tp/pp and number of ranks)")
    return torch.load(path, map_location="cpu", weights_only=True)


def config_snapshot(cfg) -> dict:
    return copy.deepcopy(cfg.to_dict())
