"""Weight-only quantised decoding of the language model: `quantize_lm(model, "int8" | "int4")`.

Uses bitsandbytes (an optional extra, `pip install furnace[quantize]`), imported only when a mode
other than "none" is asked for. It runs int8 (LLM.int8(), `Linear8bitLt`) and 4-bit NF4
(`Linear4bit`) on CPU and CUDA through one API. (torchao was dropped: merely installed, it is
imported by transformers at start-up in every process, +1.07 s and two warnings on CPU hosts, and
its CPU int4 exists only as a prototype config.)

Only the nn.Linear layers of `model.lm.layers` (and an untied `lm_head`) are replaced, each under
its own name in its parent (LoRA adapters are merged into their weights first); the embedding,
vision tower, resampler and xattn blocks stay in full precision. The decoder calls these linears as modules (never reads their `.weight`), so its
forward, the KV-cache decoding and beam search run unchanged. Inference only: the quantised
weights stop training. The bytes reported are those of the targeted weights: before, their float
storage; after, the int8 data plus its per-row scales, or the packed 4-bit data plus everything
its quant_state holds (absmax, the NF4 code, and the second-level statistics when nested).
"""
import logging

import torch
from torch import nn

from .lora import merge_lora

MODES = ("none", "int8", "int4")

_QUIET = "Failed to load CPU gemm_4bit_forward"  # an optional CPU kernel hub; bitsandbytes falls back


class _DropKernelHubWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_QUIET)


def _import_bnb():
    # bitsandbytes logs this on import on AVX512-bf16 CPUs without the `kernels` package; its own
    # CPU kernel is used instead, so the line is noise. Only this one message of this logger is dropped.
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropKernelHubWarning) for f in logger.filters):
        logger.addFilter(_DropKernelHubWarning())
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError('--quantize needs bitsandbytes: pip install "furnace[quantize]"') from None
    return bnb


def _nbytes(t) -> int:
    return 0 if not isinstance(t, torch.Tensor) else t.numel() * t.element_size()


def _weight_bytes(linear: nn.Module) -> int:
    """Storage of a linear's weight: float, int8 + per-row scales, or packed 4-bit + quant_state."""
    w = linear.weight
    total = _nbytes(w)
    # Int8Params: one fp32 scale per output row (moved to the module's state by its first forward)
    scb = getattr(w, "SCB", None)
    total += _nbytes(scb if scb is not None else getattr(getattr(linear, "state", None), "SCB", None))
    qs = getattr(w, "quant_state", None)
    if qs is not None:  # Params4bit: absmax per block, the NF4 code, nested statistics
        total += sum(_nbytes(getattr(qs, n, None)) for n in ("absmax", "code", "offset"))
        if getattr(qs, "state2", None) is not None:
            total += sum(_nbytes(getattr(qs.state2, n, None)) for n in ("absmax", "code"))
    return total


def _targets(lm: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, linear) for every linear of the decoder layers and an untied head."""
    out = [(parent, name, m) for parent in lm.layers.modules()
           for name, m in parent.named_children() if isinstance(m, nn.Linear)]
    if isinstance(lm.lm_head, nn.Linear) and lm.lm_head.weight is not lm.embed_tokens.weight:
        out.append((lm, "lm_head", lm.lm_head))  # a tied head shares the embedding, which stays as it is
    return out


def _quantised(bnb, linear: nn.Linear, mode: str) -> nn.Module:
    """The bitsandbytes replacement of `linear`, quantised on its device (bitsandbytes quantises on `.to`)."""
    w = linear.weight.detach()
    bias = linear.bias is not None
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                has_fp16_weights=False, threshold=6.0, device="meta")
        # Int8Params quantises on `.to(device)` only when coming from the CPU (as when loading a
        # checkpoint), so a weight already on an accelerator is staged through host memory.
        q.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, quant_type="nf4",
                              compute_dtype=w.dtype, device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    if bias:
        q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return q.to(w.device)


def quantize_lm(model: nn.Module, mode: str) -> dict:
    """Quantise the LM decoder's linear weights in place; returns
    {"mode", "quantized_linears", "bytes_before", "bytes_after"} (bytes of those weights)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode != "none":
        merge_lora(model.lm)  # LoRA folded into its weights first: the adapters are linears too
    targets = _targets(model.lm)
    before = sum(_weight_bytes(m) for _, _, m in targets)
    if mode == "none" or not targets:
        return {"mode": mode, "quantized_linears": 0, "bytes_before": before, "bytes_after": before}
    if any(m.weight.device.type == "meta" for _, _, m in targets):
        raise ValueError("cannot quantise a decoder on the meta device: load or materialise its weights first")
    if any(not m.weight.is_floating_point() for _, _, m in targets):
        raise ValueError("the decoder is already quantised: load it again to quantise it another way")
    bnb = _import_bnb()
    for parent, name, linear in targets:
        setattr(parent, name, _quantised(bnb, linear, mode))
    done = _targets(model.lm)
    return {"mode": mode, "quantized_linears": len(done),
            "bytes_before": before, "bytes_after": sum(_weight_bytes(m) for _, _, m in done)}
