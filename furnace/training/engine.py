"""The DeepSpeed engine of a run: its JSON config (one source of truth: the furnace config),
AdamW with warmup + cosine, and deepspeed.initialize for layout A (ZeRO-3 x TP x DP) or
B (ZeRO-1 x TP x PP x DP)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from furnace.parallel.zero3 import gather_by_block, install_fused_loss_scaling
from furnace.training.distributed import skip_inference_shm_op
from furnace.training.safe_load import use_safe_checkpoint_loading

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


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
    for key, where in (("offload_optimizer", p.offload_optimizer), ("offload_param", p.offload_params)):
        if where != "none":
            ds["zero_optimization"][key] = {"device": where, "pin_memory": False}
            if where == "nvme":
                ds["zero_optimization"][key]["nvme_path"] = p.offload_nvme_path
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW as the client optimizer
    fp16 = ds.pop("fp16", None)
    ds.pop("bf16", None)
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":  # dynamic loss scaling settings live in zero3_fp16.json
        ds["fp16"] = fp16 or _read_ds_config("zero3_fp16")["fp16"]
    if p.pp > 1:
        pipe = ds.setdefault("pipeline", {})
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


def named_param_groups(model: torch.nn.Module) -> list[tuple[str, list[tuple[str, torch.nn.Parameter]]]]:
    """The optimizer's groups, in order, with their parameters' names: matrices decay; norms,
    biases, gates and other 1-D parameters do not. (A ZeRO-0 checkpoint numbers the optimizer's
    state in this order.)"""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:  # (a ZeRO-3 partitioned parameter keeps its shape in ds_shape)
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append((n, p))
    return [(name, group) for name, group in (("decay", decay), ("no_decay", no_decay)) if group]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    return [{"params": [p for _, p in group], "weight_decay": weight_decay if name == "decay" else 0.0, "name": name}
            for name, group in named_param_groups(model)]


def adamw(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    """torch's fused AdamW, or DeepSpeed's CPU Adam (AdamW mode, the same update) when ZeRO-Offload
    steps the optimizer on the host; its C++ op builds once with ninja, then loads from the
    torch extensions cache."""
    kw = dict(lr=cfg.train.lr, betas=(0.9, 0.95), eps=1e-8)
    if cfg.parallel.offload_optimizer != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    # fused: one kernel over all tensors (CPU and CUDA); on a 1M-parameter demo the per-tensor
    # foreach path spent 12 ms a step where fused spends 4.
    return torch.optim.AdamW(groups, fused=True, **kw)


def initialize(cfg, model, topology, dp: int, grad_accum: int):
    """(engine, DeepSpeed config) for a plain or tensor-parallel model (layout A) or a
    PipelineModule (layout B), with AdamW, warmup + cosine, safe checkpoint loading, and the
    ZeRO-3 integrations the config asks for."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    skip_inference_shm_op()  # initialize() builds DeepSpeed's comm backend if nothing did yet
    ds = build_ds_config(cfg, dp, grad_accum)
    opt = adamw(cfg, param_groups(model, cfg.train.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(cfg.train.warmup_steps, cfg.train.lr_decay_steps or cfg.train.max_steps,
                           cfg.train.min_lr_ratio))
    # A PipelineModule brings its own grid (the same rank order) and DeepSpeed takes the mpu from it.
    mpu = None if isinstance(model, PipelineModule) else topology
    if cfg.parallel.zero_stage == 3 and cfg.parallel.zero3_gather == "block" and mpu is not None:
        gather_by_block(model)  # one ZeRO-3 hook per block, not per submodule: the host-side cost
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds, mpu=mpu, dist_init_required=False)
    use_safe_checkpoint_loading(engine)
    if cfg.train.precision == "fp16" and cfg.parallel.zero_stage == 3 and cfg.train.fused_loss_scaling:
        # One fused pass for overflow check + grad norm, one multiply for unscale x clip.
        install_fused_loss_scaling(engine)
    return engine, ds


def total_grad_norm(model: torch.nn.Module) -> float:
    """The 2-norm of every gradient `model` holds whole (plain data parallel), in fp32."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def current_loss_scale(engine) -> float:
    """The optimizer's loss scale (1.0 without loss scaling), whatever DeepSpeed optimizer runs."""
    opt = engine.optimizer
    for name in ("cur_scale", "loss_scale"):
        v = getattr(opt, name, None)
        if isinstance(v, (int, float)):
            return float(v)
    scaler = getattr(opt, "loss_scaler", None)
    return float(getattr(scaler, "cur_scale", 1.0)) if scaler is not None else 1.0
