"""`train.py`'s command line: parse, validate before any process group exists, then either run
this rank (under a launcher: deepspeed, torchrun, SLURM) or, started bare, start the local ranks
itself (no ssh, no rendezvous service).

The bare launcher gives each rank cores / ranks threads (unless OMP_NUM_THREADS is set), passes
SIGTERM and SIGINT on to the ranks and waits for them (they save and exit 0; a second signal
kills them), stops the others when one rank fails, and never leaves a rank behind: a rank whose
launcher dies gets SIGTERM.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

import torch

from furnace.config import ConfigError, check_trainable, load_config, validate
from furnace.data.sources import check_sources
from furnace.data.tokenizer import tokenizer_dir
from furnace.system import usable_cores
from furnace.training.distributed import free_port
from furnace.training.stop import StopRequest

GRACE_S = 10  # after one rank failed: how long the others get to notice before SIGTERM, then SIGKILL


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


def _die_with_parent() -> None:
    """In a rank, before exec: SIGTERM when the launcher goes, however it goes (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: a killed launcher can orphan its ranks
        pass


class LocalRanks:
    """`nproc` ranks of this same command on this host, and what the launcher does for them."""

    def __init__(self, argv, nproc: int):
        self.nproc = nproc
        target = [os.path.abspath(sys.argv[0])] if os.path.isfile(sys.argv[0]) else ["-m", "furnace.training.launch"]
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, usable_cores() // nproc))
        port = str(free_port())
        self.procs = []
        for r in range(nproc):
            env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                   "OMP_NUM_THREADS": threads}
            self.procs.append(subprocess.Popen([sys.executable, *target, *argv], env=env, preexec_fn=_die_with_parent))
        self.signals = 0

    def forward(self, signum, frame) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            print(f"furnace: {name}: the ranks save a checkpoint at the end of this step and stop "
                  "(a second signal kills them)", file=sys.stderr, flush=True)
            self._send(signal.SIGTERM)
        else:
            self._send(signal.SIGKILL)

    def _send(self, sig) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def wait(self) -> int:
        """0 when every rank exited 0; else the first failing rank's status."""
        failed_at, status, sent = None, 0, set()
        while any(p.poll() is None for p in self.procs):
            codes = [p.poll() for p in self.procs]
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.monotonic()
                status = next(c for c in codes if c not in (None, 0))
            if failed_at is not None:  # the others may be waiting for the failed one in a collective
                waited = time.monotonic() - failed_at
                for sig, after in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 2 * GRACE_S)):
                    if waited > after and sig not in sent:  # once each: a repeated SIGTERM is not a new request
                        sent.add(sig)
                        self._send(sig)
            time.sleep(0.2)
        for r, p in enumerate(self.procs):
            if p.returncode < 0:
                print(f"furnace: rank {r} was killed by {signal.Signals(-p.returncode).name}", file=sys.stderr)
        return status or next((p.returncode for p in self.procs if p.returncode), 0)


def relaunch(argv, nproc: int) -> int:
    """Start `nproc` local ranks of this same command and wait for them."""
    print(f"furnace: no launcher found; starting {nproc} local ranks", flush=True)
    ranks = LocalRanks(argv, nproc)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, ranks.forward)
    code = ranks.wait()
    return 128 + -code if code < 0 else code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.nproc < 0:
            raise ConfigError(f"--nproc must be >= 1 (or 0: one rank per GPU, else 2); got {args.nproc}")
        world = int(os.environ["WORLD_SIZE"]) if launched() else local_world_size(args)
        if cfg.parallel.layout == "auto":
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if launched() else world
            from furnace.training.planner import auto_layout  # the model code, only when asked for
            chosen = auto_layout(cfg, world, per_node)
            if os.environ.get("RANK") == "0":
                print(f"furnace: parallel.layout=auto chose {chosen}", file=sys.stderr, flush=True)
        validate(cfg, world)
        check_sources(cfg.data)
        check_trainable(cfg)
        tokenizer_dir(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"furnace: config error: {e}", file=sys.stderr)
        return 2
    if not launched():
        return relaunch(argv, world)
    stop = StopRequest().install()  # a signal during the imports below is kept, not a traceback
    # Only the ranks load the trainer (transformers, DeepSpeed: seconds of imports); the bare
    # launcher and a config error stay fast.
    try:
        from furnace.training.trainer import Trainer
    except KeyboardInterrupt:
        return 130
    return Trainer(cfg, stop).run()


if __name__ == "__main__":
    sys.exit(main())
