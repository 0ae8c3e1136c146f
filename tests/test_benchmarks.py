"""The benchmarks run and write well-formed JSON (CI runs each for a few CPU steps)."""
import json
import subprocess
import sys

import pytest

from train_utils import ROOT, TINY, env


@pytest.mark.parametrize("mode", ["synthetic", "loader"])
def test_throughput_demo_writes_positive_fields(tmp_path, mode):
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--preset", "demo", "--steps", "2",
           "--warmup", "1", "--out", str(out)]
    sets = [*TINY, "train.global_batch_size=8"]
    if mode == "synthetic":
        cmd.append("--synthetic-data")
        cmd += ["--ablate", "ckpt"]
    else:
        from furnace.data.synthetic import build

        meta = build(str(tmp_path / "d"), n=64, seed=0, image_size=32, shards=2, n_val=8)
        sets += [f"data.synthetic_dir={tmp_path / 'd'}", f"data.train_shards={meta['train_pattern']}",
                 f"data.val_shards={meta['val_pattern']}"]
    for s in sets:
        cmd += ["--set", s]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("device", "versions", "command", "results"):
        assert data[key]
    expected = ["baseline"] + (["ckpt:baseline", "ckpt:model.activation_checkpointing=true"] if mode == "synthetic" else [])
    assert [r["variant"] for r in data["results"]] == expected
    for r in data["results"]:
        for key in ("tokens_per_s", "samples_per_s", "model_tflops", "train_flops_per_sample"):
            assert r[key] > 0, key
        assert 0 < r["step_time_s"]["p10"] <= r["step_time_s"]["median"] <= r["step_time_s"]["p90"]
        assert all(m > 0 for m in r["peak_memory_gb_per_rank"])
        assert set(r["time_split_s_per_step"]) == {"data", "forward", "backward", "step"}
        assert r["time_split_s_per_step"]["forward"] > 0
    assert "baseline" in res.stdout and "MFU" in res.stdout  # the table


def test_flop_model_counts_frozen_parts_as_documented():
    import torch

    from furnace.config import load_config
    from furnace.training.metrics import StepShape, flamingo_flops_per_sample
    from furnace.model.flamingo import build_flamingo

    cfg = load_config("flamingo-1b").model
    with torch.device("meta"):
        frozen = build_flamingo(cfg, vocab_size=128256, image_token_id=5, eoc_token_id=6)
    f = flamingo_flops_per_sample(frozen, StepShape(seq_len=512, images=5))
    fwd, bwd = f["forward_by_part"], f["backward_by_part"]
    assert bwd["vision"] == 0  # frozen tower: forward only
    # <image> / <|endofchunk|> inside the LM's vocabulary: nothing upstream of layers 0..2 trains
    assert bwd["decoder_before_xattn"] == 0
    # frozen LM: activation gradients only (linear work 1x, attention products 2x)
    assert fwd["decoder"] < bwd["decoder"] < 1.1 * fwd["decoder"]
    assert bwd["xattn"] == pytest.approx(2 * fwd["xattn"])  # trainable: activation + weight gradients
    # the decoder's linear FLOPs are 2 x tokens x weights (Llama-3.2-1B shape: ~0.97B non-embedding weights)
    lin = sum(p.numel() for n, p in frozen.lm.layers.named_parameters() if n.endswith("proj.weight"))
    assert fwd["decoder"] + fwd["decoder_before_xattn"] > 2 * 512 * lin
    cfg.freeze_vision = False
    with torch.device("meta"):
        open_tower = build_flamingo(cfg, vocab_size=128256, image_token_id=5, eoc_token_id=6)
    g = flamingo_flops_per_sample(open_tower, StepShape(seq_len=512, images=5))
    patch_embed = 5 * 2 * 16 ** 2 * 3 * 14 ** 2 * 1024  # 5 images' 16 x 16 patches: weight gradient only
    assert g["backward_by_part"]["vision"] == pytest.approx(2 * g["forward_by_part"]["vision"] - patch_embed)


def test_kernel_and_dataloader_benchmarks_smoke(tmp_path):
    for cmd, out in ((["benchmarks/kernels.py", "--quick", "--only", "loss_scale"], "k.json"),
                     (["benchmarks/dataloader.py", "--n", "64", "--batches", "2", "--workers", "0"], "d.json")):
        res = subprocess.run([sys.executable, *cmd, "--out", str(tmp_path / out)], cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        data = json.loads((tmp_path / out).read_text())
        assert data["device"] and data["versions"]["torch"] and data["command"]
