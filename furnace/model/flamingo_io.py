"""A whole FlamingoModel as one folder, and its decoder alone as an HF checkpoint.

    save_flamingo(model, DIR, model_config)   DIR/flamingo.json + safetensors
    load_flamingo(DIR) -> FlamingoModel       needs nothing but DIR
    architecture(model) / parts_from(arch)    the decoder's and tower's HF configs, and the
                                              (weightless) parts they rebuild
    lm_with_new_tokens(model) -> Llama        the decoder with the new token rows merged (for llama.to_hf)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from furnace.config import ModelConfig, update

from . import llama
from .flamingo import FlamingoModel, build_flamingo
from .hf_io import load_weights, save_weights
from .llama import Llama
from .vision import KINDS, VisionTower


def lm_with_new_tokens(model: FlamingoModel) -> Llama:
    """The decoder alone with the new token rows merged into its vocabulary (for to_hf)."""
    if model.new_tokens is None:
        return model.lm
    lm = Llama(dataclasses.replace(model.lm.cfg, vocab_size=model.vocab_size), hf_config=model.lm.hf_config)
    state = dict(model.lm.state_dict())
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


def parts_from(arch: dict, freeze_vision: bool) -> tuple[Llama, VisionTower]:
    """A decoder and a tower of `architecture`'s shapes (fresh weights: load a state into them)."""
    lm = Llama(llama.config_from_hf(arch["lm_config"]), hf_config=arch["lm_config"])
    cfg_cls, cls = KINDS[arch["vision_kind"]]
    return lm, VisionTower(cls(cfg_cls(**arch["vision_config"])), arch["vision_kind"], freeze_vision)


def save_flamingo(model: FlamingoModel, path, model_config: dict) -> None:
    """The whole model as one safetensors folder plus what rebuilds it without the original
    checkpoints: furnace's model config and the `architecture`."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "flamingo.json").write_text(json.dumps({
        "model": model_config, "vocab_size": model.vocab_size, "image_token_id": model.image_token_id,
        "eoc_token_id": model.eoc_token_id, **architecture(model)}, indent=2))
    save_weights(flamingo_state_dict(model), p)


def load_flamingo(path) -> FlamingoModel:
    meta = json.loads((Path(path) / "flamingo.json").read_text())
    mcfg = ModelConfig()
    update(mcfg, meta["model"], "model.", saved=True)
    lm, vision = parts_from(meta, mcfg.freeze_vision)
    model = build_flamingo(mcfg, vocab_size=meta["vocab_size"], image_token_id=meta["image_token_id"],
                           eoc_token_id=meta["eoc_token_id"], lm=lm, vision=vision)
    load_flamingo_state(model, load_weights(path))
    return model


def load_flamingo_state(model: FlamingoModel, state: dict[str, torch.Tensor]) -> None:
    """Strict load that accepts the tied duplicates being absent."""
    tied = {"lm.lm_head.weight", "new_tokens.head.weight"} if model.lm.cfg.tie_word_embeddings else set()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"weights do not match this Flamingo: missing {missing[:5]}, unexpected {unexpected[:5]}")
