"""What a run guarantees when things go wrong, in real processes (2 gloo ranks, ZeRO-3): damaged
or missing checkpoint pointers, damaged tags, a second run on the same run_dir, config and
tokenizer changes on resume, signals to the launcher, the ranks or the whole group, a planted
pickle, an unusable validation set. docs/reliability.md lists these tests."""
import json
import math
import os
import shutil
import signal

import pytest
import torch

from furnace.training.engine import warmup_cosine
from train_utils import alive, losses, metrics, rank_pid, run, running, train_cmd, wait_for

pytestmark = pytest.mark.multirank
ARGS = ("train.max_steps=6", "train.save_every=3", "train.lr_decay_steps=6")


def copy_run(full_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    return run_dir


def furnace_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("furnace:") and "starting" not in line]


# ------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("damage", ["deleted", "garbled", "stale"])
def test_latest_is_a_hint_the_newest_complete_tag_is_resumed(damage, full_run, data, tmp_path):
    run_dir = copy_run(full_run, tmp_path)
    latest = run_dir / "checkpoints" / "latest"
    if damage == "deleted":
        latest.unlink()
    else:
        latest.write_bytes(b"\x00\xffstep0000" if damage == "garbled" else b"step00000003")
    res = run(train_cmd(run_dir, data, "train.max_steps=7", "train.save_every=3", "train.lr_decay_steps=6"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step00000006" in res.stderr and "checkpoints/latest" in res.stderr
    assert latest.read_text().strip() == "step00000007"
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == list(range(1, 8))


def test_a_damaged_newest_tag_is_named_set_aside_and_the_previous_one_used(full_run, data, tmp_path):
    run_dir = copy_run(full_run, tmp_path)
    victim = run_dir / "checkpoints" / "step00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    res = run(train_cmd(run_dir, data, *ARGS))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checkpoint step00000006 is damaged (zero_pp_rank_1_mp_rank_00_optim_states.pt has" in res.stderr
    assert "resumed from step00000003" in res.stderr
    assert (run_dir / "checkpoints" / "step00000006.damaged").is_dir()  # kept for a post-mortem, not deleted
    ref, got = losses(full_run), losses(run_dir)
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]  # exact resume from step 3
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == [1, 2, 3, 4, 5, 6]  # cut back, then redone
    discarded = (run_dir / "metrics.discarded.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["step"] for line in discarded) == [4, 5, 6]


def test_a_second_run_on_one_run_dir_is_refused_naming_the_holder(data, tmp_path):
    run_dir = tmp_path / "run"
    with running(run_dir, data) as first:
        holder = rank_pid(run_dir, 0)
        second = run(train_cmd(run_dir, data, "train.max_steps=3"), timeout=240)
        assert second.returncode == 2
        lines = furnace_lines(second.stderr)
        assert len(lines) == 1 and "is in use by another run" in lines[0] and f"pid {holder}" in lines[0], lines
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on
        before = len(metrics(run_dir))
        assert wait_for(lambda: len(metrics(run_dir)) > before, 60)
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=120)
        assert first.returncode == 0


def test_a_save_that_fails_on_the_ranks_stops_every_rank_in_one_line(data, tmp_path):
    """A write error during a save (here: a file where the tag's folder goes; a full disk
    alike) stops all ranks together with one line, instead of leaving the others in a barrier."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step00000002").write_text("in the way")
    res = run(train_cmd(run_dir, data, "train.max_steps=3", "train.save_every=2"), timeout=240)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = furnace_lines(res.stderr)
    assert len(lines) == 1 and "saving checkpoint step00000002 failed (write) on rank(s) [0, 1]" in lines[0], lines
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------ resume safety

def test_a_change_the_checkpoint_cannot_honour_is_refused_in_one_line(full_run, data, tmp_path):
    run_dir = copy_run(full_run, tmp_path)
    res = run(train_cmd(run_dir, data, "train.max_steps=8", "model.lm.hidden_size=96", "train.seed=7"))
    assert res.returncode == 2
    lines = furnace_lines(res.stderr)
    assert len(lines) == 1, res.stderr[-2000:]
    assert "model.lm.hidden_size: 64 -> 96" in lines[0] and "train.seed: 1234 -> 7" in lines[0]
    assert "train.allow_config_change=true" in lines[0] and "Traceback" not in res.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000006"  # nothing touched
    allowed = run(train_cmd(run_dir, data, "train.max_steps=7", "train.seed=7", "train.allow_config_change=true"))
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "cannot honour" in allowed.stderr and "resumed from step00000006" in allowed.stderr


def test_a_new_learning_rate_takes_effect_on_resume(full_run, data, tmp_path):
    run_dir = copy_run(full_run, tmp_path)  # as it was after step 3's checkpoint
    shutil.rmtree(run_dir / "checkpoints" / "step00000006")
    (run_dir / "checkpoints" / "latest").write_text("step00000003")
    res = run(train_cmd(run_dir, data, *ARGS, "train.lr=5e-4", "train.weight_decay=0.1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train.lr: 0.001 -> 0.0005" in res.stderr and "train.weight_decay: 0.0 -> 0.1" in res.stderr
    ref = {m["step"]: m["lr"] for m in metrics(full_run) if "lr" in m}
    got = {m["step"]: m["lr"] for m in metrics(run_dir) if "lr" in m}
    factor = warmup_cosine(2, 6, 0.1)
    for step in (4, 5, 6):  # the same schedule position, the new base rate (not the checkpoint's)
        assert got[step] == pytest.approx(5e-4 * factor(step)) and ref[step] == pytest.approx(1e-3 * factor(step))


def test_a_different_tokenizer_is_refused_on_resume(full_run, data, tmp_path):
    from furnace.data.tokenizer import build_word_tokenizer, save_tokenizer
    from furnace.data.synthetic import vocabulary

    run_dir = copy_run(full_run, tmp_path)
    other = tmp_path / "tok"
    save_tokenizer(build_word_tokenizer([*vocabulary(), "zebra"]), other)
    res = run(train_cmd(run_dir, data, "train.max_steps=8", f"data.tokenizer={other}"))
    assert res.returncode == 2
    lines = furnace_lines(res.stderr)
    assert len(lines) == 1 and "the tokenizer (fingerprint" in lines[0] and "data.tokenizer" in lines[0], lines


def test_rerunning_a_finished_run_changes_nothing(full_run, data, tmp_path):
    run_dir = copy_run(full_run, tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    res = run(train_cmd(run_dir, data, *ARGS))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already complete at step 6 (train.max_steps=6)" in res.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # no second evaluation, no new records
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        sorted(p.name for p in (full_run / "checkpoints").iterdir())


def test_a_data_parallel_size_the_canonical_streams_cannot_split_is_refused_on_resume(full_run, data, tmp_path):
    """Any layout can continue a checkpoint (tests/test_parallel_parity.py), as long as its
    data-parallel size divides data.canonical_streams: 3 ranks do not divide 64."""
    run_dir = copy_run(full_run, tmp_path)
    res = run(train_cmd(run_dir, data, *ARGS, "train.max_steps=8", "train.global_batch_size=24", nproc=3))
    assert res.returncode == 2
    lines = furnace_lines(res.stderr)
    assert len(lines) == 1 and "data.canonical_streams=64 is not a multiple of the data-parallel size 3" in lines[0]
    assert "use a data-parallel size that divides it" in lines[0], lines
    assert not (run_dir / "logs" / "rank002.log").exists()  # refused before any rank started


# ------------------------------------------------------------------ safe loading

class Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_a_real_checkpoint_is_refused(full_run, data, tmp_path):
    """An attacker who can write the run_dir swaps a DeepSpeed file for one that runs code when
    unpickled, and fixes up the completion marker: the resume refuses it, nothing runs."""
    run_dir = copy_run(full_run, tmp_path)
    tag = run_dir / "checkpoints" / "step00000006"
    victim = tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    real = torch.load(victim, weights_only=False)
    marker = tmp_path / "pwned"
    torch.save({**real, "extra": Planted(marker)}, victim)
    done = json.loads((tag / "complete.json").read_text())
    done["files"][victim.name] = victim.stat().st_size
    (tag / "complete.json").write_text(json.dumps(done))
    res = run(train_cmd(run_dir, data, "train.max_steps=8"))
    assert res.returncode == 2
    lines = furnace_lines(res.stderr)
    assert len(lines) == 1 and "outside the weights-only allowlist" in lines[0] and "posix.system" in lines[0], lines
    assert not marker.exists()


# ------------------------------------------------------------------ signals and processes

def _stop_and_check(proc, run_dir, how):
    how(proc)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / tag / "complete.json").exists()
    assert int(tag.removeprefix("step")) == max(losses(run_dir))
    assert "Traceback" not in out
    return out


def test_sigterm_to_the_bare_launcher_saves_and_exits_zero(data, tmp_path):
    run_dir = tmp_path / "run"
    with running(run_dir, data) as proc:
        out = _stop_and_check(proc, run_dir, lambda p: os.kill(p.pid, signal.SIGTERM))
        assert "stopped by SIGTERM" in out


def test_ctrl_c_saves_and_exits_zero_without_tracebacks(data, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it, data workers included;
    also SIGTERM to the group (SLURM, the deepspeed launcher)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        run_dir = tmp_path / sig.name
        with running(run_dir, data, "data.num_workers=2") as proc:
            out = _stop_and_check(proc, run_dir, lambda p: os.killpg(p.pid, sig))
            assert f"stopped by {sig.name}" in out
            assert len([line for line in out.splitlines() if sig.name in line]) <= 3  # a line or two, not a dump


def test_a_second_ctrl_c_interrupts_at_once_and_a_launcher_passing_one_on_does_not():
    from furnace.training.stop import StopRequest

    stop = StopRequest()
    assert not stop
    stop._on_signal(signal.SIGINT, None)
    stop._on_signal(signal.SIGTERM, None)  # the launcher passing the same Ctrl-C on
    assert stop and stop.name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        stop._on_signal(signal.SIGINT, None)


def test_a_signal_arriving_inside_the_first_ones_handler_is_said_once(monkeypatch, caplog):
    """A group's SIGTERM and the launcher passing it on reach a rank together: Python can run the
    second handler inside the first, between any two bytecodes (a CI run logged it twice). Here
    the second arrives while the first is still naming its signal."""
    import furnace.training.stop as stop_mod

    stop = stop_mod.StopRequest()
    names = stop_mod.signal.Signals

    class Reentrant:
        def __call__(self, signum):
            monkeypatch.setattr(stop_mod.signal, "Signals", names)
            stop._on_signal(signal.SIGTERM, None)  # the launcher's copy, inside the first handler
            return names(signum)

    monkeypatch.setattr(stop_mod.signal, "Signals", Reentrant())
    with caplog.at_level("WARNING", logger="furnace"):
        stop._on_signal(signal.SIGTERM, None)
    assert stop.name == "SIGTERM"
    assert [r.message for r in caplog.records].count(
        "SIGTERM received: saving a checkpoint at the end of this step, then exiting") == 1


def test_a_killed_launcher_leaves_no_rank_behind(data, tmp_path):
    run_dir = tmp_path / "run"
    with running(run_dir, data) as proc:
        ranks = [rank_pid(run_dir, r) for r in (0, 1)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        assert wait_for(lambda: not any(alive(p) for p in ranks), 60), "ranks outlived their launcher"
        tag = (run_dir / "checkpoints" / "latest").read_text().strip()  # they got SIGTERM: they saved
        assert (run_dir / "checkpoints" / tag / "complete.json").exists()


def test_a_due_eval_is_skipped_when_stopping(data, tmp_path):
    run_dir = tmp_path / "run"
    with running(run_dir, data, "train.eval_every=1",
                 until=lambda: len([m for m in metrics(run_dir) if "eval/val_loss" in m]) >= 2) as proc:
        os.kill(rank_pid(run_dir, 1), signal.SIGTERM)  # one rank: all stop
        proc.communicate(timeout=120)
    assert proc.returncode == 0
    last = max(losses(run_dir))
    evals = [m["step"] for m in metrics(run_dir) if "eval/val_loss" in m]
    assert evals == list(range(1, last))  # every step was evaluated but the one that stopped


def test_threads_per_rank_are_cores_over_ranks_unless_set(data, tmp_path):
    from furnace.system import usable_cores

    for omp, want in ((None, max(1, usable_cores() // 2)), (str(usable_cores()), usable_cores())):
        run_dir = tmp_path / f"omp{omp}"
        env = {"OMP_NUM_THREADS": omp} if omp else {"OMP_NUM_THREADS": None}
        res = run(train_cmd(run_dir, data, "train.max_steps=1"), **env)
        assert res.returncode == 0, res.stderr[-3000:]
        for r in (0, 1):
            assert f", {want} threads" in (run_dir / "logs" / f"rank{r:03d}.log").read_text()


# ------------------------------------------------------------------ evaluation

def test_an_unusable_validation_set_reports_nan_and_a_warning(data, tmp_path):
    bad = tmp_path / "val-000000.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    run_dir = tmp_path / "run"
    res = run(train_cmd(run_dir, data, "train.max_steps=2", "train.eval_every=2", f"data.val_shards={bad}"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gave no usable sample" in res.stderr and "bad_shard" in res.stderr
    evals = [m for m in metrics(run_dir) if "eval/val_loss" in m]
    assert evals and all(math.isnan(m["eval/val_loss"]) and math.isnan(m["eval/caption_accuracy"]) for m in evals)
    assert "held-out caption accuracy: nan (0 samples)" in res.stdout


def test_honoured_changes_replace_the_restored_optimizer_and_schedule():
    """What DeepSpeed restores (the checkpoint's lr and weight decay in the param groups and
    the scheduler's base rate) gives way to this run's config; the schedule position stays."""
    from types import SimpleNamespace

    from furnace.config import load_config
    from furnace.training.engine import param_groups
    from furnace.training.resume import apply_honoured

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.0), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 6, 0.1))
    for _ in range(3):
        opt.step()
        sched.step()
    opt.clip_grad = 1.0  # as DeepSpeed's ZeRO-1/2 optimizer restores it from the checkpoint
    engine = SimpleNamespace(optimizer=opt, lr_scheduler=sched, _config=SimpleNamespace(gradient_clipping=1.0))
    cfg = load_config("demo", ["train.lr=5e-4", "train.weight_decay=0.1", "train.grad_clip=0.5"])
    apply_honoured(engine, cfg)
    assert opt.clip_grad == 0.5 and engine._config.gradient_clipping == 0.5
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(g["lr"] == pytest.approx(5e-4 * warmup_cosine(2, 6, 0.1)(3)) for g in opt.param_groups)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 * warmup_cosine(2, 6, 0.1)(4))


def test_train_dist_timeout_reaches_groups_made_after_the_world_group():
    """furnace's tp/dp/pp groups and DeepSpeed's own take c10d's module default, not the world
    group's timeout; a hung rank must fail every collective after train.dist_timeout_minutes."""
    import subprocess
    import sys

    code = ("import datetime, torch.distributed as dist\n"
            "from torch.distributed import distributed_c10d as c10d\n"
            "from furnace.training.distributed import init_distributed\n"
            "init_distributed(datetime.timedelta(minutes=2))\n"
            "dist.new_group([0])\n"
            "print('timeout', c10d._get_default_timeout('gloo').total_seconds())\n")
    from train_utils import env
    res = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "timeout 120.0" in res.stdout
