"""Filling in a pretrained decoder and vision tower that were built without weights (their shapes
only), so that no rank ever holds the whole LM.

`build` makes the FlamingoModel's shape with a meta LM (`llama.skeleton_from_hf`) and tower
(`vision.vision_skeleton_from_hf`), applies tensor parallelism to it (the meta parameters take
their tensor-parallel shapes), fills in the fresh parts (`furnace.parallel.fresh`) and calls
`load_pretrained_lm` and `load_pretrained_tower`. Piece by
piece (the embedding, each decoder layer, the norm, the head; each encoder block of the tower,
then the rest of it), each rank allocates the parameters it keeps and reads into them only its
tensor-parallel rows or columns of each checkpoint tensor (safetensors slices: nothing else of the
file is read); under ZeRO-3 the piece is then partitioned over the data-parallel group at once
(`deepspeed.zero.Init(module=...)`), so a rank holds its partitions plus one piece's
tensor-parallel part; under pipeline parallelism a rank fills only its stage's pieces and the
others stay on the meta device.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from furnace.model.empty import filled, persistent_buffers, replace_parameters
from furnace.model.flamingo_io import check_names, empty_flamingo, read_meta
from furnace.model.hf_io import WeightReader
from furnace.model.llama import hf_name
from furnace.model.vision import tower_reader
from furnace.parallel.apply import is_vocab_sharded, parallelize, tp_shard, tp_split_dim
from furnace.parallel.tensor import vocab_range


def _read_cut(reader: WeightReader, key: str, name: str, shape: torch.Size, rank: int, size: int) -> torch.Tensor:
    """This tensor-parallel rank's part of checkpoint tensor `key` (model name `name`), `shape` as
    the rank holds it; the vocabulary's padding rows are zero."""
    dim = tp_split_dim(name) if size > 1 else None
    if dim is None:
        return reader.read(key)
    full = reader.shape(key)
    if is_vocab_sharded(name):
        start, end, per = vocab_range(full[0], rank, size)
        part = reader.read(key, 0, start, end) if end > start else None
        out = torch.zeros(shape, dtype=torch.float32 if part is None else part.dtype)
        if part is not None:
            out[: end - start] = part
        return out
    per = full[dim] // size
    return reader.read(key, dim, rank * per, (rank + 1) * per)


def lm_modules(model) -> list[tuple[str, nn.Module]]:
    """The decoder in the pieces it is filled in: (prefix of its parameters' model names, module)."""
    lm = model.lm
    pieces = [("lm.embed_tokens.", lm.embed_tokens)]
    pieces += [(f"lm.layers.{i}.", layer) for i, layer in enumerate(lm.layers)]
    return pieces + [("lm.norm.", lm.norm), ("lm.lm_head.", lm.lm_head)]


def _fill(model, pieces, path: str, reader: WeightReader, key_of, rank: int, size: int, *, keep, partition,
          dtype, device) -> int:
    """Each piece's meta parameters read (this rank's tensor-parallel cut) and, under ZeRO-3,
    partitioned before the next piece is read. Returns the bytes read."""
    # Only meta shapes come from the checkpoint: what was drawn for the run (LoRA adapters) is real.
    missing = sorted({key_of(prefix + leaf) for prefix, mod in pieces for leaf, p in mod.named_parameters()
                      if p.is_meta} - set(reader.names()))
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks {missing[:5]} that the model of its config.json needs")
    done: set[int] = set()
    read = 0
    for prefix, mod in pieces:
        new: dict[int, nn.Parameter] = {}
        for leaf, p in mod.named_parameters():
            if id(p) in done or not p.is_meta or (keep is not None and not keep(p)):
                continue
            done.add(id(p))
            name = prefix + leaf
            key = key_of(name)
            t = _read_cut(reader, key, name, p.shape, rank, size)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{key} in {path!r} is {tuple(reader.shape(key))}, which does not give this rank's "
                                 f"{tuple(p.shape)} at tp={size}")
            new[id(p)] = filled(p, t.contiguous(), dtype=dtype, device=device)
            read += t.numel() * t.element_size()
        if not new:
            continue
        replace_parameters(model, new)
        if partition is not None:  # partition this piece now: the next one is read into freed memory
            partition(mod)
    return read


def load_pretrained_lm(model, path: str, topology=None, *, keep=None, partition=None,
                       dtype: torch.dtype = torch.float32, device=None) -> int:
    """Fills model.lm's meta parameters from the checkpoint at `path`, in `dtype` on `device`
    (the CPU by default; under ZeRO-3 where `zero3.zero3_placement` put the rest of the model).
    `partition(module)` (ZeRO-3, collective) partitions each module as soon as it is read;
    `keep(param) -> bool` limits the reading to what this rank holds (a pipeline stage's), the
    rest staying on the meta device; `topology` None: one process. Returns the bytes read."""
    device = torch.device("cpu") if device is None else device
    reader = WeightReader(path)
    rank, size = (0, 1) if topology is None else (topology.coord.tp, topology.tp)
    tied = model.lm.cfg.tie_word_embeddings
    read = _fill(model, lm_modules(model), path, reader, lambda name: hf_name(name.removeprefix("lm."), tied),
                 rank, size, keep=keep, partition=partition, dtype=dtype, device=device)
    if model.new_tokens is not None:  # the new rows start at the mean of the embedding rows, as from_hf's
        key = hf_name("embed_tokens.weight", False)
        mean = reader.read(key).float().mean(0)
        partitioned = [p for p in model.new_tokens.parameters() if hasattr(p, "ds_id")]  # as drawn (ZeRO-3)
        if partitioned:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
        else:
            gathered = contextlib.nullcontext()
        with gathered:
            model.new_tokens.start_at(mean)
    return read


def tower_modules(model) -> list[tuple[str, nn.Module]]:
    """The vision tower in the pieces it is filled in: each block of its encoder, then the rest."""
    pieces = []
    for name, mod in model.vision.named_modules(prefix="vision"):
        if isinstance(mod, nn.ModuleList):
            pieces += [(f"{name}.{i}.", item) for i, item in enumerate(mod)]
    return pieces + [("vision.", model.vision)]


def load_pretrained_tower(model, path: str, *, keep=None, partition=None, dtype: torch.dtype = torch.float32,
                          device=None) -> int:
    """Fills model.vision's meta parameters (a tower built by `vision.vision_skeleton_from_hf`)
    from the HF CLIP/SigLIP checkpoint at `path` (a vision model or a whole CLIP/SigLIP: its
    `vision_model.*` tensors), block by block, as `load_pretrained_lm` does the decoder. The
    tower is replicated over tensor parallelism: every rank reads it whole."""
    device = torch.device("cpu") if device is None else device
    return _fill(model, tower_modules(model), path, tower_reader(path), lambda name: name.removeprefix("vision.model."),
                 0, 1, keep=keep, partition=partition, dtype=dtype, device=device)


def load_flamingo_sharded(path, topology, *, device=None):
    """A folder `furnace-export` (or `save_flamingo`) wrote, built without weights, made
    tensor-parallel, and filled with only this rank's cut of each tensor (safetensors slices), in
    its stored dtype: a rank never holds the whole decoder. Returns the FlamingoModel."""
    device = torch.device("cpu") if device is None else device
    meta, mcfg = read_meta(path)
    model = parallelize(empty_flamingo(meta, mcfg), topology)
    reader = WeightReader(path)
    check_names(model, reader.names(), str(path))
    _fill(model, [("", model)], str(path), reader, lambda name: name, topology.coord.tp, topology.tp, keep=None,
          partition=None, dtype=None, device=device)
    for name in persistent_buffers(model):
        model.get_buffer(name).data.copy_(reader.read(name))
    return model.to(device)


def load_start(model, tensors: dict[str, torch.Tensor], topology=None) -> int:
    """Overwrite `model`'s parameters named in `tensors` (full tensors by plain-model name:
    `furnace.model.start_from.start_tensors`) with this rank's tensor-parallel cut of each, module
    by module; a ZeRO-3 partitioned module is gathered, written on its group's first rank and
    partitioned again (DeepSpeed's GatheredParameters). Parameters of another pipeline stage
    (meta) are skipped. Returns the number of tensors written."""
    rank, size = (0, 1) if topology is None else (topology.coord.tp, topology.tp)
    params = dict(model.named_parameters())
    groups: dict[str, list[str]] = {}
    for name in tensors:
        groups.setdefault(name.rsplit(".", 2)[0], []).append(name)  # the module holding it
    written = 0
    for names in groups.values():
        held = [(n, params[n]) for n in names if n in params and not params[n].is_meta]
        if not held:
            continue
        partitioned = [p for _, p in held if hasattr(p, "ds_id")]
        if partitioned:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
        else:
            gathered = contextlib.nullcontext()
        with gathered, torch.no_grad():
            for n, p in held:
                cut = tp_shard(tensors[n], n, rank, size)
                if tuple(cut.shape) != tuple(p.shape):
                    raise ValueError(f"{n}: this rank holds {tuple(p.shape)}, the start checkpoint gives "
                                     f"{tuple(cut.shape)} at tp={size}")
                p.copy_(cut.to(p.dtype))
                written += 1
    return written
