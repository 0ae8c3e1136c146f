"""`train.py`'s command line: parse, validate before any process group exists, then either run
this rank (under a launcher: deepspeed, torchrun, SLURM) or, started bare, launch the local
ranks with torch's launcher (no ssh needed)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from furnace.config import ConfigError, load_config, validate
from furnace.training.faults import Faults


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train.py", description="Train a Flamingo-style model with DeepSpeed.")
    p.add_argument("--config", "--preset", default="demo", help="preset name (demo, flamingo-1b, ...) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("--nproc", type=int, default=0,
                   help="ranks to launch when started without a launcher (default: GPUs present, else 2)")
    return p.parse_args(argv)


def launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_world_size(args) -> int:
    if args.nproc:
        return args.nproc
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _without_nproc(argv):
    """Drop --nproc for the children (torchrun's parser would take it as its own --nproc-per-node)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def relaunch(argv, nproc: int) -> int:
    """Start `nproc` local ranks of this same command with torch's launcher (no ssh needed)."""
    target = [os.path.abspath(sys.argv[0])] if os.path.isfile(sys.argv[0]) else ["-m", "furnace.training.launch"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *argv]
    print(f"furnace: no launcher found; starting {nproc} local ranks: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        world = int(os.environ["WORLD_SIZE"]) if launched() else local_world_size(args)
        dp = validate(cfg, world)
        Faults(cfg.debug.faults, 0)  # a malformed drill fails here, not on some rank later
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"furnace: config error: {e}", file=sys.stderr)
        return 2
    if not launched():
        return relaunch(_without_nproc(argv), world)
    # Only the ranks load the trainer (transformers, DeepSpeed: seconds of imports); the bare
    # launcher and a config error stay fast.
    from furnace.training.trainer import Trainer

    return Trainer(cfg, dp).run()


if __name__ == "__main__":
    sys.exit(main())
