"""DeepSpeed's own checkpoint files are loaded with weights_only=True: a pickle cannot run code."""
import os
import pickle

import pytest
import torch


class Planted:
    """Unpickling this runs a command that creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _engine_with_torch_checkpointing():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    return Engine()


def test_engine_checkpoint_load_refuses_code_and_keeps_deepspeed_state(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from furnace.training.safe_load import use_safe_checkpoint_loading

    engine = _engine_with_torch_checkpointing()
    use_safe_checkpoint_loading(engine)
    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.ones(2)}, "x": Planted(marker)}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        engine.checkpoint_engine.load(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    # what DeepSpeed really stores still loads
    good = {"module": {"w": torch.ones(2)}, "zero_stage": ZeroStageEnum.weights,
            "loss_scaler": DynamicLossScaler(init_scale=2 ** 8, scale_window=10, min_scale=1,
                                             delayed_shift=2, consecutive_hysteresis=False)}
    torch.save(good, tmp_path / "good.pt")
    back = engine.checkpoint_engine.load(str(tmp_path / "good.pt"))
    assert back["zero_stage"] == ZeroStageEnum.weights and back["loss_scaler"].cur_scale == 2 ** 8
    assert torch.equal(back["module"]["w"], torch.ones(2))


def test_safe_torch_load_overrides_callers_that_ask_for_full_unpickling(tmp_path):
    from furnace.training.safe_load import safe_torch_load

    marker = tmp_path / "pwned"
    torch.save(Planted(marker), tmp_path / "evil.pt")
    with safe_torch_load(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pt", weights_only=False)  # as DeepSpeed's zero_to_fp32 does
    assert not marker.exists()
    assert torch.load.__module__.startswith("torch")  # restored after the block


def test_deepspeed_loaders_that_unpickle_are_refused_in_one_line():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from furnace.training.safe_load import UnsafeCheckpointLoading, use_safe_checkpoint_loading

    class OtherEngine(TorchCheckpointEngine):  # any engine but the torch one: its load is its own
        pass

    class WithOther:
        checkpoint_engine = OtherEngine()

    class Universal:
        checkpoint_engine = TorchCheckpointEngine()

        def load_universal_checkpoint(self):
            return True

    for engine, needle in ((WithOther(), "OtherEngine loads checkpoints by unpickling"), (Universal(), "universal")):
        with pytest.raises(UnsafeCheckpointLoading, match=needle) as e:
            use_safe_checkpoint_loading(engine)
        assert "\n" not in str(e.value)


def test_prune_keeps_the_newest_complete_tags_and_unmarked_tags_older_than_them(tmp_path):
    """Partial saves newer than the newest complete tag go; an unmarked tag older than it may be
    a checkpoint written before completion markers existed, and is never deleted."""
    from furnace.training.checkpoint import MARKER, _prune

    for step, marked in ((1, False), (2, True), (3, True), (4, False), (5, True), (6, False)):
        d = tmp_path / f"step{step:08d}"
        d.mkdir()
        if marked:
            (d / MARKER).write_text("{}")
    _prune(tmp_path, keep=2, current="step00000005")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000001", "step00000003", "step00000004",
                                                         "step00000005"]
