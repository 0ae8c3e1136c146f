"""Loading checkpoints without unpickling code: torch.load with weights_only=True and an
allowlist of the few classes DeepSpeed's checkpoints hold, wired into DeepSpeed's loaders."""
from __future__ import annotations

import contextlib

import torch

from furnace_kernels import DynamicLossScaler as FusedScaler


def _checkpoint_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoints hold (checked on ZeRO-1/3 and
    pipeline checkpoints): everything else must be plain data."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, FusedScaler]


def safe_load(path, map_location=None, **kw):
    """torch.load with weights_only=True and the allowlist above: a checkpoint cannot run code."""
    kw["weights_only"] = True
    with torch.serialization.safe_globals(_checkpoint_globals()):
        return _TORCH_LOAD(path, map_location=map_location, **kw)


_TORCH_LOAD = torch.load


def use_safe_checkpoint_loading(engine) -> None:
    """DeepSpeed's torch checkpoint engine unpickles with weights_only=False; swap in a subclass
    whose load is `safe_load` (saving is unchanged)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is TorchCheckpointEngine:
        ce.__class__ = SafeTorchCheckpointEngine


@contextlib.contextmanager
def safe_torch_load():
    """Route every torch.load inside the block through `safe_load` (for DeepSpeed utilities such
    as zero_to_fp32 that call torch.load(weights_only=False) themselves)."""
    torch.load = lambda f, *a, **k: safe_load(f, *a, **{x: y for x, y in k.items() if x != "weights_only"})
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD
