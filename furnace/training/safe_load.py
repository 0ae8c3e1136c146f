"""Loading checkpoints without unpickling code: torch.load with weights_only=True and an
allowlist of the few classes DeepSpeed's checkpoints hold, wired into DeepSpeed's loaders.
DeepSpeed paths that unpickle on their own terms (other checkpoint engines, its own universal
checkpoint loading) are refused when the engine is built; furnace's resharding
(`reshard.py`) converts checkpoints with DeepSpeed's ds_to_universal inside `safe_torch_load`
and reads the result with `safe_load`."""
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


def allowed_global_names() -> set[str]:
    """The allowlist as torch.serialization names globals ("module.QualName")."""
    return {f"{c.__module__}.{c.__qualname__}" for c in _checkpoint_globals()}


class UnsafeCheckpointLoading(RuntimeError):
    """A DeepSpeed setting would load checkpoints by unpickling them."""


def safe_load(path, map_location=None, **kw):
    """torch.load with weights_only=True and the allowlist above: a checkpoint cannot run code."""
    kw["weights_only"] = True
    with torch.serialization.safe_globals(_checkpoint_globals()):
        return _TORCH_LOAD(path, map_location=map_location, **kw)


_TORCH_LOAD = torch.load


def use_safe_checkpoint_loading(engine) -> None:
    """DeepSpeed's torch checkpoint engine unpickles with weights_only=False; make its load
    `safe_load` (saving is unchanged). Any other checkpoint engine, and universal checkpoint
    loading, are refused: their loaders unpickle."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is not TorchCheckpointEngine:
        raise UnsafeCheckpointLoading(
            f"DeepSpeed's {type(ce).__name__} loads checkpoints by unpickling them; furnace loads weights only: "
            "remove the `checkpoint` engine settings from the DeepSpeed config")
    load_universal = getattr(engine, "load_universal_checkpoint", None)
    if load_universal is not None and load_universal():
        raise UnsafeCheckpointLoading("DeepSpeed's universal checkpoint loading unpickles its files; furnace loads "
                                      "weights only: remove checkpoint.load_universal from the DeepSpeed config")
    ce.load = lambda path, map_location=None: safe_load(path, map_location=map_location)


@contextlib.contextmanager
def safe_torch_load():
    """Route every torch.load inside the block through `safe_load` (for DeepSpeed utilities such
    as zero_to_fp32 that call torch.load(weights_only=False) themselves)."""
    torch.load = lambda f, *a, **k: safe_load(f, *a, **{x: y for x, y in k.items() if x != "weights_only"})
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD
