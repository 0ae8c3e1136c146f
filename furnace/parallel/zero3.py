"""ZeRO-3 integration: gather granularity (whole repeated blocks instead of every submodule),
the fused loss-scaling hook (`furnace_kernels`' one-pass gradient statistics inside
DeepSpeed's ZeRO-3 optimizer), and partitioning while the model is built (`partitioner`,
`zero3_placement`: each freshly drawn piece and each pretrained module as it is filled in, so no
rank holds the model whole).

DeepSpeed's ZeRO-3 puts a fetch/release hook pair on every module and runs its bookkeeping at
each one, for the frozen LM and vision tower too. flamingo-1b has ~620 modules per forward; on an
H100 (micro-batch 8) that made the step host-bound: 4.47 s per module against 2.22 s per block
(benchmarks/results/throughput-h100-zero3-gather.json). Marking each repeated
block (decoder layer, vision encoder layer, perceiver attention / feed-forward, xattn block) as a
ZeRO-3 "leaf" gathers its parameters once when the block runs and hooks nothing inside it. A
block's parameters are small next to the activations (a 1B LM's layer is ~120 MB in bf16), so
the memory cost is one block's weights gathered at a time, as before.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from furnace_kernels import DynamicLossScaler, apply_, grad_stats


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Every non-list element of an nn.ModuleList (at any depth) that holds parameters."""
    blocks: dict[int, nn.Module] = {}
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            for item in m:
                if not isinstance(item, nn.ModuleList) and next(item.parameters(), None) is not None:
                    blocks.setdefault(id(item), item)
    return list(blocks.values())


def gather_by_block(model: nn.Module) -> int:
    """Flag every repeated block, and nothing else, as a ZeRO-3 leaf module (before
    deepspeed.initialize). Returns how many modules were flagged."""
    import deepspeed.utils as ds_utils

    # Per instance: DeepSpeed's class-based set_z3_leaf_modules would also flag the feed-forward
    # inside each xattn block (a leaf inside a leaf). Older DeepSpeed lacks the per-instance
    # setter; the flag it sets is the attribute below.
    set_leaf = getattr(ds_utils, "set_z3_leaf_module", lambda m, flag: setattr(m, "_z3_leaf", flag))
    blocks = repeated_blocks(model)
    for b in blocks:
        set_leaf(b, True)
    return len(blocks)


def gather_head_weights(model: nn.Module) -> None:
    """The fused loss (`model.head_loss`, model.fused_kernels' linear_cross_entropy) reads the
    output heads' weights outside the heads' own forward: ZeRO-3 gathers them for its forward."""
    if getattr(model, "head_loss", None) is None:
        return
    import deepspeed

    heads = [model.lm.lm_head] + ([] if model.new_tokens is None else [model.new_tokens.head])
    for head in heads:
        deepspeed.zero.register_external_parameter(model.head_loss, head.weight)


def scaler_from_deepspeed(ds_scaler) -> DynamicLossScaler:
    """furnace's DynamicLossScaler with the configuration and state of a DeepSpeed one."""
    s = DynamicLossScaler(ds_scaler.cur_scale, growth_factor=ds_scaler.scale_factor,
                          backoff_factor=1.0 / ds_scaler.scale_factor, growth_interval=ds_scaler.scale_window,
                          hysteresis=ds_scaler.delayed_shift, consecutive_hysteresis=ds_scaler.consecutive_hysteresis,
                          min_scale=ds_scaler.min_scale,
                          raise_error_at_min_scale=getattr(ds_scaler, "raise_error_at_min_scale", True),
                          dtype=getattr(ds_scaler, "dtype", torch.float16))
    s.cur_iter = ds_scaler.cur_iter
    s.last_overflow_iter = ds_scaler.last_overflow_iter
    s.cur_hysteresis = ds_scaler.cur_hysteresis
    return s


def install_fused_loss_scaling(engine_or_optimizer, *, replace_scaler: bool = True, backend: str | None = None):
    """Route a DeepSpeed ZeRO-3 optimizer's overflow check, gradient norm and unscale/clip
    through one `grad_stats` pass, one all-reduce and one multiply.

    Per step (DeepSpeedZeroOptimizer_Stage3.step, DeepSpeed 0.19):
      _overflow_check_and_loss_scale_update(update_scale=False)
          -> grad_stats over this rank's gradient partitions (averaged_gradients) with
             inv_scale = 1 / loss_scale; one all-reduce (SUM) of [sumsq, nonfinite] over the
             data-parallel group (plus the model-parallel group when there is one);
             overflow = nonfinite or sumsq not finite. (DeepSpeed's own path: an isinf/isnan
             pass with a MAX all-reduce for fp16, then a norm pass with its own all-reduce, and
             an invalid norm also counts as overflow; the decisions are the same.)
      _get_norm_groups()  -> [sqrt(sumsq) * loss_scale] from that pass (no second read).
      unscale_and_clip_grads(i, norm) -> one multiply of the fp32 partition by
             1 / (loss_scale * max(1, (norm + 1e-6) / clip)), the same factor as DeepSpeed.
    With replace_scaler, the optimizer's DeepSpeed DynamicLossScaler is replaced by
    furnace's DynamicLossScaler (state copied), which then drives the skip decisions.
    Returns the optimizer. Not supported: optimizer offload, Muon (raises).
    """
    from deepspeed import comm as dist
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    opt = engine_or_optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer_Stage3):  # an engine: its ZeRO optimizer
        opt = getattr(opt, "optimizer", opt)
    if not isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        raise TypeError(f"install_fused_loss_scaling needs a ZeRO-3 optimizer; got {type(opt).__name__}")
    if getattr(opt, "offload_optimizer", False):
        raise NotImplementedError("install_fused_loss_scaling: optimizer offload is not supported")
    if getattr(opt, "use_muon", False):
        raise NotImplementedError("install_fused_loss_scaling: Muon is not supported")
    if getattr(opt, "_furnace_fused_loss_scaling", False):
        return opt

    if replace_scaler and getattr(opt.loss_scaler, "dynamic", False) and not isinstance(opt.loss_scaler, DynamicLossScaler):
        opt.loss_scaler = scaler_from_deepspeed(opt.loss_scaler)

    state = {"sumsq": None, "scale": None}

    def _grads():
        out = []
        for i in range(len(opt.fp16_groups)):
            out.extend(g for g in opt.averaged_gradients.get(i, None) or [] if g is not None)
        return out

    def fused_overflow_check(update_scale=True):
        scale = float(opt.loss_scale)
        grads = _grads()
        dev = grads[0].device if grads else torch.device(opt.device)
        sumsq, nonfinite = grad_stats(grads, 1.0 / scale, backend=backend)
        buf = torch.stack([sumsq.to(torch.float32), nonfinite.to(torch.float32)]).to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=opt.dp_process_group)
        if pg_utils.is_parallel(opt.model_parallel_group):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=opt.model_parallel_group)
        s, nf = buf.tolist()  # the one host sync of the step
        opt.overflow = bool(nf > 0) or not math.isfinite(s)
        state["sumsq"], state["scale"] = s, scale
        if not update_scale:
            return opt.overflow
        return opt._loss_scale_update_and_overflow_cleanup()

    def fused_norm_groups():
        s = state["sumsq"]
        dev = torch.device(opt.device)
        if s is None or not math.isfinite(s):
            return [torch.tensor(-1.0, device=dev)]
        return [torch.tensor(math.sqrt(s) * state["scale"], dtype=torch.float32, device=dev)]

    def fused_unscale_and_clip(sub_group_id, total_norm):
        scale = float(opt.loss_scale)
        combined = scale
        if opt.clip_grad > 0.0:
            norm = float(total_norm)
            combined = max(((norm / scale) + 1e-6) / opt.clip_grad, 1.0) * scale
        apply_([opt.fp32_partitioned_groups_flat[sub_group_id].grad], 1.0 / combined, backend=backend)

    opt._overflow_check_and_loss_scale_update = fused_overflow_check
    opt._get_norm_groups = fused_norm_groups
    opt.unscale_and_clip_grads = fused_unscale_and_clip
    opt._furnace_fused_loss_scaling = True
    return opt


def partitioner(ds_config: dict, topology):
    """deepspeed.zero.Init over the data-parallel group, as the engine will partition: calling
    the result with no argument gives the context in which modules are partitioned as they are
    built; with a built module, partitions that module now."""
    import deepspeed

    def init(module=None):
        return deepspeed.zero.Init(module=module, config_dict_or_path=ds_config, mpu=topology,
                                   data_parallel_group=topology.get_data_parallel_group())
    return init


def zero3_placement(zero3: dict) -> tuple[torch.dtype, torch.device]:
    """Where the engine would put the parameters (the run's precision, the device). DeepSpeed
    leaves a model it finds partitioned already in the dtype and on the device it has (the engine
    casts and moves only unpartitioned models), so what is partitioned while the model is built
    goes there first."""
    from deepspeed.accelerator import get_accelerator

    dtype = (torch.bfloat16 if zero3.get("bf16", {}).get("enabled") else
             torch.float16 if zero3.get("fp16", {}).get("enabled") else torch.float32)
    return dtype, torch.device(get_accelerator().current_device_name())


def place(model, dtype: torch.dtype, device: torch.device) -> None:
    """Every parameter that is neither partitioned nor a meta shape in `dtype` on `device`, and
    the buffers on `device` (keeping their dtype)."""
    for p in model.parameters():
        if not p.is_meta and not hasattr(p, "ds_id"):
            p.data = p.data.to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)
    for b in model.buffers():
        b.data = b.data.to(device)
