"""The consolidated (whole, unsharded) weights of a checkpoint, one parameter at a time, whatever
layout saved it: export reads a 80B run this way without holding the model in one process.

    with CheckpointWeights(run_dir, tag, model, work=DIR) as weights:   # `model`: built empty
        for name in weights.names(): tensor = weights.read(name)

- Parameters the optimizer trains come from its fp32 masters: a ZeRO-1/2/3 tag is converted by
  `reshard.convert` (DeepSpeed's ds_to_universal with furnace's tensor-parallel plan) into one
  file per parameter under `work`, a ZeRO-0 one by `reshard.convert_plain`.
- Frozen parameters (and every parameter of a ZeRO-0 tag written with tp or pp > 1) come from
  the module-state files, memory-mapped so only the one tensor is read: the pipeline's
  per-layer files, the module of each tensor-parallel rank, or ZeRO-3's frozen fragments joined
  over the data-parallel ranks; tensor-parallel parts are joined by `parallel.apply`'s plan.
- A tag from before this (tensor/pipeline-parallel runs then gathered the model at save time
  into `full_model.safetensors`) is read from that file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from furnace.model.empty import persistent_buffers, stored_names
from furnace.model.hf_io import WeightReader
from furnace.parallel.apply import is_vocab_sharded, tp_split_dim
from furnace.parallel.pipeline import pipeline_layer_files
from furnace.training.checkpoint import FULL_MODEL, CheckpointError, checkpoint_dir
from furnace.training.reshard import engine_state, read_state, convert, convert_plain, saved_names
from furnace.training.safe_load import safe_load


class CheckpointWeights:
    def __init__(self, run_dir, tag: str, model, *, work):
        self.tagdir = checkpoint_dir(run_dir) / tag
        self.model = model
        saved = json.loads((self.tagdir / "config.json").read_text()).get("parallel", {})
        self.tp, self.pp, self.zero = saved.get("tp", 1), saved.get("pp", 1), saved.get("zero_stage", 0)
        self.work = Path(work)
        self._files: dict[Path, dict] = {}
        self._buffers = set(persistent_buffers(model))  # built with the model: not in the checkpoint
        self._legacy = WeightReader.of_file(self.tagdir / FULL_MODEL) if (self.tagdir / FULL_MODEL).is_file() else None
        self._zero_dir = None
        if self._legacy is not None:
            return
        if any(self.tagdir.glob("*optim_states.pt")):
            convert(self.tagdir, self.work, model, self.pp)
        elif self.tp == self.pp == 1:
            convert_plain(self.tagdir, self.work, model)
        else:  # ZeRO-0 with tp or pp: the module-state files hold every parameter
            self.work = None
        if self.work is not None:
            self._zero_dir = self.work / "zero"
            self._names = saved_names(model, self.pp)
            self._shapes = engine_state(self.tagdir)["shapes"]
        self._layers = pipeline_layer_files(model) if self.pp > 1 else None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self._files.clear()
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)

    def names(self) -> list[str]:
        """What the model's weights file holds (`empty.stored_names`), in model order."""
        return stored_names(self.model)

    def read(self, name: str) -> torch.Tensor:
        """Parameter (or persistent buffer) `name`, whole, in fp32."""
        if name in self._buffers:
            return self.model.get_buffer(name).detach().float()
        if self._legacy is not None:
            return self._legacy.read(name).float()
        if self._zero_dir is not None and (self._zero_dir / self._names[name]).is_dir():
            return read_state(self._zero_dir / self._names[name], "fp32", self._shapes.get(self._names[name])).float()
        try:
            return self._join(name, [self._module_part(name, t) for t in range(self.tp)]).float()
        finally:  # unmap the files: the pages read stay resident while a file is mapped
            self._files.clear()

    # ---------------------------------------------------------------- module-state files

    def _load(self, path: Path) -> dict:
        if path not in self._files:
            if not path.is_file():
                raise CheckpointError(f"checkpoint {self.tagdir.name} lacks {path.name}, which holds part of the "
                                      "model: it is damaged; export an older tag (--tag)")
            self._files[path] = safe_load(path, map_location="cpu", mmap=True)  # mapped: only what is used is read
        return self._files[path]

    def _module_part(self, name: str, t: int) -> torch.Tensor:
        """Tensor-parallel rank t's part of parameter `name` from the module-state files."""
        if self._layers is not None:
            layer, leaf = self._layers[name]
            return self._load(self.tagdir / f"layer_{layer:02d}-model_{t:02d}-model_states.pt")[leaf]
        if self.zero == 3:  # partitions of a frozen parameter, one a data-parallel rank
            files = sorted(self.tagdir.glob(f"zero_pp_rank_*_mp_rank_{t:02d}_model_states.pt"),
                           key=lambda p: int(p.name.split("_")[3]))
            states = [self._load(f) for f in files]
            shape = states[0]["frozen_param_shapes"][name]
            flat = torch.cat([s["frozen_param_fragments"][name].flatten() for s in states])
            return flat[: shape.numel()].view(shape)
        return self._load(self.tagdir / f"mp_rank_{t:02d}_model_states.pt")["module"][name]

    def _join(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        dim = tp_split_dim(name) if len(parts) > 1 else None
        if dim is None:
            return parts[0]
        whole = torch.cat(parts, dim=dim)
        if is_vocab_sharded(name):  # the padding rows past the vocabulary sit at the end
            whole = whole[: self.model.base_vocab]
        return whole
