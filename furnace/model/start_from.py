"""The Flamingo parts a run starts from (`model.start_from`): the resampler, the xattn blocks,
the new token rows (and LoRA adapters) of a pretrained Flamingo, and from open_flamingo the
embedding rows it trained, while the LM and the tower come from model.lm.path / model.vision.path
as always.

Two sources: a folder furnace-export or `save_flamingo` wrote (flamingo.json), and
open_flamingo's checkpoint.pt (`open_flamingo_io`). The source decides the shapes of those parts,
as an LM checkpoint decides the LM's: `start_config` writes them into the config before the model
is built; `start_tensors` gives each part's full tensor by furnace name (the ranks then write
their own cuts: `furnace.parallel.materialize.load_start`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from furnace.config import ModelConfig

from .flamingo_io import FLAMINGO_JSON, read_meta
from .hf_io import WeightReader
from .open_flamingo_io import checkpoint_shapes, furnace_tensors, read_checkpoint

PARTS = ("perceiver.", "xattn.", "new_tokens.")


def is_part(name: str) -> bool:
    """A tensor `model.start_from` provides (the rest is the LM's and the tower's)."""
    return name.startswith(PARTS) or ".lora_" in name


def kind_of(path) -> str:
    p = Path(path)
    if (p / FLAMINGO_JSON).is_file():
        return "furnace"
    if p.is_file():
        return "open_flamingo"
    raise FileNotFoundError(f"model.start_from={str(path)!r} is neither a furnace export folder (no {FLAMINGO_JSON}) "
                            "nor an open_flamingo checkpoint.pt file")


def start_config(mcfg: ModelConfig, lm_layers: int) -> ModelConfig:
    """`mcfg` with the resampler's and the xattn blocks' shapes of its `start_from` source."""
    path = mcfg.start_from
    if kind_of(path) == "open_flamingo":
        return checkpoint_shapes(read_checkpoint(path), mcfg, lm_layers, str(path))
    _, saved = read_meta(path)
    return dataclasses.replace(mcfg, perceiver=saved.perceiver,
                               xattn=dataclasses.replace(saved.xattn, gate_init=mcfg.xattn.gate_init))


def start_tensors(path, skeleton) -> dict[str, torch.Tensor]:
    """{furnace name: full tensor} of the parts the source holds for `skeleton` (the run's
    model, unsharded; built without weights is enough). One line for what does not fit."""
    where = str(path)
    extra: tuple = ()
    if kind_of(path) == "open_flamingo":
        # open_flamingo trains the whole input embedding (and an untied head): those rows too
        extra = ("lm.embed_tokens.weight", "lm.lm_head.weight")
        out = {k: v for k, v in furnace_tensors(read_checkpoint(path), skeleton, where).items()
               if is_part(k) or k in extra}
    else:
        reader = WeightReader(path)
        out = {k: reader.read(k) for k in reader.names() if is_part(k)}
    want = {n: p.shape for n, p in skeleton.named_parameters() if is_part(n) or (n in extra and n in out)}
    missing = sorted(set(want) - set(out))
    if missing:
        raise ValueError(f"model.start_from={where!r} lacks {missing[:4]} of this Flamingo: start from a model with "
                         "the same parts (new tokens, LoRA targets)")
    wrong = [f"{n} {tuple(out[n].shape)} vs {tuple(s)}" for n, s in want.items() if tuple(out[n].shape) != tuple(s)]
    if wrong:
        raise ValueError(f"model.start_from={where!r}: {wrong[0]} in this Flamingo; the tokenizer or the LM differs "
                         "from the one it was trained with")
    return {n: out[n] for n in want}
