"""The documented launch forms of train.py, side by side: wall time and steady training speed.

    python benchmarks/launch_forms.py --out benchmarks/results/launch-forms-cpu.json [--steps 150]

Runs the demo preset for --steps steps (no eval, no checkpoint but the last) under each form,
twice, alternating, with the environment a user has (OMP_NUM_THREADS as inherited). Steady speed
is the median samples/s the run logged after its first 20 steps; wall time includes start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from furnace.training.metrics import run_info  # noqa: E402

FORMS = {
    "python train.py": [sys.executable, "train.py"],
    "torchrun --standalone --nproc_per_node 2 train.py": [sys.executable, "-m", "torch.distributed.run",
                                                           "--standalone", "--nproc_per_node", "2", "train.py"],
    "deepspeed --no_ssh --node_rank 0 --master_addr 127.0.0.1 --hostfile launch/hosts train.py":
        [shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed", "--no_ssh", "--node_rank",
         "0", "--master_addr", "127.0.0.1", "--hostfile", "launch/hosts", "train.py"],
}


def one(form: str, steps: int, work: Path, extra: list[str]) -> dict:
    run_dir = work / f"run-{len(list(work.iterdir()))}"
    sets = [*extra, f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0", "train.log_every=5",
            f"train.run_dir={run_dir}"]
    cmd = FORMS[form] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{form} failed:\n{res.stderr[-2000:]}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r["samples_per_s"] for r in recs if "samples_per_s" in r and r["step"] > min(20, steps // 2)]
    threads = [line.rsplit(", ", 1)[1] for line in (run_dir / "logs" / "rank000.log").read_text().splitlines()
               if line.endswith(" threads")][0]
    return {"form": form, "wall_s": round(wall, 1), "samples_per_s": round(statistics.median(steady), 1),
            "threads_per_rank": threads}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to train.py")
    a = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as td:
        order = list(FORMS)
        for rep in range(a.repeats):
            for form in order if rep % 2 == 0 else order[::-1]:
                runs.append(one(form, a.steps, Path(td), a.set))
                print(runs[-1], flush=True)
    summary = {}
    for form in FORMS:
        mine = [r for r in runs if r["form"] == form]
        summary[form] = {"wall_s": statistics.median(r["wall_s"] for r in mine),
                         "samples_per_s": statistics.median(r["samples_per_s"] for r in mine),
                         "threads_per_rank": mine[0]["threads_per_rank"]}
    base = summary["python train.py"]["samples_per_s"]
    for s in summary.values():
        s["speed_vs_bare"] = round(s["samples_per_s"] / base, 3)
    doc = {"benchmark": "launch_forms", **run_info(), "steps": a.steps, "overrides": a.set, "runs": runs,
           "summary": summary,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2))
    for form, s in summary.items():
        print(f"{form:90s} {s['wall_s']:7.1f} s  {s['samples_per_s']:7.1f} samples/s  x{s['speed_vs_bare']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
