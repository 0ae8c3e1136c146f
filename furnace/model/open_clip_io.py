"""open_clip ViT towers (open_flamingo's ViT-L/14, ViT-H/14) read as HF CLIP vision towers.

An open_clip folder as the hub ships one (`open_clip_config.json` + `open_clip_model.safetensors`
or `open_clip_pytorch_model.bin`) describes a plain ViT that is an HF `CLIPVisionModel` under
other names: one packed `in_proj` for q, k and v, `conv1` for the patch embedding, `ln_pre` /
`ln_post`, and GELU unless the model is a `quick_gelu` one. Reading it through `OpenClipReader`
(the HF names, the packed matrices sliced on the fly) lets the rest of furnace (building without
weights, ZeRO-3, export) treat it as the HF tower it is; only the features taken differ
(`model.vision.features`). Towers open_clip builds otherwise (timm trunks, layer scale, attentional
pooling, qk-norm) are refused in one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG = "open_clip_config.json"
WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# vision_cfg keys whose non-default values make a tower that is not a plain CLIP ViT
UNSUPPORTED = {"timm_model_name": None, "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
               "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn": False,
               "scale_fc": False, "pos_embed_type": "learnable", "pool_type": "tok", "block_type": None}


def is_open_clip(path) -> bool:
    return path is not None and (Path(path) / CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def read_open_clip_config(path) -> dict:
    """(the file's) {"model_cfg": {...}, "preprocess_cfg": {...}}, checked to be a plain ViT."""
    f = Path(path) / CONFIG
    try:
        raw = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(f)!r} is not readable JSON ({e})") from None
    vision = raw.get("model_cfg", {}).get("vision_cfg")
    if not isinstance(vision, dict):
        raise ValueError(f"{str(f)!r} has no model_cfg.vision_cfg: not an open_clip model folder")
    for key, default in UNSUPPORTED.items():
        if vision.get(key, default) != default:
            raise ValueError(f"{str(f)!r}: vision_cfg.{key}={vision[key]!r} is not a plain CLIP ViT; furnace reads "
                             "open_clip ViTs (ViT-B/L/H/g) only")
    if not isinstance(vision.get("layers", 12), int):
        raise ValueError(f"{str(f)!r}: vision_cfg.layers={vision['layers']!r} is a ResNet; furnace reads ViTs only")
    return raw


def hf_vision_config(path) -> dict:
    """The HF CLIPVisionConfig fields of the tower in an open_clip folder."""
    raw = read_open_clip_config(path)
    v = raw["model_cfg"]["vision_cfg"]
    width = v.get("width", 768)
    return {"model_type": "clip_vision_model", "hidden_size": width, "num_hidden_layers": v.get("layers", 12),
            "num_attention_heads": width // v.get("head_width", 64),
            "intermediate_size": int(width * v.get("mlp_ratio", 4.0)), "patch_size": v.get("patch_size", 16),
            "image_size": v.get("image_size", 224), "layer_norm_eps": 1e-5,
            "hidden_act": "quick_gelu" if raw["model_cfg"].get("quick_gelu") else "gelu"}


def image_stats(path) -> tuple | None:
    """(mean, std) of the folder's preprocess_cfg, None when it names none (CLIP's then)."""
    pre = read_open_clip_config(path).get("preprocess_cfg", {})
    if "mean" in pre and "std" in pre:
        return tuple(pre["mean"]), tuple(pre["std"])
    return None


def _open_clip_name(hf: str) -> tuple[str, int | None]:
    """(open_clip tensor name, which third of a packed in_proj or None) of an HF tower name
    (transformers 5 names a CLIPVisionModel's tensors without the `vision_model.` prefix)."""
    name = hf.removeprefix("vision_model.")
    fixed = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
             "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
    if name in fixed:
        return "visual." + fixed[name], None
    parts = name.split(".")  # encoder.layers.{i}.<module>.<leaf>
    if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
        raise KeyError(hf)
    i, mod, leaf = parts[2], ".".join(parts[3:-1]), parts[-1]
    block = f"visual.transformer.resblocks.{i}."
    qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
    if mod in qkv:
        return block + f"attn.in_proj_{leaf}", qkv[mod]
    simple = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    if mod not in simple:
        raise KeyError(hf)
    return block + f"{simple[mod]}.{leaf}", None


class OpenClipReader:
    """`furnace.model.hf_io.WeightReader`'s interface (names, shape, read with a slice) over an
    open_clip folder, in HF CLIPVisionModel names. The weights are loaded once: safetensors
    memory-mapped, a .bin weights-only (never a full unpickle)."""

    def __init__(self, path):
        path = Path(path)
        files = [path / w for w in WEIGHTS if (path / w).is_file()]
        if not files:
            raise FileNotFoundError(f"no open_clip weights in {str(path)!r}: expected one of {', '.join(WEIGHTS)}")
        if files[0].suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(files[0]))
        else:
            state = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
            state = state.get("state_dict", state)
        self.state = {k.removeprefix("module."): v for k, v in state.items() if k.removeprefix("module.").startswith("visual.")}
        self._names = []
        for k in self.state:
            self._names += _hf_names(k)

    def names(self) -> list[str]:
        return list(self._names)

    def _full(self, name: str) -> torch.Tensor:
        try:
            key, third = _open_clip_name(name)
            t = self.state[key]
        except KeyError:
            raise KeyError(f"{name} has no open_clip counterpart in this folder") from None
        return t if third is None else t.chunk(3, dim=0)[third]

    def shape(self, name: str) -> list[int]:
        return list(self._full(name).shape)

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        t = self._full(name)
        if dim is not None:
            t = t.narrow(dim, start, (t.shape[dim] if end is None else end) - start)
        return t.clone()


def _hf_names(key: str) -> list[str]:
    """The HF names an open_clip `visual.*` tensor stands for (three for a packed in_proj; none
    for the contrastive projection `proj`, which the tower's features do not use)."""
    tail = key.removeprefix("visual.")
    fixed = {"class_embedding": ["embeddings.class_embedding"], "conv1.weight": ["embeddings.patch_embedding.weight"],
             "positional_embedding": ["embeddings.position_embedding.weight"], "proj": [],
             "ln_pre.weight": ["pre_layrnorm.weight"], "ln_pre.bias": ["pre_layrnorm.bias"],
             "ln_post.weight": ["post_layernorm.weight"], "ln_post.bias": ["post_layernorm.bias"]}
    if tail in fixed:
        return list(fixed[tail])
    parts = tail.split(".")  # transformer.resblocks.{i}.<module>.<leaf>
    i, mod, leaf = parts[2], ".".join(parts[3:-1]), parts[-1]
    block = f"encoder.layers.{i}."
    if mod == "attn" and leaf.startswith("in_proj_"):
        kind = leaf.removeprefix("in_proj_")
        return [block + f"self_attn.{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj")]
    simple = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    return [block + f"{simple[mod]}.{leaf}"] if mod in simple else []
