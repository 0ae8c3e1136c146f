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

    @classmethod
    def of_file(cls, file: str | os.PathLike) -> "WeightReader":
        """A reader of one safetensors file."""
        from safetensors import safe_open

        reader = cls.__new__(cls)
        with safe_open(str(file), framework="pt") as f:
            reader.files = {k: Path(file) for k in f.keys()}
        reader._open = {}
        return reader

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


class WeightWriter:
    """Writes tensors into safetensors shards as they come, holding at most one shard in memory:
    `add` them in order, `close` names the shards (model.safetensors, or model-0000i-of-0000N
    with an index when there is more than one)."""

    def __init__(self, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._shard: dict[str, torch.Tensor] = {}
        self._size = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self._shard and self._size + n > self.max_shard_bytes:
            self._flush()
        self._shard[name] = tensor.detach().contiguous().cpu()
        self._size += n
        self.total += n

    def _flush(self) -> None:
        part = self.path / f".part-{len(self._written):05d}.safetensors"
        save_file(self._shard, str(part), metadata={"format": "pt"})
        self._written.append((part, list(self._shard)))
        self._shard, self._size = {}, 0

    def close(self) -> None:
        if self._shard or not self._written:
            self._flush()
        if len(self._written) == 1:
            self._written[0][0].replace(self.path / "model.safetensors")
            return
        weight_map = {}
        for i, (part, names) in enumerate(self._written):
            final = f"model-{i + 1:05d}-of-{len(self._written):05d}.safetensors"
            part.replace(self.path / final)
            weight_map.update({k: final for k in names})
        (self.path / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                        "weight_map": weight_map}, indent=2))

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        else:  # a failed export leaves no shard that looks complete
            for part, _ in self._written:
                part.unlink(missing_ok=True)


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write safetensors, split into shards with an index when larger than max_shard_bytes."""
    with WeightWriter(path, max_shard_bytes=max_shard_bytes) as w:
        for k, v in state.items():
            w.add(k, v)


def write_config(cfg: dict, path: str | os.PathLike) -> None:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
