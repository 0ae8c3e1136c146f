"""open_flamingo's `checkpoint.pt` for Llama-family decoders, in and out.

    load_open_flamingo(CKPT, cfg, tokenizer) -> FlamingoModel   decoder and tower from their HF folders
    to_open_flamingo(model, PATH)                               a checkpoint.pt open_flamingo's Flamingo
                                                                loads with load_state_dict(strict=False)

open_flamingo (2.0.1) trains the resampler (`perceiver.*`), the gated xattn blocks
(`lang_encoder.model.layers.{i}.gated_cross_attn_layer.*`, numbered by the decoder layer they
precede) and the input embedding, whose rows after the LM's vocabulary are <|endofchunk|>,
<image> and, for an LM without one, a pad token, in that order. Its modules differ from furnace's
in names only: one `to_kv` matrix (the k rows, then the v rows) and feed-forwards that are
nn.Sequential(LayerNorm, Linear, GELU, Linear), indices 0, 1, 3. Its open_clip tower
(`vision_encoder.*`, frozen there) is not read: furnace's is the HF one at `cfg.vision.path`.
"""
from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn

from furnace.config import ModelConfig
from furnace.tokens import EOC_TOKEN, IMAGE_TOKEN

from . import llama
from .empty import empty, fill
from .flamingo import FlamingoModel, build_flamingo
from .hf_io import WeightReader
from .layers import FeedForward
from .lora import LoraLinear
from .vision import config_of, tower_reader, vision_skeleton_from_hf

FF_INDEX = {"norm": "0", "fc1": "1", "fc2": "3"}  # nn.Sequential(LayerNorm, Linear, GELU, Linear)
KV = ("to_k", "to_v")                             # halves of open_flamingo's to_kv, in its order
OPTIONAL = {"frame_embs"}                         # open_flamingo has them only with max_num_frames
XATTN = "lang_encoder.model.layers.{}.gated_cross_attn_layer."
EMBED, HEAD = "lang_encoder.model.embed_tokens.weight", "lang_encoder.lm_head.weight"
NORM = "lang_encoder.model.norm.weight"
XATTN_KEY = re.compile(r"^lang_encoder\.model\.layers\.(\d+)\.gated_cross_attn_layer\.")
DECODER_KEY = re.compile(r"^lang_encoder\.model\.layers\.(\d+)\.decoder_layer\.(.+)$")
WRAPPERS = re.compile(r"^module\.|_checkpoint_wrapped_module\.|_fsdp_wrapped_module\.")  # DDP / FSDP names
# open_flamingo's state_dict() holds each block twice: under the FlamingoLayer and its old list
ALIASES = ((re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\."), XATTN.format(r"\1")),
           (re.compile(r"^lang_encoder\.old_decoder_blocks\.(\d+)\."), r"lang_encoder.model.layers.\1.decoder_layer."))
IGNORED = re.compile(r"^vision_encoder\.|rotary_emb\.inv_freq$")


# ------------------------------------------------------------------ one module's names

def names(module: nn.Module) -> list[tuple[str, str, int | None]]:
    """(furnace name, open_flamingo name, which half of its to_kv or None) of each parameter of
    a furnace PerceiverResampler or GatedCrossAttentionBlock, relative to the module."""
    out = []
    for name, _ in module.named_parameters():
        parts, half = name.split("."), None
        if len(parts) > 1 and isinstance(module.get_submodule(".".join(parts[:-2])), FeedForward):
            parts[-2] = FF_INDEX[parts[-2]]
        elif len(parts) > 1 and parts[-2] in KV:
            parts[-2], half = "to_kv", KV.index(parts[-2])
        out.append((name, ".".join(parts), half))
    return out


def from_open_flamingo(module: nn.Module, state: dict, prefix: str = "", where: str = "the checkpoint") -> dict:
    """furnace `module`'s state from its open_flamingo counterpart's, found in `state` under
    `prefix`. Absent frame embeddings become zeros: furnace then adds nothing, as open_flamingo."""
    out, missing = {}, []
    for name, of, half in names(module):
        t = state.get(prefix + of)
        if t is None and of in OPTIONAL:
            t = torch.zeros(module.get_parameter(name).shape)
        if t is None:
            missing.append(prefix + of)  # to_kv once for k and once for v
            continue
        out[name] = t if half is None else t.chunk(2, dim=0)[half].clone()  # no shared storage (safetensors)
    if missing:
        missing = list(dict.fromkeys(missing))
        raise ValueError(f"{where} lacks {len(missing)} open_flamingo keys, e.g. {missing[:4]}: pass the checkpoint.pt "
                         "that open_flamingo trained (perceiver.* and the gated_cross_attn_layer.* keys)")
    return out


def open_flamingo_state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The reverse of `from_open_flamingo`: open_flamingo's names, k and v joined into to_kv;
    frame embeddings left out when zero (open_flamingo's default resampler has none)."""
    out: dict = {}
    for name, of, half in names(module):
        t = module.get_parameter(name).detach().cpu()
        if of in OPTIONAL and not t.any():
            continue
        if half is None:
            out[prefix + of] = t.clone()
        else:
            out.setdefault(prefix + of, [None, None])[half] = t
    return {k: torch.cat(v) if isinstance(v, list) else v for k, v in out.items()}


# ------------------------------------------------------------------ the checkpoint

def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, loaded weights-only (never a full unpickle), bare or under
    "model_state_dict" (open_flamingo's training checkpoints), wrapper names removed, the
    duplicate names of a block merged, open_clip's tower and rotary buffers dropped."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{str(path)!r} is not a weights-only checkpoint (it pickles objects, not just tensors): "
                         "re-save it as torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} holds no state dict of tensors: pass open_flamingo's checkpoint.pt")
    state: dict[str, torch.Tensor] = {}
    for key, t in obj.items():
        key = WRAPPERS.sub("", key)
        for pattern, repl in ALIASES:
            key = pattern.sub(repl, key)
        if not IGNORED.search(key):
            state.setdefault(key, t)
    return state


def _mult(state: dict, key: str, dim: int) -> int:
    rows = state[key].shape[0]
    if rows % dim:
        raise ValueError(f"{key} has {rows} rows, not a multiple of the width {dim}: furnace needs an integer ff_mult")
    return rows // dim


def _check_heads(state: dict, key: str, section: str, c) -> None:
    """heads x dim_head: the shapes hold only the product."""
    if c.heads * c.dim_head != state[key].shape[0]:
        raise ValueError(f"{key} has {state[key].shape[0]} rows but {section}.heads * {section}.dim_head = "
                         f"{c.heads} * {c.dim_head}: set them to the checkpoint's (open_flamingo's default 8 * 64)")


def checkpoint_shapes(state: dict, cfg: ModelConfig, num_layers: int, where: str) -> ModelConfig:
    """`cfg` with the resampler's and the xattn blocks' shapes read off the checkpoint."""
    layers = sorted({int(m.group(1)) for k in state if (m := XATTN_KEY.match(k))})
    first = XATTN.format(layers[0] if layers else "*")
    need = ["perceiver.latents", "perceiver.layers.0.0.to_q.weight", "perceiver.layers.0.1.1.weight",
            first + "attn.to_q.weight", first + "ff.1.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"{where} lacks {missing[:4]}: not an open_flamingo checkpoint.pt (perceiver.* and "
                         "lang_encoder.model.layers.*.gated_cross_attn_layer.*)")
    every = layers[0] + 1
    if layers != [i for i in range(num_layers) if (i + 1) % every == 0]:
        raise ValueError(f"{where} has gated xattn blocks before layers {layers}, not one before every {every}th of "
                         f"the LM's {num_layers}: pass the LM it was trained with")
    dv, d = state["perceiver.latents"].shape[1], state[first + "attn.to_q.weight"].shape[1]
    depth = len({m.group(1) for k in state if (m := re.match(r"perceiver\.layers\.(\d+)\.", k))})
    frames = state.get("perceiver.frame_embs")
    perceiver = dataclasses.replace(
        cfg.perceiver, num_latents=state["perceiver.latents"].shape[0], depth=depth,
        ff_mult=_mult(state, "perceiver.layers.0.1.1.weight", dv),
        max_frames=cfg.perceiver.max_frames if frames is None else frames.shape[0])
    xattn = dataclasses.replace(cfg.xattn, every=every, ff_mult=_mult(state, first + "ff.1.weight", d))
    _check_heads(state, "perceiver.layers.0.0.to_q.weight", "model.perceiver", perceiver)
    _check_heads(state, first + "attn.to_q.weight", "model.xattn", xattn)
    return dataclasses.replace(cfg, perceiver=perceiver, xattn=xattn)


# ------------------------------------------------------------------ the whole model

def xattn_blocks(model: FlamingoModel) -> list[tuple[int, int]]:
    """(decoder layer, xattn block) pairs: open_flamingo numbers a block by the layer it precedes."""
    return [(i, j) for i in range(len(model.lm.layers)) if (j := model.xattn_index(i)) is not None]


def new_row_order(model: FlamingoModel) -> list[int]:
    """furnace's new-token rows in open_flamingo's order: <|endofchunk|>, <image>, then the rest
    (its pad token) by id."""
    rank = {model.eoc_token_id - model.base_vocab: 0, model.image_token_id - model.base_vocab: 1}
    return sorted(range(model.vocab_size - model.base_vocab), key=lambda i: (rank.get(i, 2), i))


def split_vocab(t: torch.Tensor, model: FlamingoModel, key: str):
    """(the LM's rows, furnace's new-token rows) of open_flamingo's embedding or head `t`."""
    if t.shape[0] != model.vocab_size:
        raise ValueError(f"{key} has {t.shape[0]} rows but the tokenizer gives {model.vocab_size}: pass the LM's "
                         "tokenizer (open_flamingo adds <|endofchunk|>, <image> and a pad token when it has none)")
    new = torch.empty(model.vocab_size - model.base_vocab, t.shape[1], dtype=t.dtype)
    new[new_row_order(model)] = t[model.base_vocab:]
    return t[:model.base_vocab].clone(), new


def furnace_tensors(state: dict, model: FlamingoModel, where: str) -> dict[str, torch.Tensor]:
    """Each furnace parameter the checkpoint holds, by furnace name; one line for keys with no place."""
    ours, used = {}, set()
    parts = [("perceiver.", "perceiver.", model.perceiver)]
    parts += [(f"xattn.{j}.", XATTN.format(i), model.xattn[j]) for i, j in xattn_blocks(model)]
    for fu, of, module in parts:
        ours.update({fu + k: v for k, v in from_open_flamingo(module, state, of, where).items()})
        used |= {of + n for _, n, _ in names(module)}
    for key, lm_name, new_name in ((EMBED, "lm.embed_tokens.weight", "new_tokens.embed.weight"),
                                   (HEAD, "lm.lm_head.weight", "new_tokens.head.weight")):
        if key in state:
            ours[lm_name], new = split_vocab(state[key], model, key)
            if model.new_tokens is not None:
                ours[new_name] = new
            used.add(key)
    lm_names = set(model.state_dict(keep_vars=True))
    for key, t in state.items():  # a whole state dict also holds the decoder: it replaces the HF folder's
        m = DECODER_KEY.match(key)
        name = f"lm.layers.{m.group(1)}.{m.group(2)}" if m else "lm.norm.weight" if key == NORM else None
        if name in lm_names:
            ours[name] = t
            used.add(key)
    unknown = sorted(set(state) - used)
    if unknown:
        raise ValueError(f"{where} holds {len(unknown)} keys this Flamingo has no place for, e.g. {unknown[:4]}: "
                         "pass an open_flamingo checkpoint of a Llama-family LM")
    return ours


def load_open_flamingo(checkpoint, cfg: ModelConfig, tokenizer, *, lm_path=None, vision_path=None,
                       dtype: torch.dtype = torch.float32) -> FlamingoModel:
    """The FlamingoModel of open_flamingo's `checkpoint` (checkpoint.pt), the decoder and tower read
    from their HF folders (`lm_path`/`vision_path`, default cfg.lm.path/cfg.vision.path), built
    without weights and filled tensor by tensor. The resampler's and xattn blocks' shapes are read
    off the checkpoint (heads x dim_head checked against `cfg`) and written back into `cfg`, as
    `build_model` does for a loaded LM. A whole embedding in the checkpoint replaces the LM's rows;
    an untied head it lacks keeps the LM's, its new rows at furnace's start (the embedding mean)."""
    lm_path, vision_path = lm_path or cfg.lm.path, vision_path or cfg.vision.path
    if not lm_path or not vision_path:
        raise ValueError("load_open_flamingo needs the LM's and the tower's HF folders: set model.lm.path and "
                         "model.vision.path (or pass lm_path, vision_path)")
    where = str(checkpoint)
    state = read_checkpoint(checkpoint)
    lm = llama.skeleton_from_hf(lm_path)
    tower = vision_skeleton_from_hf(str(vision_path), cfg.freeze_vision)
    resolved = checkpoint_shapes(state, cfg, lm.cfg.num_layers, where)
    with empty():
        model = build_flamingo(resolved, vocab_size=len(tokenizer), lm=lm, vision=tower,
                               image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                               eoc_token_id=tokenizer.convert_tokens_to_ids(EOC_TOKEN))
    model.tie_weights()
    ours = furnace_tensors(state, model, where)
    lm_reader, tower_weights = WeightReader(lm_path), tower_reader(vision_path)
    tied = lm.cfg.tie_word_embeddings

    def read(name: str) -> torch.Tensor:
        if name in ours:
            return ours[name]
        if name.startswith("lm."):
            return lm_reader.read(llama.hf_name(name.removeprefix("lm."), tied))
        if name.startswith("new_tokens."):  # not in the checkpoint: furnace's start (NewTokens.start_at)
            base = ours.get("lm.embed_tokens.weight")
            base = lm_reader.read(llama.hf_name("embed_tokens.weight", tied)) if base is None else base
            return base.float().mean(0).expand(model.new_tokens.count, -1).clone()
        return tower_weights.read(name.removeprefix("vision.model."))

    fill(model, read, dtype=dtype, where=where)
    cfg.perceiver, cfg.xattn = resolved.perceiver, resolved.xattn
    cfg.lm = dataclasses.replace(model.lm.cfg, path=str(lm_path))
    cfg.vision = config_of(model.vision, str(vision_path))
    return model


def join_vocab(base: torch.Tensor, new: nn.Module | None, model: FlamingoModel) -> torch.Tensor:
    """The LM's rows, then the new-token rows in open_flamingo's order."""
    base = base.detach().cpu()
    if new is None:
        return base.clone()
    return torch.cat([base, new.weight.detach().cpu()[new_row_order(model)].to(base.dtype)])


def to_open_flamingo(model: FlamingoModel, path) -> None:
    """Write a whole (unsharded) `model` as open_flamingo's checkpoint.pt at `path`: the resampler,
    the xattn blocks, the embedding and (untied) head with the new rows appended in open_flamingo's
    order; the decoder's other weights stay in its HF folder. Non-zero frame embeddings (furnace
    trains them) are written too, but open_flamingo's Flamingo builds its resampler without them:
    build it with max_num_frames there, or strict=False drops them."""
    if any(isinstance(m, LoraLinear) for m in model.lm.modules()):  # they would be dropped silently
        raise ValueError("open_flamingo's checkpoint has no place for LoRA adapters (model.lora): use furnace-export, "
                         "whose LM folder has them merged (or --lora peft)")
    state = open_flamingo_state(model.perceiver, "perceiver.")
    for i, j in xattn_blocks(model):
        state.update(open_flamingo_state(model.xattn[j], XATTN.format(i)))
    nt = model.new_tokens
    state[EMBED] = join_vocab(model.lm.embed_tokens.weight, None if nt is None else nt.embed, model)
    if not model.lm.cfg.tie_word_embeddings:
        state[HEAD] = join_vocab(model.lm.lm_head.weight, None if nt is None else nt.head, model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
