"""ZeRO-Offload: the optimizer (ZeRO-1/2/3) and the parameters (ZeRO-3) moved to host memory give
the same loss curve as the run that keeps them on the device (DeepSpeed's CPU Adam against torch's
fused AdamW, fp32), and the settings DeepSpeed cannot honour are refused in one line."""
import pytest

from furnace.config import ConfigError, load_config, validate
from train_utils import losses, run, train_cmd

pytestmark = pytest.mark.multirank

ARGS = ("train.max_steps=6", "train.save_every=3", "train.lr_decay_steps=6")


def _close(ref: dict, got: dict):
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for s in ref:
        assert abs(got[s] - ref[s]) / abs(ref[s]) < 1e-5, (s, ref[s], got[s])


@pytest.mark.parametrize("extra", [
    ("parallel.offload_optimizer=cpu",),                                  # ZeRO-3, optimizer on the host
    ("parallel.offload_optimizer=cpu", "parallel.offload_params=cpu"),    # ZeRO-Infinity on the host
])
def test_offloaded_curve_equals_the_device_curve(full_run, data, tmp_path, extra):
    res = run(train_cmd(tmp_path / "run", data, *ARGS, *extra))
    assert res.returncode == 0, res.stderr[-4000:]
    _close(losses(full_run), losses(tmp_path / "run"))


def test_zero1_offload_equals_the_device_curve(full_run, data, tmp_path):
    """ZeRO-1 with its optimizer on the host against the ZeRO-3 device run (every stage
    reproduces the same curve: tests/test_parallel_parity.py)."""
    res = run(train_cmd(tmp_path / "run", data, *ARGS, "parallel.zero_stage=1", "parallel.offload_optimizer=cpu"))
    assert res.returncode == 0, res.stderr[-4000:]
    _close(losses(full_run), losses(tmp_path / "run"))


@pytest.mark.parametrize("sets,words", [
    (["parallel.offload_params=cpu", "parallel.zero_stage=1"], "parallel.offload_params=cpu needs parallel.zero_stage=3"),
    (["parallel.offload_optimizer=cpu", "parallel.zero_stage=0"], "needs parallel.zero_stage 1, 2 or 3"),
    (["parallel.offload_optimizer=nvme", "parallel.zero_stage=3"], "parallel.offload_nvme_path"),
    (["parallel.offload_optimizer=disk"], "parallel.offload_optimizer"),
])
def test_offload_settings_refused_in_one_line(sets, words):
    cfg = load_config("demo", sets)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as e:
        validate(cfg, world_size=1, check_paths=False)
    assert "\n" not in str(e.value)
