"""deepspeed.initialize for layout A (ZeRO-3 x TP x DP) or B (ZeRO-1 x TP x PP x DP), and
checkpoints.

Checkpoint = DeepSpeed's (module, optimizer, scheduler) + per-rank furnace state (loader
position, RNG states, step) + the config. `latest` is written last, atomically, after every
rank finished: a kill at any point of a save leaves `latest` on the previous complete one.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from furnace import faults

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
LATEST = "latest"


def ds_config_name(cfg) -> str:
    if cfg.parallel.pp > 1:
        return "zero1_pipeline_bf16"
    return "zero3_fp16" if cfg.train.precision == "fp16" else "zero3_bf16"


def _read_ds_config(name: str) -> dict:
    with open(DS_CONFIG_DIR / f"{name}.json") as f:
        return json.load(f)


def build_ds_config(cfg, dp: int, grad_accum: int) -> dict:
    """The DeepSpeed JSON for this run: the layout's base file, then batch sizes, precision,
    ZeRO stage and clipping from the furnace config (one source of truth)."""
    ds = _read_ds_config(ds_config_name(cfg))
    t, p = cfg.train, cfg.parallel
    ds["train_batch_size"] = t.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = grad_accum
    ds["gradient_clipping"] = t.grad_clip
    ds["zero_optimization"]["stage"] = p.zero_stage
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW as the client optimizer
    fp16 = ds.pop("fp16", None)
    ds.pop("bf16", None)
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":  # dynamic loss scaling settings live in zero3_fp16.json
        ds["fp16"] = fp16 or _read_ds_config("zero3_fp16")["fp16"]
    if p.pp > 1:
        pipe = ds.setdefault("pipeline", {})
        pipe["activation_checkpoint_interval"] = p.pipeline_activation_checkpoint_interval
        # Send whole activations between stages: the latents travel with the hidden states and
        # need their gradients back, which DeepSpeed's tp-partitioned sends do not carry.
        pipe["pipe_partitioned"] = False
        pipe["grad_partitioned"] = False
    return ds


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases, gates, latents and embeddings rows of 1-D stay undecayed."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return groups


def skip_inference_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory all-reduce op on CPU hosts.

    Only DeepSpeed's inference tensor-parallel path (`inference_all_reduce`) uses that op, but
    every process group it creates on the CPU accelerator compiles it first: ~80 s of C++ on a
    fresh install (and a compiler requirement) for nothing a training run calls. Without the op
    DeepSpeed falls back to the process group's all_reduce."""
    import importlib

    try:  # not `import deepspeed.comm.torch as m`: deepspeed.comm's own `torch` name shadows it
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


def init_distributed(**kw) -> None:
    """DeepSpeed's process group: NCCL with this rank's GPU (LOCAL_RANK) on CUDA hosts, gloo elsewhere."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    skip_inference_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", **kw)


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


def initialize(cfg, model, topology, dp: int, grad_accum: int):
    import deepspeed

    skip_inference_shm_op()  # initialize() builds DeepSpeed's comm backend if nothing did yet
    ds = build_ds_config(cfg, dp, grad_accum)
    # fused: one kernel over all tensors (CPU and CUDA); on a 1M-parameter demo the per-tensor
    # foreach path spent 12 ms a step where fused spends 4.
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=(0.9, 0.95),
                            eps=1e-8, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(cfg.train.warmup_steps, cfg.train.lr_decay_steps or cfg.train.max_steps,
                           cfg.train.min_lr_ratio))
    # A PipelineModule brings its own grid (the same rank order) and DeepSpeed takes the mpu from it.
    from deepspeed.pipe import PipelineModule

    mpu = None if isinstance(model, PipelineModule) else topology
    if cfg.parallel.zero_stage == 3 and cfg.parallel.zero3_gather == "block" and mpu is not None:
        from furnace.parallel.zero3 import gather_by_block

        gather_by_block(model)  # one ZeRO-3 hook per block, not per submodule: the host-side cost
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds, mpu=mpu, dist_init_required=False)
    use_safe_checkpoint_loading(engine)
    if cfg.train.precision == "fp16" and cfg.parallel.zero_stage == 3 and cfg.train.fused_loss_scaling:
        from furnace_kernels import install_fused_loss_scaling

        # One fused pass for overflow check + grad norm, one multiply for unscale x clip.
        install_fused_loss_scaling(engine)
    return engine, ds


# ------------------------------------------------------------------ safe checkpoint loading

def _checkpoint_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoints hold (checked on ZeRO-1/3 and
    pipeline checkpoints): everything else must be plain data."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    try:
        from furnace_kernels.loss_scale import DynamicLossScaler as FusedScaler

        allowed.append(FusedScaler)
    except ImportError:
        pass
    return allowed


def safe_load(path, map_location=None, **kw):
    """torch.load with weights_only=True and the allowlist above: a checkpoint cannot run code."""
    kw["weights_only"] = True
    with torch.serialization.safe_globals(_checkpoint_globals()):
        return _TORCH_LOAD(path, map_location=map_location, **kw)


_TORCH_LOAD = torch.load


def use_safe_checkpoint_loading(engine) -> None:
    """DeepSpeed's torch checkpoint engine unpickles with weights_only=False; swap in a subclass
    whose load is `safe_load` (saving is unchanged)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is TorchCheckpointEngine:
        ce.__class__ = SafeTorchCheckpointEngine


@contextlib.contextmanager
def safe_torch_load():
    """Route every torch.load inside the block through `safe_load` (for DeepSpeed utilities such
    as zero_to_fp32 that call torch.load(weights_only=False) themselves)."""
    torch.load = lambda f, *a, **k: safe_load(f, *a, **{x: y for x, y in k.items() if x != "weights_only"})
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


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


# ------------------------------------------------------------------ checkpoints

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


FULL_MODEL = "full_model.safetensors"


def save_checkpoint(engine, run_dir, step: int, rank_state: dict, config: dict, *, keep: int = 2,
                    full_state: dict | None = None) -> str:
    """Collective: every rank calls it. Returns the tag. `full_state` (tensor/pipeline-parallel
    layouts: the model gathered into one plain state_dict) is written by rank 0 next to
    DeepSpeed's files, for export; resuming uses DeepSpeed's per-rank files."""
    ckdir = checkpoint_dir(run_dir)
    tag = f"step{step:08d}"
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckdir), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save(rank_state, ckdir / tag / f"furnace_rank{rank:05d}.pt")
    if rank == 0:
        (ckdir / tag / "config.json").write_text(json.dumps(config, indent=2))
        if full_state is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in full_state.items()}, str(ckdir / tag / FULL_MODEL))
    dist.barrier()
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
