"""A whole FlamingoModel as one folder, and its decoder alone as an HF checkpoint.

    save_flamingo(model, DIR, model_config)   DIR/flamingo.json + safetensors
    load_flamingo(DIR) -> FlamingoModel       needs nothing but DIR; built empty, filled tensor by tensor
    architecture(model) / empty_flamingo      the decoder's and tower's HF configs, and the model
                                              they describe, without weights
    write_lm(DIR, OUT)                        the decoder alone (new token rows and LoRA merged) from a
                                              saved Flamingo folder, streamed: loadable by transformers
    write_peft_adapter(DIR, OUT, BASE)        its LoRA adapters as a peft folder (over write_lm(lora="peft"))
    lm_with_new_tokens(model) -> Llama        the same from a model in memory (for llama.to_hf)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from furnace.config import ModelConfig, update

from . import llama
from .empty import empty, fill, persistent_buffers, stored_names
from .flamingo import FlamingoModel, build_flamingo
from .hf_io import WeightReader, WeightWriter, write_config
from .llama import Llama
from .lora import (ADAPTERS, PEFT_CONFIG, PEFT_WEIGHTS, is_adapter, merge, merged_state_dict, peft_config, peft_name,
                   scaling)
from .vision import KINDS, VisionTower

FLAMINGO_JSON = "flamingo.json"
LORA_EXPORTS = ("merge", "peft")  # what write_lm does with LoRA adapters


def lm_with_new_tokens(model: FlamingoModel) -> Llama:
    """The decoder alone with the new token rows merged into its vocabulary (for to_hf)."""
    if model.new_tokens is None:
        return model.lm
    lm = Llama(dataclasses.replace(model.lm.cfg, vocab_size=model.vocab_size), hf_config=model.lm.hf_config)
    state = merged_state_dict(model.lm)  # LoRA adapters folded into their weights
    state["embed_tokens.weight"] = torch.cat([state["embed_tokens.weight"], model.new_tokens.embed.weight.detach()])
    state["lm_head.weight"] = torch.cat([state["lm_head.weight"], model.new_tokens.head.weight.detach()])
    lm.load_state_dict(state)
    lm.tie_weights()
    return lm


def flamingo_state_dict(model: FlamingoModel) -> dict[str, torch.Tensor]:
    """state_dict without the tied duplicates (safetensors stores each tensor once)."""
    state = model.state_dict()
    if model.lm.cfg.tie_word_embeddings:
        state.pop("lm.lm_head.weight", None)
        state.pop("new_tokens.head.weight", None)
    return state


def architecture(model: FlamingoModel) -> dict:
    """The decoder's and the vision tower's full HF configs: with furnace's model config, all
    that rebuilds the model's shape and activations without the checkpoints it started from."""
    return {"lm_config": llama.hf_config(model.lm), "vision_kind": model.vision.kind,
            "vision_config": model.vision.model.config.to_dict()}


def empty_parts(arch: dict, freeze_vision: bool) -> tuple[Llama, VisionTower]:
    """A decoder and a tower of `architecture`'s shapes, without weights (fill them in)."""
    lm = llama.skeleton(llama.config_from_hf(arch["lm_config"]), arch["lm_config"])
    cfg_cls, cls = KINDS[arch["vision_kind"]]
    with empty():
        tower = VisionTower(cls(cfg_cls(**arch["vision_config"])), arch["vision_kind"], freeze_vision)
    return lm, tower


def flamingo_meta(model: FlamingoModel, model_config: dict) -> dict:
    """flamingo.json: furnace's model config, the token ids and the `architecture`."""
    audio = {} if model.audio_token_id is None else {"audio_token_id": model.audio_token_id}
    return {"model": model_config, "vocab_size": model.vocab_size, "image_token_id": model.image_token_id,
            "eoc_token_id": model.eoc_token_id, "eos_token_id": model.eos_token_id, **audio, **architecture(model)}


def save_flamingo(model: FlamingoModel, path, model_config: dict, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """The whole model as one safetensors folder plus what rebuilds it without the original
    checkpoints (`flamingo_meta`)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / FLAMINGO_JSON).write_text(json.dumps(flamingo_meta(model, model_config), indent=2))
    with WeightWriter(p, max_shard_bytes=max_shard_bytes) as w:
        for k, v in flamingo_state_dict(model).items():
            w.add(k, v)


def read_meta(path) -> tuple[dict, ModelConfig]:
    f = Path(path) / FLAMINGO_JSON
    if not f.is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no {FLAMINGO_JSON}: pass a folder written by furnace-export "
                                "(OUT/flamingo) or save_flamingo")
    meta = json.loads(f.read_text())
    mcfg = ModelConfig()
    update(mcfg, meta["model"], "model.", saved=True)
    return meta, mcfg


def empty_flamingo(meta: dict, mcfg: ModelConfig) -> FlamingoModel:
    """The Flamingo that `flamingo_meta` describes, without weights."""
    lm, vision = empty_parts(meta, mcfg.freeze_vision)
    with empty():
        model = build_flamingo(mcfg, vocab_size=meta["vocab_size"], image_token_id=meta["image_token_id"],
                               eoc_token_id=meta["eoc_token_id"], eos_token_id=meta.get("eos_token_id"),
                               lm=lm, vision=vision, audio_token_id=meta.get("audio_token_id"))
    model.tie_weights()
    return model


def check_names(model: FlamingoModel, have, where: str) -> None:
    """One line when the stored tensors are not this model's (tied duplicates may be absent)."""
    missing = sorted(set(stored_names(model)) - set(have))
    unexpected = sorted(set(have) - set(model.state_dict(keep_vars=True)))
    if missing or unexpected:
        raise ValueError(f"the weights in {where} do not match this Flamingo: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def load_flamingo(path) -> FlamingoModel:
    """The model of a folder `save_flamingo` or furnace-export wrote, in its stored dtype: built
    without weights and filled one tensor at a time (no second copy)."""
    meta, mcfg = read_meta(path)
    model = empty_flamingo(meta, mcfg)
    reader = WeightReader(path)
    check_names(model, reader.names(), str(path))
    fill(model, reader.read, where=str(path))
    for name in persistent_buffers(model):
        model.get_buffer(name).data.copy_(reader.read(name))
    return model


def write_lm(flamingo_dir, out, *, max_shard_bytes: int = 5 * 2**30, lora: str = "merge") -> None:
    """The decoder of a saved Flamingo folder as an HF checkpoint (config.json + safetensors),
    the new token rows appended to its vocabulary, one tensor at a time. LoRA adapters, if any:
    lora="merge" folds them into their weights (a plain decoder), "peft" leaves the base weights
    as they are (`write_peft_adapter` writes the adapters)."""
    if lora not in LORA_EXPORTS:
        raise ValueError(f"lora={lora!r}: choose one of {', '.join(LORA_EXPORTS)}")
    meta, mcfg = read_meta(flamingo_dir)
    src = WeightReader(flamingo_dir)
    stored = set(src.names())
    cfg = llama.config_from_hf(meta["lm_config"])
    extra = meta["vocab_size"] - cfg.vocab_size
    lm = llama.skeleton(dataclasses.replace(cfg, vocab_size=meta["vocab_size"]), meta["lm_config"])
    hf = llama.hf_config(lm)
    dtype = None
    with WeightWriter(out, max_shard_bytes=max_shard_bytes) as w:
        for name in src.names():
            if not name.startswith("lm.") or is_adapter(name):
                continue
            leaf = name.removeprefix("lm.")
            t = src.read(name)
            a, b = (name.removesuffix("weight") + f"{x}.weight" for x in ADAPTERS)
            if lora == "merge" and a in stored:
                t = merge(t, src.read(a), src.read(b), scaling(mcfg.lora))
            new = {"embed_tokens.weight": "new_tokens.embed.weight", "lm_head.weight": "new_tokens.head.weight"}
            if extra > 0 and leaf in new:
                t = torch.cat([t, src.read(new[leaf])])
            w.add(leaf if leaf.startswith("lm_head.") else f"model.{leaf}", t)
            dtype = t.dtype
    hf["dtype"] = str(dtype).removeprefix("torch.")
    write_config(hf, out)


def write_peft_adapter(flamingo_dir, out, base_model: str) -> None:
    """The LoRA adapters of a saved Flamingo folder as a peft adapter folder (adapter_config.json +
    adapter_model.safetensors) over the decoder that `write_lm(..., lora="peft")` wrote at
    `base_model`: `peft.PeftModel.from_pretrained(that decoder, out)` applies them."""
    meta, mcfg = read_meta(flamingo_dir)
    if mcfg.lora.rank == 0:
        raise ValueError(f"{str(flamingo_dir)!r} has no LoRA adapters (model.lora.rank=0): export the plain LM "
                         "(leave out --lora peft)")
    src = WeightReader(flamingo_dir)
    # Held together (peft reads one file): rank x (in + out) numbers per adapted linear, small.
    tensors = {peft_name(name): src.read(name).contiguous() for name in src.names()
               if name.startswith("lm.") and is_adapter(name)}
    p = Path(out)
    p.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p / PEFT_WEIGHTS), metadata={"format": "pt"})
    (p / PEFT_CONFIG).write_text(json.dumps(peft_config(mcfg.lora, base_model), indent=2))
