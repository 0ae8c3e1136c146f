"""Reading and writing HF-format weight folders: config.json + (sharded) safetensors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_config(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{str(p)!r} is not a directory; pass a local HF checkpoint folder (nothing is downloaded)")
    cfg = p / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{str(cfg)!r} is missing; a HF checkpoint folder needs config.json")
    return json.loads(cfg.read_text())


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: model.safetensors, its sharded index, or .bin files
    (loaded with weights_only=True, never a full unpickle)."""
    p = Path(path)
    if (p / "model.safetensors").exists() or (p / SAFE_INDEX).exists():
        reader = WeightReader(p)
        return {k: reader.read(k) for k in sorted(reader.names(), key=lambda k: str(reader.files[k]))}
    bins = [p / "pytorch_model.bin"] if (p / "pytorch_model.bin").exists() else []
    if (p / BIN_INDEX).exists():
        bins = [p / f for f in sorted(set(json.loads((p / BIN_INDEX).read_text())["weight_map"].values()))]
    if bins:
        out = {}
        for f in bins:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        return out
    raise FileNotFoundError(f"no weights in {str(p)!r}: expected model.safetensors, {SAFE_INDEX} or pytorch_model.bin")


class WeightReader:
    """A checkpoint folder's tensors one at a time, or a block of rows / columns of one (what a
    tensor-parallel rank keeps), read from safetensors without loading the rest of its file."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if (p / "model.safetensors").exists():
            from safetensors import safe_open

            with safe_open(str(p / "model.safetensors"), framework="pt") as f:
                self.files = {k: p / "model.safetensors" for k in f.keys()}
        elif (p / SAFE_INDEX).exists():
            self.files = {k: p / f for k, f in json.loads((p / SAFE_INDEX).read_text())["weight_map"].items()}
        else:
            raise FileNotFoundError(f"no safetensors weights in {str(p)!r}: streaming needs model.safetensors or "
                                    f"{SAFE_INDEX} (convert .bin checkpoints with transformers' save_pretrained)")
        self._open: dict = {}

    def names(self) -> list[str]:
        return list(self.files)

    def _handle(self, name: str):
        from safetensors import safe_open

        f = self.files[name]
        if f not in self._open:
            self._open.clear()  # one file open at a time: shards are read in index order
            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f]

    def shape(self, name: str) -> list[int]:
        return self._handle(name).get_slice(name).get_shape()

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The tensor, or its [start, end) along `dim` (0 or 1)."""
        sl = self._handle(name).get_slice(name)
        if dim is None:
            return sl[:]
        return sl[start:end] if dim == 0 else sl[:, start:end]


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write safetensors, split into shards with an index when larger than max_shard_bytes."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(p / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total = sum(v.numel() * v.element_size() for v in state.values())
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(p / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (p / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_config(cfg: dict, path: str | os.PathLike) -> None:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
