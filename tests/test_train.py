"""train.py in real processes (2 gloo ranks, ZeRO-3): smoke, exact resume, atomic checkpoints,
export, and the failure cases."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from furnace.training.distributed import free_port
from train_utils import ROOT, alive, env, losses, metrics, rank_pid, run, running, train_cmd, wait_for

pytestmark = pytest.mark.multirank

FIELDS = ("step", "loss", "lr", "loss_scale", "grad_norm", "tokens_per_s", "samples_per_s", "tflops",
          "skipped_samples", "mem_gb")


def test_zero3_two_rank_smoke(full_run):
    recs = [m for m in metrics(full_run) if "loss" in m]
    assert [m["step"] for m in recs] == [1, 2, 3, 4, 5, 6]
    for m in recs:
        for f in FIELDS:
            assert f in m, f
        assert m["tokens_per_s"] > 0 and m["samples_per_s"] > 0 and m["tflops"] > 0
    assert recs[-1]["loss"] < recs[0]["loss"]  # it learns
    assert (full_run / "checkpoints" / "latest").read_text().strip() == "step00000006"
    assert (full_run / "logs" / "rank000.log").exists() and (full_run / "logs" / "rank001.log").exists()
    assert list((full_run / "tensorboard").glob("events.out.tfevents.*"))
    ds_cfg = json.loads((full_run / "checkpoints" / "step00000006" / "config.json").read_text())
    assert ds_cfg["train"]["max_steps"] == 6
    output = (full_run.parent / "output.txt").read_text()
    # DeepSpeed's CPU shm all-reduce op serves only its inference TP: never compiled for training
    assert "shm_comm_op" not in output
    # not a terminal: one plain progress line per logged step, no bar redrawn with carriage returns
    assert "step 6/6 loss" in output and "\r" not in output


def test_skip_inference_shm_op_replaces_deepspeeds_builder():
    import importlib

    from furnace.training.distributed import skip_inference_shm_op

    ds_comm = importlib.import_module("deepspeed.comm.torch")

    assert hasattr(ds_comm, "build_shm_op"), "DeepSpeed renamed the hook furnace disables"
    saved = ds_comm.build_shm_op
    try:
        skip_inference_shm_op()
        assert ds_comm.build_shm_op() is None
    finally:
        ds_comm.build_shm_op = saved


def test_resume_reproduces_uninterrupted_losses(full_run, data, tmp_path):
    run_dir = tmp_path / "run"
    first = run(train_cmd(run_dir, data, "train.max_steps=3", "train.save_every=3", "train.lr_decay_steps=6"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(train_cmd(run_dir, data, "train.max_steps=6", "train.save_every=3", "train.lr_decay_steps=6"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step00000003" in second.stderr
    ref, got = losses(full_run), losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert got[step] == ref[step], (step, got[step], ref[step])


@pytest.mark.parametrize("point,resumes_from", [("write", 3), ("marker", 3), ("latest", 6)])
def test_kill_during_save_loses_nothing(point, resumes_from, full_run, data, tmp_path):
    """Rank 0 dies while saving step 6: with files half written, or all written but not marked
    complete, the run resumes from step 3; marked complete but `latest` not moved yet, from 6
    (`latest` is only a hint). Either way the step-6 loss is the uninterrupted run's."""
    run_dir = tmp_path / "run"
    args = ("train.max_steps=6", "train.save_every=3", "train.lr_decay_steps=6")
    killed = run(train_cmd(run_dir, data, *args, f"debug.faults=die-{point}@6"))
    assert killed.returncode != 0
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step00000003"
    assert (ck / "step00000006").exists() and (ck / "step00000003" / "complete.json").exists()
    assert (ck / "step00000006" / "complete.json").exists() == (point == "latest")
    again = run(train_cmd(run_dir, data, *args))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step{resumes_from:08d}" in again.stderr
    assert (ck / "latest").read_text().strip() == "step00000006"
    assert (ck / "step00000006" / "complete.json").exists() and (ck / "step00000003" / "complete.json").exists()
    assert losses(run_dir)[6] == losses(full_run)[6]
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == [1, 2, 3, 4, 5, 6]  # each step once


def test_export_consolidates_zero3_checkpoint(full_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from furnace.export import load_run_model
    from furnace.model.flamingo_io import load_flamingo

    res = subprocess.run([os.sys.executable, "-m", "furnace.export", str(full_run), "--out", str(tmp_path / "x")],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    model, tok, _, tag = load_run_model(full_run)
    assert tag == "step00000006"
    # the consolidated weights are the trained ones, not a fresh init
    assert any(float(b.attn_gate.abs()) > 0 for b in model.xattn)
    again = load_flamingo(tmp_path / "x" / "flamingo").eval()
    img = tok.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[img, 5, 6, 7, 8]])
    batch = {"input_ids": ids, "images": torch.randn(1, 1, 1, 3, 32, 32), "media_valid": torch.ones(1, 1, dtype=torch.bool)}
    with torch.no_grad():
        assert torch.equal(again.logits(batch), model.logits(batch))
        lm = AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "lm").eval()
        text = torch.tensor([[5, 6, 7, 8, 9]])
        assert (lm(text).logits - model.lm(text)).abs().max() <= 1e-5
    # a tag that is not there, or damaged: one line naming it, exit status 2
    for tag in ("step00000099", "step00000003"):
        if tag == "step00000003":
            damaged = tmp_path / "damaged"
            shutil.copytree(full_run, damaged)
            victim = next((damaged / "checkpoints" / tag).glob("*optim_states.pt"))
            victim.write_bytes(victim.read_bytes()[:100])
        res = subprocess.run([os.sys.executable, "-m", "furnace.export", str(damaged if tag == "step00000003" else full_run),
                              "--out", str(tmp_path / "y"), "--tag", tag],
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
        assert f"checkpoint {tag} under" in res.stderr and "cannot be exported" in res.stderr


def test_sigkill_of_one_rank_stops_the_others_quickly(data, tmp_path):
    run_dir = tmp_path / "run"
    with running(run_dir, data) as proc:
        victim = rank_pid(run_dir, 1)
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        rc = proc.wait(timeout=90)
        assert rc != 0
        assert time.time() - t0 < 60
        survivor = rank_pid(run_dir, 0)
        assert wait_for(lambda: not alive(survivor), 60 - (time.time() - t0))


def test_sigterm_saves_a_checkpoint_and_exits_zero(data, tmp_path):
    run_dir = tmp_path / "run"
    with running(run_dir, data) as proc:
        for r in (0, 1):  # what a scheduler does: SIGTERM to every task
            os.kill(rank_pid(run_dir, r), signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        tag = (run_dir / "checkpoints" / "latest").read_text().strip()
        step = int(tag.removeprefix("step"))
        assert step >= 2 and max(losses(run_dir)) == step
        assert "stopped by SIGTERM" in out


def test_nonfinite_loss_in_bf16_stops_with_step_and_rank(data, tmp_path):
    res = run(train_cmd(tmp_path / "run", data, "train.max_steps=5", "train.precision=bf16", "train.save_every=0",
                        "debug.faults=nan@2:1"))
    assert res.returncode != 0
    assert "non-finite loss at step 2 on rank(s) [1]" in (res.stdout + res.stderr)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(data, tmp_path):
    # DeepSpeed refuses fp16 on CPUs without AVX512-FP16; a test-only sitecustomize lifts that check.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import deepspeed.accelerator.cpu_accelerator as c\n"
        "c.CPU_Accelerator.is_fp16_supported = lambda self: True\n")
    run_dir = tmp_path / "run"
    res = run(train_cmd(run_dir, data, "train.max_steps=5", "train.precision=fp16", "train.save_every=0",
                        "debug.faults=inf@3,inf@4"), PYTHONPATH=f"{shim}:{os.environ.get('PYTHONPATH', '')}")
    assert res.returncode == 0, res.stderr[-3000:]
    recs = {m["step"]: m for m in metrics(run_dir) if "loss" in m}
    assert recs[2]["skipped_steps"] == 0
    assert recs[4]["skipped_steps"] == 2  # both poisoned steps were skipped
    # hysteresis 2: the first overflow spends the hysteresis, the second halves the scale
    assert recs[4]["loss_scale"] == recs[2]["loss_scale"] / 2
    assert recs[5]["skipped_steps"] == 2


@pytest.mark.parametrize("sets,nproc,needle", [
    (["parallel.pp=2", "parallel.zero_stage=3"], 4, "parallel.zero_stage=1"),
    (["parallel.tp=3", "parallel.zero_stage=3"], 6, "must divide model.lm.num_heads"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], 2, "train.global_batch_size="),
    (["model.lm.path=/nonexistent/llama"], 2, "model.lm.path"),
    (["train.precision=fp8"], 2, "train.precision"),
    (["train.no_such_key=1"], 2, "unknown config key"),
])
def test_invalid_configs_fail_early_with_one_line(sets, nproc, needle, capsys):
    from furnace.training.launch import main

    argv = ["--nproc", str(nproc)]
    for s in sets:
        argv += ["--set", s]
    t0 = time.time()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert time.time() - t0 < 10  # nothing was launched
    assert not torch.distributed.is_initialized()


def test_two_nodes_over_loopback_with_the_deepspeed_launcher(data, tmp_path):
    """Two 'nodes' on this machine: one `deepspeed --no_ssh` launcher per node rank, as on a cluster.
    Without OMP_NUM_THREADS each rank, alone on its node (DeepSpeed's LOCAL_SIZE), takes every core."""
    import shutil
    import sys

    from furnace.system import usable_cores

    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    run_dir = tmp_path / "run"
    base = train_cmd(run_dir, data, "train.max_steps=3", "train.save_every=0")[2:]  # drop python, train.py
    base = [a for a in base if a not in ("--nproc", "2")]
    ds = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    procs = [subprocess.Popen([ds, "--no_ssh", "--hostfile", str(hostfile), "--node_rank", str(r),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "train.py"), *base],
                              cwd=ROOT, env=env(OMP_NUM_THREADS=None), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == [1, 2, 3]
    for r in (0, 1):
        log = (run_dir / "logs" / f"rank{r:03d}.log").read_text()
        assert "world 2" in log and f", {usable_cores()} threads" in log
