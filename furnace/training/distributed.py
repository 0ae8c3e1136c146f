"""Process groups: DeepSpeed's communication backend on NCCL or gloo, and host-side reductions."""
from __future__ import annotations

import datetime
import importlib
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this host right now (for a rendezvous started here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_inference_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory all-reduce op on CPU hosts.

    Only DeepSpeed's inference tensor-parallel path (`inference_all_reduce`) uses that op, but
    every process group it creates on the CPU accelerator compiles it first: ~80 s of C++ on a
    fresh install (and a compiler requirement) for nothing a training run calls. Without the op
    DeepSpeed falls back to the process group's all_reduce."""
    try:  # not `import deepspeed.comm.torch as m`: deepspeed.comm's own `torch` name shadows it
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


def init_distributed(timeout: datetime.timedelta | None = None) -> None:
    """DeepSpeed's process group: NCCL with this rank's GPU (LOCAL_RANK) on CUDA hosts, gloo
    elsewhere, from a launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...). Without one,
    a 1-rank group on a free local port (benchmarks, notebooks); a torch.distributed group that
    exists already is adopted as it is."""
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    kw = {} if timeout is None else {"timeout": timeout}
    if timeout is not None:
        # Groups made later (furnace's tp/dp/pp, DeepSpeed's ZeRO and pipeline groups) take
        # c10d's module defaults, not the world group's timeout: make those the run's too.
        c10d = importlib.import_module("torch.distributed.distributed_c10d")
        c10d.default_pg_timeout = timeout
        if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
            c10d.default_pg_nccl_timeout = timeout
    if "RANK" not in os.environ and not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, **kw)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it
    skip_inference_shm_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **kw)


def close_distributed() -> None:
    """Tear the process groups down once every rank is done with them (a barrier first). Left to
    the interpreter's exit, gloo's threads die in static destructors: a rank that has saved its
    last checkpoint could still abort ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def join_launched_group() -> tuple[int, int]:
    """(rank, world size) of a process a launcher started (torchrun, deepspeed: RANK, WORLD_SIZE,
    MASTER_ADDR in the environment), its torch.distributed group made (NCCL on this rank's GPU,
    gloo on CPU hosts); (0, 1) and no group for a plain `python` start. For the tools that
    need no DeepSpeed engine (evaluation, generation)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce_host(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sums a small CPU tensor (step stats, eval counts) over `group` in place. NCCL reduces
    only device tensors, so under it the tensor makes a round trip through this rank's GPU."""
    if dist.get_backend(group) == "nccl":
        d = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(d, group=group)
        t.copy_(d)
    else:
        dist.all_reduce(t, group=group)
    return t
