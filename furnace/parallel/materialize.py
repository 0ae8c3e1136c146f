"""Filling in a pretrained decoder that was built on the meta device (its shape only), so that no
rank ever holds the whole LM.

`build` makes the FlamingoModel with a meta LM (`llama.skeleton_from_hf`), applies tensor
parallelism to it (the meta parameters take their tensor-parallel shapes) and calls
`load_pretrained_lm`. Module by module (the embedding, each decoder layer, the norm, the head),
each rank allocates the parameters it keeps and reads into them only its tensor-parallel rows or
columns of each checkpoint tensor (safetensors slices: nothing else of the file is read); under
ZeRO-3 the module is then partitioned over the data-parallel group at once
(`deepspeed.zero.Init(module=...)`), so a rank holds its partitions plus one module's
tensor-parallel part; under pipeline parallelism a rank fills only its stage's modules and the
others stay on the meta device.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from furnace.model.empty import replace_parameters
from furnace.model.hf_io import WeightReader
from furnace.model.llama import hf_name
from furnace.parallel.apply import is_vocab_sharded, tp_split_dim
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
        out = torch.zeros(shape, dtype=torch.float32)
        if end > start:
            out[: end - start] = reader.read(key, 0, start, end)
        return out
    per = full[dim] // size
    return reader.read(key, dim, rank * per, (rank + 1) * per)


def lm_modules(model) -> list[tuple[str, nn.Module]]:
    """The decoder in the pieces it is filled in: (prefix of its parameters' model names, module)."""
    lm = model.lm
    pieces = [("lm.embed_tokens.", lm.embed_tokens)]
    pieces += [(f"lm.layers.{i}.", layer) for i, layer in enumerate(lm.layers)]
    return pieces + [("lm.norm.", lm.norm), ("lm.lm_head.", lm.lm_head)]


def load_pretrained_lm(model, path: str, topology=None, *, keep=None, partition=None,
                       dtype: torch.dtype = torch.float32, device=None) -> int:
    """Fills model.lm's meta parameters from the checkpoint at `path`, in `dtype` on `device`
    (the CPU by default; under ZeRO-3 where `zero3.zero3_placement` put the rest of the model).
    `partition(module)` (ZeRO-3, collective) partitions each module as soon as it is read;
    `keep(param) -> bool` limits the reading to what this rank holds (a pipeline stage's), the
    rest staying on the meta device; `topology` None: one process. Returns the bytes read."""
    device = torch.device("cpu") if device is None else device
    reader = WeightReader(path)
    missing = {hf_name(n.removeprefix("lm."), model.lm.cfg.tie_word_embeddings)
               for n, _ in model.lm.named_parameters(prefix="lm")} - set(reader.names())
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks {sorted(missing)[:5]} that a {model.lm.cfg.model_type} decoder "
                         "of its config.json needs")
    rank, size = (0, 1) if topology is None else (topology.coord.tp, topology.tp)
    done: set[int] = set()
    read = 0
    for prefix, mod in lm_modules(model):
        new: dict[int, nn.Parameter] = {}
        for leaf, p in mod.named_parameters():
            if id(p) in done or not p.is_meta or (keep is not None and not keep(p)):
                continue
            done.add(id(p))
            name = prefix + leaf
            key = hf_name(name.removeprefix("lm."), model.lm.cfg.tie_word_embeddings)
            t = _read_cut(reader, key, name, p.shape, rank, size)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{key} in {path!r} is {tuple(reader.shape(key))}, which does not give this rank's "
                                 f"{tuple(p.shape)} at tp={size}")
            q = nn.Parameter(t.to(device=device, dtype=dtype).contiguous(), requires_grad=p.requires_grad)
            q.__dict__.update(p.__dict__)  # tensor-parallel marks
            new[id(p)] = q
            read += t.numel() * t.element_size()
        if not new:
            continue
        replace_parameters(model, new)
        if partition is not None:  # partition this module now: the next one is read into freed memory
            partition(mod)
    if model.new_tokens is not None:  # the new rows start at the mean of the embedding rows, as from_hf's
        key = hf_name("embed_tokens.weight", False)
        model.new_tokens.start_at(reader.read(key).float().mean(0))
    return read
