"""The layout planner against measurements: model-state bytes against benchmarks/memory.py's
per-rank tensors (CPU ranks), activation bytes against autograd's saved tensors (CPU probe),
and the per-GPU peak against the committed H100 runs of flamingo-1b; furnace-plan's output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from furnace.config import load_config
from furnace.training.build import build_tokenizer
from furnace.training.planner import GB, Layout, activation_bytes_per_sample, memory, model_sizes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def test_model_states_within_15_percent_of_memory_py():
    d = json.loads((RESULTS / "memory-cpu.json").read_text())
    cfg = load_config(d["preset"], d["overrides"])
    sizes = model_sizes(cfg, len(build_tokenizer(cfg, loaders=False)))
    for name, got in d["layouts"].items():
        m = memory(cfg, sizes, Layout(got["tp"], 1, got["dp"], 3, False, cfg.train.micro_batch_size, False))
        est = m["parameters"] + m["gradients"] + m["optimizer"]
        assert abs(est / got["max_total_bytes"] - 1) < 0.15, (name, est, got["max_total_bytes"])


@pytest.mark.parametrize("path,micro_batch", [("throughput-h100-microbatch.json", 8), ("throughput-h100.json", 32)])
def test_flamingo_1b_peak_within_15_percent_of_the_h100(path, micro_batch):
    """The baseline of each run (first in its process: no earlier engine's leftovers)."""
    run = next(r for r in json.loads((RESULTS / path).read_text())["results"] if r["variant"] == "baseline")
    lay = run["layout"]
    assert lay["micro_batch"] == micro_batch and not run["activation_checkpointing"]
    cfg = load_config("flamingo-1b", [])
    sizes = model_sizes(cfg, cfg.model.lm.vocab_size)
    est = memory(cfg, sizes, Layout(lay["tp"], lay["pp"], lay["dp"], lay["zero_stage"], False, micro_batch, False))
    measured = run["peak_memory_gb_per_rank"][0] * GB
    assert abs(est["total"] / measured - 1) < 0.15, (est["total"] / GB, measured / GB)


PROBE = """
import json, sys, torch
from furnace.config import load_config
from furnace.model.flamingo import build_flamingo
cfg = load_config("flamingo-1b", sys.argv[1:])
V, S, T, B = cfg.model.lm.vocab_size, cfg.data.max_length, cfg.data.max_images, 2
torch.manual_seed(0)
model = build_flamingo(cfg.model, vocab_size=V, image_token_id=V - 2, eoc_token_id=V - 1).to(torch.bfloat16)
ids = torch.randint(0, V - 2, (B, S))
ids[:, [1 + t * (S // T) for t in range(T)]] = V - 2
size = cfg.model.vision.image_size
batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(B, S, dtype=torch.long),
         "images": torch.randn(B, T, 1, 3, size, size, dtype=torch.bfloat16),
         "media_valid": torch.ones(B, T, dtype=torch.bool)}
own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
seen = {}
def pack(t):
    st = t.untyped_storage()
    if st.data_ptr() not in own:
        seen[st.data_ptr()] = st.nbytes()
    return t
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    model(batch)
print(json.dumps(sum(seen.values()) / B))
"""


def _saved_bytes_per_sample(sets: list[str]) -> float:
    """What autograd keeps for backward per sample (parameters and buffers left out, storages
    counted once), measured in a fresh process as a training run's would be (a process that ran
    other tests first can take other kernel paths)."""
    res = subprocess.run([sys.executable, "-c", PROBE, *sets], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layers,extra", [
    (4, ()), (8, ()),
    (8, ("model.freeze_lm=false",)),                  # the LM's linear inputs kept too
    (8, ("model.activation_checkpointing=true",)),    # only block inputs kept
])
def test_activation_formula_matches_autograd_saved_tensors(layers, extra):
    """flamingo-1b's structure (frozen LM and tower, GQA, xattn every 4) at a CPU-sized width."""
    sets = ["model.lm.hidden_size=256", "model.lm.intermediate_size=1024", "model.lm.num_heads=8",
            "model.lm.num_kv_heads=2", f"model.lm.num_layers={layers}", "model.lm.vocab_size=2048",
            "model.vision.hidden_size=64", "model.vision.intermediate_size=256", "model.vision.num_heads=4",
            "model.vision.num_layers=2", "model.vision.image_size=56", "model.perceiver.depth=2",
            "model.perceiver.heads=4", "model.perceiver.dim_head=16", "model.xattn.heads=4",
            "model.xattn.dim_head=32", "data.max_length=256", "data.max_images=3", *extra]
    cfg = load_config("flamingo-1b", sets)
    measured = _saved_bytes_per_sample(sets)
    every = cfg.model.xattn.every
    on_path = layers if not cfg.model.freeze_lm else layers - (every - 1)  # a frozen LM's layers before the
    est = activation_bytes_per_sample(cfg, 2048, 1, on_path, layers // every,  # first xattn keep nothing
                                      checkpointing=cfg.model.activation_checkpointing, first_stage=True,
                                      last_stage=True)
    assert abs(est / measured - 1) < 0.15, (est, measured)


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "furnace.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_furnace_plan_ranks_layouts_and_writes_json(tmp_path):
    out = tmp_path / "plans.json"
    res = _plan("--config", "flamingo-9b", "--gpus", "64", "--gpu-memory", "80", "--top", "3", "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert "feasible layouts for flamingo-9b on 64 x 80 GB" in lines[0] and len(lines) == 2 + 3
    plans = json.loads(out.read_text())["plans"]
    steps = [p["step_s"] for p in plans]
    assert steps == sorted(steps)
    for p in plans:
        m, lay = p["memory_gb"], p["layout"]
        assert m["total"] <= 80 and lay["tp"] * lay["pp"] * lay["dp"] == 64
        assert set(m) >= {"parameters", "gradients", "optimizer", "activations", "buffers"}


def test_furnace_plan_says_when_nothing_fits_and_refuses_bad_config():
    res = _plan("--config", "flamingo-9b", "--gpus", "1", "--gpu-memory", "8")
    assert res.returncode == 1 and "no layout of 1 x 8 GB fits flamingo-9b" in res.stderr
    res = _plan("--config", "flamingo-9b", "--gpus", "8", "--set", "data.max_length=2")
    assert res.returncode == 2 and res.stderr.strip().startswith("furnace-plan: data.max_length")


def test_choose_layout_sets_the_fastest_plan():
    from furnace.training.planner import Cluster, choose_layout, plan

    cfg = load_config("flamingo-9b", [])
    cluster = Cluster(gpus=64)
    best = plan(cfg, cluster, 0)[0]["layout"]
    choose_layout(cfg, cluster, 0)
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage, cfg.train.micro_batch_size,
            cfg.model.activation_checkpointing) == (best["tp"], best["pp"], best["zero_stage"], best["micro_batch"],
                                                    best["checkpointing"])
    from furnace.config import validate
    assert validate(cfg, 64, check_paths=False) == best["dp"]


@pytest.mark.multirank
def test_train_py_with_layout_auto_runs_the_chosen_layout(data, tmp_path):
    from train_utils import metrics, run, train_cmd

    res = run(train_cmd(tmp_path / "run", data, "train.max_steps=2", "parallel.layout=auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    chosen = [line for line in res.stderr.splitlines() if "parallel.layout=auto chose" in line]
    assert len(chosen) == 1, res.stderr[-2000:]
    saved = json.loads(next((tmp_path / "run" / "checkpoints").glob("step*/config.json")).read_text())
    for key, value in (("tp", saved["parallel"]["tp"]), ("pp", saved["parallel"]["pp"]),
                       ("zero_stage", saved["parallel"]["zero_stage"]),
                       ("micro_batch", saved["train"]["micro_batch_size"])):
        assert f"{key}={value} " in chosen[0], (key, value, chosen[0])
    assert [m["step"] for m in metrics(tmp_path / "run") if "loss" in m] == [1, 2]
