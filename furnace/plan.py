"""furnace-plan: the layouts a cluster allows for a config, fastest first, with per-GPU memory.

    furnace-plan --config flamingo-9b --gpus 64 --gpu-memory 80 --gpus-per-node 8
    furnace-plan --config run.yaml --set data.max_length=1024 --gpus 8 --top 5 --json plans.json

Estimates, not measurements: how they are made and how close they came to measured runs is in
`furnace/training/planner.py` and the README.
"""
from __future__ import annotations

import argparse
import json
import sys

from furnace.config import ConfigError, check_keys, load_config
from furnace.training.build import build_tokenizer
from furnace.training.planner import Cluster, plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="furnace-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "--preset", default="demo", help="preset name or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (H100 SXM)")
    p.add_argument("--top", type=int, default=10, help="layouts printed")
    p.add_argument("--json", default=None, help="write every feasible layout here")
    a = p.parse_args(argv)
    if a.gpus < 1 or a.gpus_per_node < 1 or a.gpu_memory <= 0:
        p.error("--gpus, --gpus-per-node and --gpu-memory must be positive")
    try:
        cfg = load_config(a.config, a.set)
        check_keys(cfg)
        vocab = cfg.model.lm.vocab_size or len(build_tokenizer(cfg, loaders=False))
    except (ConfigError, OSError) as e:
        print(f"furnace-plan: {e}", file=sys.stderr)
        return 2
    cluster = Cluster(gpus=a.gpus, gpu_memory_gb=a.gpu_memory, gpus_per_node=min(a.gpus_per_node, a.gpus),
                      peak_tflops=a.peak_tflops)
    plans = plan(cfg, cluster, vocab)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": a.config, "overrides": a.set, "cluster": vars(cluster), "plans": plans}, f, indent=1)
    if not plans:
        print(f"furnace-plan: no layout of {a.gpus} x {a.gpu_memory:g} GB fits {a.config}; add GPUs, or lower "
              "data.max_length / train.global_batch_size", file=sys.stderr)
        return 1
    print(f"{len(plans)} feasible layouts for {a.config} on {a.gpus} x {a.gpu_memory:g} GB "
          f"({cluster.gpus_per_node} a node), fastest first; GB per GPU:")
    print(f"{'tp':>3} {'pp':>3} {'dp':>4} {'zero':>4} {'offload':>7} {'mb':>3} {'ckpt':>4} {'step s':>7} "
          f"{'params':>7} {'grads':>6} {'optim':>6} {'acts':>6} {'buffers':>7} {'total':>6}")
    for r in plans[:a.top]:
        lay, m = r["layout"], r["memory_gb"]
        print(f"{lay['tp']:>3} {lay['pp']:>3} {lay['dp']:>4} {lay['zero_stage']:>4} "
              f"{'cpu' if lay['offload_optimizer'] else 'none':>7} {lay['micro_batch']:>3} "
              f"{'yes' if lay['checkpointing'] else 'no':>4} {r['step_s']:>7.2f} {m['parameters']:>7.1f} "
              f"{m['gradients']:>6.1f} {m['optimizer']:>6.1f} {m['activations']:>6.1f} {m['buffers']:>7.1f} "
              f"{m['total']:>6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
