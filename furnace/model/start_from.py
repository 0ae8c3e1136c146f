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
# What a run may add to its source: taken from the source when it holds them, else left as drawn
# (a Flamingo continued with LoRA, a contrastive objective or audio it was not trained with).
OPTIONAL = {"LoRA adapters": lambda n: ".lora_" in n,
            "contrastive heads": lambda n: n.startswith("contrastive."),
            "audio resampler": lambda n: n.startswith(("audio.perceiver.", "audio.proj."))}


def part_test(mcfg: ModelConfig, kind: str):
    """Whether a tensor is one `model.start_from` provides: the Flamingo parts, what it holds of
    `OPTIONAL`, and from a furnace export the LM and the towers the run names no path for (a
    scratch model continued: those are the source's too, never drawn afresh)."""
    own = PARTS
    if kind == "furnace":
        scratch = {"lm.": not mcfg.lm.path, "vision.": not mcfg.vision.path,
                   "audio.tower.": mcfg.audio.kind == "scratch"}
        own += tuple(prefix for prefix, is_scratch in scratch.items() if is_scratch)
    return lambda name: name.startswith(own) or any(f(name) for f in OPTIONAL.values())


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
    out = dataclasses.replace(mcfg, perceiver=saved.perceiver,
                              xattn=dataclasses.replace(saved.xattn, gate_init=mcfg.xattn.gate_init,
                                                        kernel=mcfg.xattn.kernel))
    if not mcfg.lm.path:  # a scratch LM continued: the source's shape
        out = dataclasses.replace(out, lm=dataclasses.replace(saved.lm, path=None))
    if not mcfg.vision.path:
        out = dataclasses.replace(out, vision=dataclasses.replace(saved.vision, path=None))
    if mcfg.audio.kind == "scratch" and saved.audio.kind == "scratch":
        out = dataclasses.replace(out, audio=saved.audio)
    if mcfg.contrastive.dim and saved.contrastive.dim:  # heads the source trained: its shapes
        out = dataclasses.replace(out, contrastive=dataclasses.replace(
            mcfg.contrastive, dim=saved.contrastive.dim, text_width=saved.contrastive.text_width))
    if mcfg.audio.kind != "none" and saved.audio.kind != "none":
        out = dataclasses.replace(out, audio_perceiver=saved.audio_perceiver)
    return out


def start_tensors(mcfg: ModelConfig, skeleton) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({furnace name: full tensor} of the parts `mcfg.start_from` holds for `skeleton` (the
    run's model, unsharded; built without weights is enough: `part_test`), the `OPTIONAL` parts it
    lacks, which start as drawn). One line for what does not fit."""
    path = mcfg.start_from
    where = str(path)
    extra: tuple = ()
    is_part = part_test(mcfg, kind_of(path))
    if kind_of(path) == "open_flamingo":
        # open_flamingo trains the whole input embedding (and an untied head): those rows too
        extra = ("lm.embed_tokens.weight", "lm.lm_head.weight")
        out = {k: v for k, v in furnace_tensors(read_checkpoint(path), skeleton, where).items()
               if is_part(k) or k in extra}
    else:
        reader = WeightReader(path)
        out = {k: reader.read(k) for k in reader.names() if is_part(k)}
    # a tied head is stored once, under the embedding's name
    tied = ("lm.lm_head.weight", "new_tokens.head.weight") if skeleton.lm.cfg.tie_word_embeddings else ()
    want = {n: p.shape for n, p in skeleton.named_parameters()
            if (is_part(n) or (n in extra and n in out)) and not (n in tied and n not in out)}
    drawn = []
    for part, holds in OPTIONAL.items():
        names = [n for n in want if holds(n)]
        if names and not any(n in out for n in names):
            drawn.append(part)
            for n in names:
                del want[n]
    missing = sorted(set(want) - set(out))
    if missing:
        raise ValueError(f"model.start_from={where!r} lacks {missing[:4]} of this Flamingo: start from a model with "
                         "the same parts (new tokens, LoRA targets, contrastive and audio shapes)")
    wrong = [f"{n} {tuple(out[n].shape)} vs {tuple(s)}" for n, s in want.items() if tuple(out[n].shape) != tuple(s)]
    if wrong:
        raise ValueError(f"model.start_from={where!r}: {wrong[0]} in this Flamingo; the tokenizer or the LM differs "
                         "from the one it was trained with")
    return {n: out[n] for n in want}, drawn
