"""Micro-benchmarks of furnace's kernels; writes one JSON file.

    python benchmarks/kernels.py --out benchmarks/results/kernels-<device>.json          # GPU, full shapes
    python benchmarks/kernels.py --out /tmp/kernels-smoke.json --quick                   # CPU smoke / CI

Attention (TFLOP/s for fwd, bwd, fwd+bwd; fwd = 4*B*H*Lq*Lk*D*density, bwd = 2.5 x fwd):
  * causal self-attention: furnace Triton vs scaled_dot_product_attention's flash and cuDNN
    backends, and flash-attn 2 / FlashAttention-3 where installed (`furnace_speedup`: their
    fwd+bwd time over furnace's); pinned configs from FURNACE_ATTN_CONFIGS when set
    (benchmarks/tune_attention.py);
  * Flamingo mask (text 2048, 5 images x 64 latents, batch 8, 16 heads, hd 128): furnace (the
    general kernel and media_attention, the one specialised to the mask, with span=64 as the
    model calls it -- the one-pass backward -- and without, its two-kernel backward) vs
    FlexAttention (torch.compile, block mask) vs SDPA with a dense boolean mask. Both the
    "dense-equivalent" rate (density 1) and the "useful" rate (visible pairs only) are given;
    media_attention's speed-up over the others per mode, and the memory floor (bytes it must
    move once, at the measured copy bandwidth) with the fraction of it each media row achieves.
Loss scaling (GB/s over the bytes each path must move, and as a fraction of the device's
measured copy bandwidth):
  * furnace grad_stats (one read) and grad_stats + apply_ (read, then read+write);
  * torch: _amp_foreach_non_finite_check_and_unscale_ + clip_grad_norm_;
  * DeepSpeed ZeRO-3 (1 rank): has_overflow + _get_norm_groups + unscale_and_clip_grads, built in
    vs with install_fused_loss_scaling, on the same optimizer and gradients.
Fused ops (ms for fwd and fwd+bwd, furnace Triton vs the PyTorch reference in eager mode, and the
Triton path's relative error against an fp32 reference): rms_norm, add_rms_norm, swiglu, rope_ at
Llama-3.2-1B shapes, and linear_cross_entropy (128256-token vocabulary + new rows) vs materialised
logits + F.cross_entropy, with the peak memory of each on CUDA.
On CPU (no CUDA) Triton runs under TRITON_INTERPRET=1 at toy sizes and the compiled parts are
skipped: the numbers there only prove the script runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402

import furnace_kernels as fk  # noqa: E402
from furnace_kernels import attention_reference  # noqa: E402
from furnace_kernels.flash_attention import attention_triton  # noqa: E402
from furnace_kernels.media_attention_triton import key_ranges, media_attention_triton, query_ranges  # noqa: E402
from furnace_kernels.loss_scale import apply_, grad_stats  # noqa: E402
from furnace.parallel.zero3 import install_fused_loss_scaling  # noqa: E402
from furnace.training.distributed import init_distributed  # noqa: E402
from furnace.training.metrics import run_info  # noqa: E402


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def bench_ms(fn, quick=False):
    """Median time of fn in ms (triton.testing.do_bench on CUDA: L2 flushed before each call,
    launch latency included; a plain timer on CPU)."""
    if CUDA:
        return float(triton.testing.do_bench(fn, warmup=25 if not quick else 5, rep=100 if not quick else 20,
                                             return_mode="median"))
    fn()
    reps = 2 if quick else 5
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def _attn_modes(run_fwd, inputs, quick):
    """Times fwd, bwd, fwd+bwd of run_fwd(*inputs) in ms."""
    out = run_fwd(*inputs)
    do = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            run_fwd(*inputs)

    def fwd_bwd():
        o = run_fwd(*inputs)
        torch.autograd.grad(o, inputs, do)

    o_keep = run_fwd(*inputs)

    def bwd():
        torch.autograd.grad(o_keep, inputs, do, retain_graph=True)

    ms = {"fwd": bench_ms(fwd, quick), "bwd": bench_ms(bwd, quick), "fwd+bwd": bench_ms(fwd_bwd, quick)}
    graph = {}
    # Opt-in (FURNACE_BENCH_CUDAGRAPH=1): device time alone from graph replays. On an H100 a capture
    # left torch's CUDA generator unusable ("Offset increment outside graph capture").
    if CUDA and os.environ.get("FURNACE_BENCH_CUDAGRAPH") == "1":
        for mode, fn in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
            try:
                graph[mode] = float(triton.testing.do_bench_cudagraph(fn, rep=20 if quick else 100,
                                                                      return_mode="median"))
            except Exception as e:  # a path that cannot be captured keeps its eager numbers
                graph[mode] = None
                graph.setdefault("errors", []).append(f"{mode}: {type(e).__name__}: {e}"[:300])
    return ms, graph


def rel_errors(run_fwd, run_ref, inputs):
    """||x - ref|| / ||ref|| of the output and every input gradient; ref in float32."""
    out = run_fwd(*inputs)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, do)
    ref_in = [x.detach().float().requires_grad_() for x in inputs]
    ref = run_ref(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, do.float())
    names = ["out"] + [f"d{n}" for n in "qkv"][:len(inputs)]
    return {n: float((a.float() - b).norm() / b.norm())
            for n, a, b in zip(names, [out, *grads], [ref, *ref_grads])}


def _tflops(ms, flops_fwd):
    mult = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    return {k: (flops_fwd * mult[k] / (v * 1e-3) / 1e12 if v and v > 0 else None) for k, v in ms.items()}


def _record(name, times, flops_fwd, **extra):
    ms, graph = times
    rec = {"impl": name, "ms": ms, "tflops": _tflops(ms, flops_fwd), **extra}
    if graph:
        rec["ms_cudagraph"] = graph
        rec["tflops_cudagraph"] = _tflops({k: v for k, v in graph.items() if k != "errors"}, flops_fwd)
    return rec


def _safe(fn, *a, **k):
    try:
        return fn(*a, **k)
    except Exception as e:  # a baseline that is not available here must not sink the run
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}


# --------------------------------------------------------------------------------------------- attention


def bench_causal(quick, dtype):
    dev = "cuda" if CUDA else "cpu"
    shapes = [(1, 2, 64, 32)] if not CUDA else ([(2, 16, 1024, 128)] if quick else
                                                 [(8, 16, 1024, 128), (4, 16, 2048, 128), (2, 16, 4096, 128),
                                                  (1, 16, 8192, 128), (4, 32, 2048, 64), (4, 16, 2048, 96)])
    results = []
    for b, h, l, d in shapes:
        q, k, v = (torch.randn(b, h, l, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        flops = 4 * b * h * l * l * d * 0.5  # causal: half the pairs
        row = {"shape": {"B": b, "H": h, "L": l, "D": d}, "dtype": str(dtype), "results": []}
        row["results"].append(_safe(lambda: _record(
            "furnace_triton", _attn_modes(lambda q, k, v: attention_triton(q, k, v, causal=True), (q, k, v), quick), flops)))
        row["furnace_rel_err_vs_fp32"] = _safe(rel_errors, lambda q, k, v: attention_triton(q, k, v, causal=True),
                                               lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                                                   q, k, v, is_causal=True), (q, k, v))
        if CUDA:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def sdpa_flash(q, k, v):
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

            def sdpa_cudnn(q, k, v):
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

            row["results"].append(_safe(lambda: _record("sdpa_flash", _attn_modes(sdpa_flash, (q, k, v), quick), flops)))
            row["results"].append(_safe(lambda: _record("sdpa_cudnn", _attn_modes(sdpa_cudnn, (q, k, v), quick), flops)))
            for name, fn in _flash_attn_impls():
                row["results"].append(_safe(lambda: _record(name, _attn_modes(fn, (q, k, v), quick), flops)))
            row["furnace_speedup"] = _speedups(row["results"])
        results.append(row)
    return results


def _flash_attn_impls():
    """The flash-attn packages where installed: FlashAttention-2 (`flash_attn`) and -3
    (`flash_attn_interface`, Hopper). They take [B, L, H, D]; the transposes are timed too."""
    impls = []
    for module, name in (("flash_attn", "flash_attn_2"), ("flash_attn_interface", "flash_attn_3")):
        try:
            mod = __import__(module)
        except ImportError:
            continue

        def run(q, k, v, f=mod.flash_attn_func):
            out = f(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            out = out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)
            return out.transpose(1, 2)

        impls.append((name, run))
    return impls


def _speedups(results):
    """furnace_triton's fwd+bwd time against each other row's: > 1 means furnace is faster."""
    ms = {r["impl"]: r["ms"]["fwd+bwd"] for r in results if "impl" in r and r["ms"].get("fwd+bwd")}
    mine = ms.pop("furnace_triton", None)
    return {name: round(other / mine, 3) for name, other in ms.items()} if mine else {}


def _flamingo_segments(b, t_txt, n_img, n_lat, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = torch.zeros(b, t_txt, dtype=torch.int32)
    for r in range(b):
        # images interleaved with text: image i starts somewhere in the sequence
        cuts = torch.sort(torch.randint(0, t_txt, (n_img,), generator=g)).values
        cuts[0] = min(int(cuts[0]), t_txt // 16)
        for c in cuts:
            qs[r, c:] += 1
    ks = torch.arange(1, n_img + 1, dtype=torch.int32).repeat_interleave(n_lat).expand(b, -1).contiguous()
    return qs.to(dev), ks.to(dev)


# media_attention without `span=`: its two-kernel backward (dQ, then dK/dV), for comparison
MEDIA_TWO_KERNEL = "furnace_media_triton_two_kernel_bwd"


def bench_flamingo(quick, dtype):
    dev = "cuda" if CUDA else "cpu"
    if CUDA:
        b, h, t_txt, n_img, n_lat, d = (2, 16, 1024, 5, 64, 128) if quick else (8, 16, 2048, 5, 64, 128)
    else:
        b, h, t_txt, n_img, n_lat, d = 1, 2, 48, 3, 8, 32
    lk = n_img * n_lat
    qs, ks = _flamingo_segments(b, t_txt, n_img, n_lat, dev)
    q = torch.randn(b, h, t_txt, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, lk, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(b, h, lk, d, device=dev, dtype=dtype, requires_grad=True)
    visible = (qs[:, :, None] == ks[:, None, :])
    density = float(visible.float().mean())
    flops_dense = 4 * b * h * t_txt * lk * d
    row = {"shape": {"B": b, "H": h, "T_txt": t_txt, "images": n_img, "latents": n_lat, "D": d},
           "dtype": str(dtype), "mask_density": density,
           "note": "tflops = dense-equivalent (all Lq x Lk pairs); tflops_useful = visible pairs only",
           "results": []}

    def add(name, fn):
        def go():
            times = _attn_modes(fn, (q, k, v), quick)
            rec = _record(name, times, flops_dense)
            rec["tflops_useful"] = _tflops(times[0], flops_dense * density)
            return rec
        row["results"].append(_safe(go))

    add("furnace_triton", lambda q, k, v: attention_triton(q, k, v, q_segment=qs, kv_segment=ks))
    row["furnace_rel_err_vs_fp32"] = _safe(
        rel_errors, lambda q, k, v: attention_triton(q, k, v, q_segment=qs, kv_segment=ks),
        lambda q, k, v: attention_reference(q, k, v, q_segment=qs, kv_segment=ks), (q, k, v))
    qs64, ks64 = qs.long(), ks.long()  # the model's ids are int64 (the kernel's tables want them so)

    def media(span):
        return lambda q, k, v: media_attention_triton(q, k, v, qs64, ks64, span=span)

    # as the model calls it (span=n_lat: the one-pass backward), and with the two-kernel backward
    for name, span in (("furnace_media_triton", n_lat), (MEDIA_TWO_KERNEL, None)):
        add(name, media(span))
        row[f"{name}_rel_err_vs_fp32"] = _safe(
            rel_errors, media(span), lambda q, k, v: attention_reference(q, k, v, q_segment=qs, kv_segment=ks),
            (q, k, v))
    row["media_memory_floor"] = _safe(_media_floor, q, k, qs, ks, quick)
    if CUDA:
        mask = visible[:, None]  # [B, 1, Lq, Lk]; rows that see nothing give NaN rows in SDPA (timing only)

        def sdpa_mask(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        add("sdpa_dense_bool_mask", sdpa_mask)

        def flex():
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def mask_mod(bi, hi, qi, ki):
                return qs[bi, qi] == ks[bi, ki]

            bm = create_block_mask(mask_mod, B=b, H=None, Q_LEN=t_txt, KV_LEN=lk, device=dev)
            compiled = torch.compile(flex_attention)

            def run(q, k, v):
                return compiled(q, k, v, block_mask=bm)

            times = _attn_modes(run, (q, k, v), quick)
            rec = _record("flex_attention_compiled", times, flops_dense)
            rec["tflops_useful"] = _tflops(times[0], flops_dense * density)
            return rec

        row["results"].append(_safe(flex))
    else:
        row["skipped"] = ["sdpa_dense_bool_mask", "flex_attention_compiled"]
    row["media_speedup"] = _media_speedups(row)
    floor = row["media_memory_floor"]
    if "ms" in floor:
        floor["fraction_achieved"] = {name: {m: floor["ms"][m] / rec["ms"][m] for m in floor["ms"]}
                                      for name in ("furnace_media_triton", MEDIA_TWO_KERNEL)
                                      if (rec := _impl(row, name))}
    return row


def _impl(row, name):
    return next((r for r in row["results"] if r.get("impl") == name and "ms" in r), None)


def _media_speedups(row):
    """Time of each other row / time of furnace_media_triton, per mode (> 1: the media kernel is faster)."""
    media = _impl(row, "furnace_media_triton")
    out = {}
    for name in ("flex_attention_compiled", "furnace_triton", "sdpa_dense_bool_mask", MEDIA_TWO_KERNEL):
        other = _impl(row, name)
        if media and other:
            out[f"vs_{name}"] = {m: other["ms"][m] / media["ms"][m] for m in media["ms"]}
    return out


def _media_floor(q, k, qs, ks, quick):
    """Least time each mode of the media kernel could take: the bytes it must read and write once
    at the measured copy bandwidth. fwd: q, k, v, o and the segment ids + range tables; bwd:
    q, k, v, o, dO, dq, dk, dv and the same tables; fwd+bwd: the same as bwd (every tensor once;
    in practice q is read and o written by the forward and read again by the backward).
    `query_passes`: the query-sized passes (q, o, dO, dq) each media row makes against the floor's."""
    big, small = q.numel() * q.element_size(), k.numel() * k.element_size()  # q / o / dO / dq; k / v / dk / dv
    qs, ks = qs.long(), ks.long()
    tables = [*key_ranges(qs, ks).values(), *query_ranges(qs, ks).values()]
    ids = sum(t.numel() * t.element_size() for t in (qs, ks, *tables))
    nbytes = {"fwd": 2 * big + 2 * small + ids, "bwd": 4 * big + 4 * small + ids}
    nbytes["fwd+bwd"] = nbytes["bwd"]
    gbs = copy_bandwidth(min(max(big, 1 << 16), 1 << 30), quick)
    passes = {"floor": {"fwd": 2, "bwd": 4, "fwd+bwd": 4},
              # fwd reads q, writes o; the one-pass bwd reads q, o, dO, writes dq
              "furnace_media_triton": {"fwd": 2, "bwd": 4, "fwd+bwd": 6},
              # dQ reads q, o, dO, writes dq; dK/dV reads q and dO again
              MEDIA_TWO_KERNEL: {"fwd": 2, "bwd": 6, "fwd+bwd": 8}}
    return {"copy_bandwidth_gbs": gbs, "bytes": nbytes, "table_bytes": ids, "query_passes": passes,
            "ms": {m: n / (gbs * 1e9) * 1e3 for m, n in nbytes.items()}}


# --------------------------------------------------------------------------------------------- loss scaling


def _grad_list(total, dtype, dev, seed=0):
    """Odd-sized tensors like a transformer's gradient partitions, about `total` elements."""
    g = torch.Generator().manual_seed(seed)
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(torch.randint(1, max(2, total // 20), (1,), generator=g)) | 1)
    return [torch.randn(n, device=dev, dtype=dtype) * 1e-2 for n in sizes]


def copy_bandwidth(nbytes, quick):
    dev = "cuda" if CUDA else "cpu"
    src = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), quick)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def bench_loss_scale(quick):
    dev = "cuda" if CUDA else "cpu"
    total = (1 << 14) if not CUDA else ((1 << 24) if quick else (1 << 28))
    out = {"elements": None, "results": []}
    copy_gbs = copy_bandwidth(max(total * 4, 1 << 16), quick)
    out["copy_bandwidth_gbs"] = copy_gbs
    for dtype in (torch.float32, torch.float16):
        grads = _grad_list(total, dtype, dev)
        n = sum(t.numel() for t in grads)
        nbytes = n * grads[0].element_size()
        sect = {"dtype": str(dtype), "tensors": len(grads), "elements": n, "bytes": nbytes, "results": []}
        backend = "triton"

        def rec(name, ms, moved):
            gbs = moved / (ms * 1e-3) / 1e9
            return {"impl": name, "ms": ms, "bytes_moved": moved, "gbs": gbs, "fraction_of_copy_bw": gbs / copy_gbs}

        sect["results"].append(_safe(lambda: rec("furnace_grad_stats", bench_ms(
            lambda: grad_stats(grads, 1.0 / 1024, backend=backend)[0].item(), quick), nbytes)))

        def fused_full():
            s, nf = grad_stats(grads, 1.0 / 1024, backend=backend)
            s, nf = float(s), bool(nf)
            if not nf:
                apply_(grads, 1.0 / 1024 / max(1.0, math.sqrt(s) / 1.0), backend=backend)

        sect["results"].append(_safe(lambda: rec("furnace_grad_stats+apply_", bench_ms(fused_full, quick), 3 * nbytes)))

        params = [torch.nn.Parameter(torch.empty_like(gr)) for gr in grads]
        for p, gr in zip(params, grads):
            p.grad = gr

        def torch_path():
            found = torch.zeros(1, device=dev)
            inv = torch.full((1,), 1.0 / 1024, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
            if not bool(found.item()):
                torch.nn.utils.clip_grad_norm_(params, 1.0)

        # unscale: read + write; clip_grad_norm_: read (norm) + read + write (multiply)
        if CUDA or dtype == torch.float32:
            sect["results"].append(_safe(lambda: rec("torch_amp_unscale+clip_grad_norm_", bench_ms(torch_path, quick), 5 * nbytes)))
        out["results"].append(sect)
    out["deepspeed_zero3"] = _safe(bench_deepspeed_zero3, quick, copy_gbs)
    return out


def bench_deepspeed_zero3(quick, copy_gbs):
    """DeepSpeed ZeRO-3 step pieces on one optimizer: built-in vs fused (1 rank)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    init_distributed()
    acc = get_accelerator()
    if not acc.is_fp16_supported():  # CPU accelerator without oneDNN fp16: the path itself works
        acc.is_fp16_supported = lambda: True
    width = 64 if not CUDA else (1024 if quick else 4096)
    layers = 2 if not CUDA else 8
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "fp16": {"enabled": True, "initial_scale_power": 8}, "steps_per_print": 10**9}
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(2, width, device=engine.device, dtype=torch.float16)
    engine.backward(engine(x).float().pow(2).mean())
    grads = [g for i in range(len(opt.fp16_groups)) for g in opt.averaged_gradients[i]]
    n = sum(g.numel() for g in grads)
    nbytes_16 = n * 2
    # unscale/clip touches the fp32 partitions: prepare them once, as step() does
    for i in range(len(opt.fp16_groups)):
        if opt.fp32_partitioned_groups_flat[i].grad is None:
            opt.fp32_partitioned_groups_flat[i].grad = torch.zeros_like(opt.fp32_partitioned_groups_flat[i])

    def builtin():
        from deepspeed.runtime.utils import combine_grad_norm_groups
        opt.has_overflow(partition_gradients=True)
        norm = combine_grad_norm_groups(opt._get_norm_groups())
        for i in range(len(opt.fp16_groups)):
            opt.unscale_and_clip_grads(i, norm)

    ms_builtin = bench_ms(builtin, quick)
    install_fused_loss_scaling(opt, replace_scaler=False)

    def fused():
        from deepspeed.runtime.utils import combine_grad_norm_groups
        opt._overflow_check_and_loss_scale_update(update_scale=False)
        norm = combine_grad_norm_groups(opt._get_norm_groups())
        for i in range(len(opt.fp16_groups)):
            opt.unscale_and_clip_grads(i, norm)

    ms_fused = bench_ms(fused, quick)
    # bytes: fp16 partitions read (built-in reads them twice: isinf/isnan pass and norm pass) +
    # fp32 partitions read+written once by the multiply
    moved_fused = nbytes_16 + 2 * 4 * n
    moved_builtin = 2 * nbytes_16 + 2 * 4 * n
    return {
        "elements": n,
        "deepspeed_builtin": {"ms": ms_builtin, "bytes_moved": moved_builtin,
                              "gbs": moved_builtin / (ms_builtin * 1e-3) / 1e9},
        "furnace_fused": {"ms": ms_fused, "bytes_moved": moved_fused, "gbs": moved_fused / (ms_fused * 1e-3) / 1e9,
                          "fraction_of_copy_bw": moved_fused / (ms_fused * 1e-3) / 1e9 / copy_gbs},
        "speedup": ms_builtin / ms_fused,
    }


# --------------------------------------------------------------------------------------------- fused ops


def _fused_times(fn, inputs, quick):
    """ms of fwd (no grad) and fwd+bwd (a fixed random cotangent on every output)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cots = [torch.randn_like(o) if o.dtype.is_floating_point else None for o in outs]

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        o = fn(*inputs)
        o = o if isinstance(o, tuple) else (o,)
        pairs = [(a, c) for a, c in zip(o, cots) if c is not None and a.requires_grad]
        torch.autograd.backward([a for a, _ in pairs], [c for _, c in pairs])

    return {"fwd": bench_ms(fwd, quick), "fwd+bwd": bench_ms(fwd_bwd, quick)}


def _fused_err(fn, ref, inputs):
    """||x - ref|| / ||ref|| of every output and input gradient; ref on fp32 copies of the inputs."""
    def run(f, xs):
        outs = f(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator().manual_seed(0)
        cots = [torch.randn(o.shape, generator=g).to(o.device) for o in outs]
        torch.autograd.backward(list(outs), [c.to(o.dtype) for o, c in zip(outs, cots)])
        return [o.detach().float() for o in outs] + [x.grad.float() for x in xs if x.grad is not None]

    mine = run(fn, [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs])
    want = run(ref, [x.detach().float().requires_grad_(x.requires_grad) for x in inputs])
    return [float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(mine, want)]


def _peak_mb(fn, inputs):
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_fused(quick, dtype):
    dev = "cuda" if CUDA else "cpu"
    if CUDA:  # Llama-3.2-1B: hidden 2048, MLP 8192, 32 / 8 heads of 64
        tokens, hid, inter, heads, kv, hd, vocab, new = (4096 if quick else 16384), 2048, 8192, 32, 8, 64, 128256, 3
    else:
        tokens, hid, inter, heads, kv, hd, vocab, new = 24, 48, 104, 4, 2, 16, 97, 3
    seq = min(tokens, 2048)
    bsz = tokens // seq

    def t(*shape, grad=True, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dtype).requires_grad_(grad)

    w = (1 + 0.1 * torch.randn(hid, device=dev)).to(dtype).requires_grad_()
    pos = torch.arange(seq, device=dev)[None].expand(bsz, seq)
    inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    freqs = torch.cat([pos[..., None].float() * inv] * 2, -1)
    cos, sin = freqs.cos().to(dtype)[:, None], freqs.sin().to(dtype)[:, None]
    labels = torch.randint(0, vocab + new, (tokens,), device=dev)
    labels[::5] = -100

    def rope(backend):
        def fn(q, k):
            return fk.rope_(q.clone(), k.clone(), cos, sin, backend=backend)
        return fn

    def lce_fused(h, w_lm, w_new):
        return fk.linear_cross_entropy(h, [w_lm, w_new], labels, backend="triton")[0]

    def lce_dense(h, w_lm, w_new):
        return fk.linear_cross_entropy_dense(h, [w_lm, w_new], labels)[0]

    ops = [
        ("rms_norm", lambda x, w: fk.rms_norm(x, w, 1e-5, backend="triton"),
         lambda x, w: fk.rms_norm(x, w, 1e-5, backend="reference"), lambda: [t(tokens, hid), w]),
        ("add_rms_norm", lambda x, r, w: fk.add_rms_norm(x, r, w, 1e-5, backend="triton"),
         lambda x, r, w: fk.add_rms_norm(x, r, w, 1e-5, backend="reference"), lambda: [t(tokens, hid), t(tokens, hid), w]),
        ("swiglu", lambda g, u: fk.swiglu(g, u, backend="triton"), lambda g, u: fk.swiglu(g, u, backend="reference"),
         lambda: [t(tokens, inter), t(tokens, inter)]),
        ("rope_", rope("triton"), rope("reference"), lambda: [t(bsz, heads, seq, hd), t(bsz, kv, seq, hd)]),
        # frozen LM head (Flamingo's default), trainable new-token rows
        ("linear_cross_entropy", lce_fused, lce_dense,
         lambda: [t(tokens, hid), t(vocab, hid, grad=False, scale=0.02), t(new, hid, scale=0.02)]),
    ]
    rows = []
    for name, fused, ref, make in ops:
        inputs = make()
        row = {"op": name, "dtype": str(dtype), "tokens": tokens, "results": []}
        row["results"].append(_safe(lambda: {"impl": "furnace_triton", "ms": _fused_times(fused, inputs, quick),
                                             "peak_mb_fwd_bwd": _peak_mb(fused, inputs)}))
        row["results"].append(_safe(lambda: {"impl": "torch_reference" if name != "linear_cross_entropy"
                                             else "dense_logits+F.cross_entropy",
                                             "ms": _fused_times(ref, inputs, quick), "peak_mb_fwd_bwd": _peak_mb(ref, inputs)}))
        row["furnace_rel_err_vs_fp32"] = _safe(_fused_err, fused, ref, inputs)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="small shapes (CI smoke on CPU; a fast look on GPU)")
    ap.add_argument("--only", choices=["attention", "loss_scale", "fused"], default=None)
    args = ap.parse_args(argv)

    report = {
        **run_info(argv),
        "cuda": CUDA,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if not CUDA:
        report["note"] = "no CUDA: Triton under the interpreter at toy sizes; numbers are not performance data"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write():  # after every section, so a run cut short (a GPU session's time limit) keeps its numbers
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    if args.only in (None, "attention"):
        dtypes = [torch.bfloat16, torch.float16] if CUDA else [torch.float32]
        report["attention_flamingo"] = [bench_flamingo(args.quick, dt) for dt in dtypes]
        write()
        report["attention_causal"] = [r for dt in dtypes for r in bench_causal(args.quick, dt)]
        write()
    if args.only in (None, "fused"):
        dtypes = [torch.bfloat16] if CUDA else [torch.float32]
        report["fused"] = [r for dt in dtypes for r in bench_fused(args.quick, dt)]
        write()
    if args.only in (None, "loss_scale"):
        report["loss_scale"] = bench_loss_scale(args.quick)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write()
    print(json.dumps({k: report[k] for k in ("device", "versions", "command")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
