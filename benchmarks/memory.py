"""Per-rank model-state memory under layout A (ZeRO-3 x TP x DP): parameter, gradient and
optimizer-state bytes, measured on the tensors DeepSpeed actually holds after one real step.

    python benchmarks/memory.py --out benchmarks/results/memory-cpu.json                # dp1,dp2,dp4,tp2,tp2dp2
    python benchmarks/memory.py --layouts dp1,tp2 --preset demo --out /tmp/mem.json

Each layout runs in its own `torchrun` job (gloo on the CPU, NCCL with GPUs). Per rank:

    param_bytes      this rank's ZeRO-3 partition of every parameter (p.ds_tensor)
    grad_bytes       this rank's gradient partitions (ZeRO-3's flat fp32 gradient buffer)
    optimizer_bytes  Adam moments plus fp32 master partitions, as held by the optimizer
    sharded_*        the same, for the tensor-parallel layers only (q/k/v/o, MLP, xattn,
                     resampler, embeddings, head); everything else is replicated over tp

Expected: totals ~1/N of DP 1 at DP N (ZeRO-3 partitions over the data-parallel group), and
with TP 2 the sharded layers' bytes ~1/2 (the replicated remainder, norms, gates, vision tower,
stays whole per tp rank, then partitioned over dp).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from furnace.config import load_config, validate  # noqa: E402
from furnace.parallel.apply import is_tp_sharded  # noqa: E402
from furnace.parallel.topology import Topology  # noqa: E402
from furnace.training.build import build  # noqa: E402
from furnace.training.distributed import init_distributed  # noqa: E402
from furnace.training.metrics import run_info  # noqa: E402

LAYOUTS = {"dp1": (1, 1), "dp2": (2, 1), "dp4": (4, 1), "tp2": (2, 2), "tp2dp2": (4, 2)}  # name: (ranks, tp)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--preset", default="demo")
    p.add_argument("--layouts", default="dp1,dp2,dp4,tp2,tp2dp2", help=f"comma list of {sorted(LAYOUTS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON path written by each rank job
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _bytes(t) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def worker(args) -> None:
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    mb = 2
    vocab = 512  # an LM vocabulary that holds the demo tokenizer's ids: no new-token rows
    cfg = load_config(args.preset, [*args.set, f"parallel.tp={args.tp}", "parallel.zero_stage=3",
                                    f"train.micro_batch_size={mb}", f"train.global_batch_size={mb * world // args.tp}",
                                    "model.lm.path=null", "model.vision.path=null", "data.tokenizer=null",
                                    f"model.lm.vocab_size={vocab}"])
    validate(cfg, world, check_paths=False)
    topo = Topology(tp=args.tp)
    run = build(cfg, topo, loaders=False)
    model, engine = run.model, run.engine
    v = cfg.model.vision
    L = cfg.data.max_length
    ids = torch.randint(model.eoc_token_id + 1, vocab, (mb, L))  # above the tokenizer's special ids
    ids[:, 1] = model.image_token_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "images": torch.randn(mb, 1, 1, 3, v.image_size, v.image_size),
             "media_valid": torch.ones(mb, 1, dtype=torch.bool)}
    batch = {k: t.to(engine.device) for k, t in batch.items()}
    loss = engine(batch)
    engine.backward(loss)
    opt = engine.optimizer
    params = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    rec = {"rank": rank, "coord": {"dp": topo.coord.dp, "tp": topo.coord.tp}}
    part = {n: (p.ds_tensor if hasattr(p, "ds_tensor") else p) for n, p in params}
    rec["param_bytes"] = sum(_bytes(t) for t in part.values())
    rec["sharded_param_bytes"] = sum(_bytes(t) for n, t in part.items() if is_tp_sharded(n))
    gbuf = getattr(opt, "grad_partitions_flat_buffer", None)
    rec["grad_bytes"] = _bytes(gbuf)
    gsize = gbuf.element_size() if gbuf is not None else 4
    rec["sharded_grad_bytes"] = sum(t.numel() * gsize for n, t in part.items()
                                    if is_tp_sharded(n) and dict(params_by_name(model))[n].requires_grad)
    engine.step()  # Adam's moments exist after the first step
    inner = getattr(opt, "optimizer", opt)
    moments = sum(_bytes(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    master = sum(_bytes(t) for t in getattr(opt, "fp32_partitioned_groups_flat", []))
    rec["optimizer_bytes"] = moments + master
    rec["optimizer_moment_bytes"], rec["optimizer_master_bytes"] = moments, master
    # the sharded layers' share of the optimizer state is their share of the trainable partition
    trainable = sum(t.numel() for n, t in part.items() if dict(params_by_name(model))[n].requires_grad)
    sh = sum(t.numel() for n, t in part.items() if is_tp_sharded(n) and dict(params_by_name(model))[n].requires_grad)
    rec["sharded_optimizer_bytes"] = round(rec["optimizer_bytes"] * sh / max(trainable, 1))
    rec["total_bytes"] = rec["param_bytes"] + rec["grad_bytes"] + rec["optimizer_bytes"]
    rec["sharded_total_bytes"] = rec["sharded_param_bytes"] + rec["sharded_grad_bytes"] + rec["sharded_optimizer_bytes"]
    rec["full_model_param_bytes"] = sum(p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else _bytes(p)
                                        for _, p in params)
    out = [None] * world
    dist.all_gather_object(out, rec)
    if rank == 0:
        Path(args.worker).write_text(json.dumps(out))
    dist.barrier()


def params_by_name(model):
    seen = set()
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield n, p


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not args.out:
        print("memory.py: --out FILE.json is required", file=sys.stderr)
        return 2
    results = {}
    for name in args.layouts.split(","):
        nproc, tp = LAYOUTS[name]
        with tempfile.TemporaryDirectory() as td:
            f = Path(td) / "ranks.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(Path(__file__).resolve()), "--worker", str(f), "--tp", str(tp), "--preset", args.preset]
            for s in args.set:
                cmd += ["--set", s]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")
                   if not torch.cuda.is_available() else os.environ.get("DS_ACCELERATOR", "cuda")}
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            ranks = json.loads(f.read_text())
        results[name] = {"ranks": nproc, "tp": tp, "dp": nproc // tp, "per_rank": ranks,
                         "max_total_bytes": max(r["total_bytes"] for r in ranks),
                         "max_sharded_total_bytes": max(r["sharded_total_bytes"] for r in ranks)}
        print(f"{name}: per-rank total {results[name]['max_total_bytes'] / 2**20:.2f} MiB "
              f"(params {ranks[0]['param_bytes'] / 2**20:.2f}, grads {ranks[0]['grad_bytes'] / 2**20:.2f}, "
              f"optimizer {ranks[0]['optimizer_bytes'] / 2**20:.2f}); tp-sharded layers "
              f"{results[name]['max_sharded_total_bytes'] / 2**20:.2f} MiB", flush=True)
    ratios = {}
    if "dp1" in results:
        base = results["dp1"]
        for name, r in results.items():
            ratios[name] = {"total_vs_dp1": r["max_total_bytes"] / base["max_total_bytes"],
                            "sharded_layers_vs_dp1": r["max_sharded_total_bytes"] / base["max_sharded_total_bytes"],
                            "expected_total": 1 / r["dp"] if r["tp"] == 1 else None,
                            "expected_sharded_layers": 1 / (r["dp"] * r["tp"])}
    doc = {"benchmark": "memory", "preset": args.preset, "overrides": args.set, **run_info(),
           "layouts": results, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    for name, r in ratios.items():
        print(f"{name}: total {r['total_vs_dp1']:.3f} x dp1, tp-sharded layers {r['sharded_layers_vs_dp1']:.3f} x dp1 "
              f"(expected {r['expected_sharded_layers']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
