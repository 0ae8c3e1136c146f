"""Pin the Triton attention kernels' configs per head dim: a multi-repeat tune; writes the table
kernels/flash_attention.py reads (`FURNACE_ATTN_CONFIGS`, or kernels/attention_configs.json).

    python benchmarks/tune_attention.py --out attention-configs.json          # GPU
    FURNACE_ATTN_CONFIGS=attention-configs.json python benchmarks/kernels.py --out kernels.json

Triton's autotuner times each config once, with a noisy clock, the first time a shape runs, so
two runs can pick different configs (the H100 notes saw the backward at hd 128, L 1024 take
0.42 ms in one run and 0.80 ms in the next). Here every config of the forward and the backward
lists is timed `--repeats` times (median of `triton.testing.do_bench` medians) at each head dim,
mask and length; the pinned config per (kernel, head dim, mask, dtype) is the one with the best
geometric mean over the lengths of its time relative to the fastest config at that length. The
backward's two kernels (dK/dV and dQ) share one config, as `forced_configs` launches them.
The JSON holds the table under this device's name (merged into an existing --out file), and every
timing. On CPU the interpreter runs one toy case: the numbers there only prove the script runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402

from furnace_kernels import flash_attention as fa  # noqa: E402
from furnace.training.metrics import run_info  # noqa: E402

KERNELS = {"fwd": ["_attn_fwd"], "bwd": ["_attn_bwd_dkdv", "_attn_bwd_dq"]}


def _ms(fn, repeats: int) -> float:
    if CUDA:
        runs = [triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") for _ in range(repeats)]
    else:
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t) * 1e3)
    return float(sorted(runs)[len(runs) // 2])


def _inputs(b, h, length, d, dtype, segments, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if CUDA else "cpu"
    q, k, v = (torch.randn(b, h, length, d, generator=g).to(dev, dtype).requires_grad_() for _ in range(3))
    seg = None
    if segments:  # packed documents of ~length/4 tokens: the segment path with block skipping
        seg = (torch.arange(length) // max(1, length // 4)).to(dev, torch.int32).expand(b, -1).contiguous()
    return q, k, v, seg


def _time_case(which, cfg, q, k, v, seg, causal, repeats):
    def fwd():
        return fa.attention_triton(q, k, v, causal=causal, q_segment=seg, kv_segment=seg)

    with fa.forced_configs(**{which: cfg}):
        if which == "fwd":
            return _ms(fwd, repeats)
        out = fwd()
        grad = torch.ones_like(out)
        return _ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), repeats)


def _fits(cfg, case):
    """The autotuner's own pruning (shared memory, tiles longer than the sequence)."""
    q, length, d = case["q"], case["length"], case["d"]
    named = {"Q": q, "Q_BUCKET": fa._bucket(length), "K_BUCKET": fa._bucket(length)}
    return cfg in fa._prune([cfg], named, BLOCK_D=max(16, triton.next_power_of_2(d)))


def tune(cases: list[dict], repeats: int, log=print) -> tuple[list[dict], list[dict]]:
    """(pinned entries, timings) over `cases` (dicts of q, k, v, seg, causal, d, dtype, length)."""
    timings = []
    best = {}
    for which, configs in (("fwd", fa._fwd_configs() if not CUDA else fa._FWD_CONFIGS),
                           ("bwd", fa._bwd_configs() if not CUDA else fa._BWD_CONFIGS)):
        for case in cases:
            key = (which, case["d"], case["causal"], case["seg"] is not None, case["dtype"])
            row = {}
            for cfg in configs:
                if not _fits(cfg, case):
                    continue
                name = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}w{cfg.num_warps}s{cfg.num_stages}"
                try:
                    row[name] = (cfg, _time_case(which, cfg, case["q"], case["k"], case["v"], case["seg"],
                                                 case["causal"], repeats))
                except Exception as e:  # a config that fails to compile here is not a candidate
                    log(f"  {which} {name}: {type(e).__name__}: {str(e)[:120]}")
            if not row:
                continue
            fastest = min(ms for _, ms in row.values())
            timings.append({"which": which, "head_dim": case["d"], "causal": case["causal"],
                            "segments": case["seg"] is not None, "dtype": case["dtype"], "length": case["length"],
                            "ms": {n: ms for n, (_, ms) in row.items()}})
            log(f"{which} d{case['d']} causal={case['causal']} seg={case['seg'] is not None} L{case['length']}: "
                + ", ".join(f"{n} {ms:.3f}" for n, (_, ms) in sorted(row.items(), key=lambda x: x[1][1])))
            for n, (cfg, ms) in row.items():
                best.setdefault(key, {}).setdefault(n, [cfg, []])[1].append(math.log(ms / fastest))
    entries = []
    for (which, d, causal, seg, dtype), scores in best.items():
        lengths = max(len(v[1]) for v in scores.values())
        # a config must have run at every length to be pinned
        name, (cfg, logs) = min(((n, v) for n, v in scores.items() if len(v[1]) == lengths),
                                key=lambda item: sum(item[1][1]))
        for kernel in KERNELS[which]:
            entries.append({"kernel": kernel, "head_dim": max(16, triton.next_power_of_2(d)), "causal": causal,
                            "segments": seg, "dtype": dtype, "BLOCK_M": cfg.kwargs["BLOCK_M"],
                            "BLOCK_N": cfg.kwargs["BLOCK_N"], "num_warps": cfg.num_warps,
                            "num_stages": cfg.num_stages,
                            "slowdown_vs_best_per_length": round(math.exp(sum(logs) / len(logs)), 4)})
    return entries, timings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the table to write (merged into an existing one)")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-tokens", type=int, default=16384, help="B x L per case (B = this / L)")
    ap.add_argument("--heads", type=int, default=16)
    args = ap.parse_args(argv)

    cases = []
    if CUDA:
        grid = [(d, length, dt) for d in map(int, args.head_dims.split(",")) for length in map(int, args.lengths.split(","))
                for dt in args.dtypes.split(",")]
        heads = args.heads
    else:
        grid, heads = [(32, 24, "float32")], 2
    for d, length, dt in grid:
        b = max(1, args.batch_tokens // length) if CUDA else 1
        for causal, segments in ((True, False), (False, True)):
            q, k, v, seg = _inputs(b, heads, length, d, getattr(torch, dt), segments)
            cases.append({"q": q, "k": k, "v": v, "seg": seg, "causal": causal, "d": d, "dtype": dt, "length": length})
    t0 = time.perf_counter()
    entries, timings = tune(cases, args.repeats if CUDA else 1)
    device = fa._device_name(cases[0]["q"])
    table = {"about": "", "configs": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            table = json.load(f)
    table["about"] = ("Pinned Triton attention configs per device, written by benchmarks/tune_attention.py "
                      "(a multi-repeat tune); a launch whose kernel, head dim block, mask and dtype are listed "
                      "skips the autotuner.")
    table["configs"][device] = entries
    table.setdefault("runs", {})[device] = {**run_info(argv), "repeats": args.repeats if CUDA else 1,
                                            "seconds": round(time.perf_counter() - t0, 1), "timings": timings}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(table, f, indent=2)
    print(f"pinned {len(entries)} configs for {device} in {time.perf_counter() - t0:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
