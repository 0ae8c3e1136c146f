"""IDEFICS checkpoints (transformers' `IdeficsForVisionText2Text`) in and out.

    from_hf(DIR) -> FlamingoModel     a local IDEFICS folder, built without weights and filled
    to_hf(model, DIR)                 a folder transformers loads as IdeficsForVisionText2Text
    convert(DIR, OUT)                 what a run continues from, streamed tensor by tensor:
                                      OUT/lm (the Llama decoder and the tokenizer), OUT/vision (the
                                      tower as an HF CLIP) and OUT/flamingo (the whole model, as
                                      furnace-export writes it: model.start_from, furnace-generate
                                      and furnace-eval read it)

IDEFICS is a Flamingo whose differences from open_flamingo's are furnace config keys
(`model_config`): the resampler has no frame embeddings, per-head LayerNorms on queries and keys
(optional) and a ReLU feed-forward; the xattn blocks sit before the first decoder layer of each
group (`cross_layer_interval`), use RMSNorm, Llama's MLP, optional per-head RMSNorms and float or
vector tanh gates ("alphas"); text after an EOS sees no image until the next. Its decoupled
embedding and head (`additional_embedding`, `additional_fc`) are furnace's new token rows, its
vision tower is CLIP's vision transformer (read before the final norm, class token included).
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from furnace.config import LMConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig
from furnace.data.tokenizer import load_tokenizer
from furnace.tokens import IMAGE_TOKEN

from . import llama
from .empty import fill
from .flamingo import FlamingoModel
from .flamingo_io import FLAMINGO_JSON, empty_flamingo, flamingo_meta
from .hf_io import WeightReader, WeightWriter, write_config
from .lora import merged_state_dict

# furnace name -> IDEFICS name, by pattern (the first that matches); `\1`.. carry the indices.
NAMES = [
    (r"lm\.embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"lm\.lm_head\.weight", "lm_head.weight"),
    (r"lm\.norm\.weight", "model.norm.weight"),
    (r"lm\.layers\.(.+)", r"model.layers.\1"),
    (r"new_tokens\.embed\.weight", "model.embed_tokens.additional_embedding.weight"),
    (r"new_tokens\.head\.weight", "lm_head.additional_fc.weight"),
    (r"vision\.model\.(.+)", r"model.vision_model.\1"),
    (r"perceiver\.latents", "model.perceiver_resampler.latents"),
    (r"perceiver\.norm\.(.+)", r"model.perceiver_resampler.layer_norm.\1"),
    (r"perceiver\.layers\.(\d+)\.0\.norm_media\.(.+)", r"model.perceiver_resampler.blocks.\1.0.context_layer_norm.\2"),
    (r"perceiver\.layers\.(\d+)\.0\.norm_latents\.(.+)", r"model.perceiver_resampler.blocks.\1.0.latents_layer_norm.\2"),
    (r"perceiver\.layers\.(\d+)\.0\.to_([qkv])\.(.+)", r"model.perceiver_resampler.blocks.\1.0.\2_proj.\3"),
    (r"perceiver\.layers\.(\d+)\.0\.to_out\.(.+)", r"model.perceiver_resampler.blocks.\1.0.output_proj.\2"),
    (r"perceiver\.layers\.(\d+)\.0\.([qk])_norm\.(.+)", r"model.perceiver_resampler.blocks.\1.0.\2_layer_norm.\3"),
    (r"perceiver\.layers\.(\d+)\.1\.norm\.(.+)", r"model.perceiver_resampler.blocks.\1.1.ln.\2"),
    (r"perceiver\.layers\.(\d+)\.1\.fc1\.(.+)", r"model.perceiver_resampler.blocks.\1.1.fc.\2"),
    (r"perceiver\.layers\.(\d+)\.1\.fc2\.(.+)", r"model.perceiver_resampler.blocks.\1.1.c_proj.\2"),
    (r"xattn\.(\d+)\.attn\.norm\.(.+)", r"model.gated_cross_attn_layers.\1.input_layernorm.\2"),
    (r"xattn\.(\d+)\.attn\.to_([qkv])\.(.+)", r"model.gated_cross_attn_layers.\1.cross_attn.\2_proj.\3"),
    (r"xattn\.(\d+)\.attn\.to_out\.(.+)", r"model.gated_cross_attn_layers.\1.cross_attn.o_proj.\2"),
    (r"xattn\.(\d+)\.attn\.([qk])_norm\.(.+)", r"model.gated_cross_attn_layers.\1.cross_attn.\2_layer_norm.\3"),
    (r"xattn\.(\d+)\.ff\.norm\.(.+)", r"model.gated_cross_attn_layers.\1.post_attention_layernorm.\2"),
    (r"xattn\.(\d+)\.ff\.(\w+_proj\..+)", r"model.gated_cross_attn_layers.\1.mlp.\2"),
    (r"xattn\.(\d+)\.attn_gate", r"model.gated_cross_attn_layers.\1.alpha_cross_attn"),
    (r"xattn\.(\d+)\.ff_gate", r"model.gated_cross_attn_layers.\1.alpha_dense"),
]
NAMES = [(re.compile(f"^{a}$"), b) for a, b in NAMES]
GATES = re.compile(r"^xattn\.\d+\.(attn|ff)_gate$")  # IDEFICS' vector alphas are [1, 1, d], furnace's [d]


def idefics_name(name: str) -> str:
    for pattern, repl in NAMES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    raise ValueError(f"{name} has no IDEFICS counterpart")


# ------------------------------------------------------------------ configs

def read_idefics_config(path) -> dict:
    """The folder's config as transformers reads it (its defaults filled in)."""
    from transformers import IdeficsConfig

    cfg = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    if cfg.get("model_type") != "idefics":
        raise ValueError(f"{str(path)!r} is not an IDEFICS checkpoint (config.json model_type "
                         f"{cfg.get('model_type')!r}, expected 'idefics')")
    return IdeficsConfig.from_pretrained(str(path), local_files_only=True).to_dict()


def model_config(hf: dict) -> tuple[ModelConfig, dict, dict]:
    """(furnace's ModelConfig, the decoder's Llama config.json, the tower's CLIPVisionConfig) of an
    IDEFICS config; one line for what furnace's Flamingo cannot express."""
    from transformers import CLIPVisionConfig

    if not hf.get("use_resampler"):
        raise ValueError("this IDEFICS checkpoint has use_resampler=false (xattn on the raw tower features); "
                         "furnace's Flamingo always resamples: only checkpoints with the Perceiver are supported")
    if hf.get("alpha_type", "float") not in ("float", "vector"):
        raise ValueError(f"unknown IDEFICS alpha_type {hf['alpha_type']!r}; expected float or vector")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    lm_hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": hf["vocab_size"],
             "hidden_size": width, "intermediate_size": hf["intermediate_size"],
             "num_hidden_layers": hf["num_hidden_layers"], "num_attention_heads": heads, "num_key_value_heads": heads,
             "max_position_embeddings": hf["max_position_embeddings"], "rms_norm_eps": hf["rms_norm_eps"],
             "rope_parameters": hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0},
             "tie_word_embeddings": hf.get("tie_word_embeddings", False), "hidden_act": hf["hidden_act"],
             "bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id"),
             "pad_token_id": hf.get("pad_token_id")}
    lm: LMConfig = llama.config_from_hf(lm_hf)
    v, p = hf["vision_config"], hf["perceiver_config"]
    vision_hf = CLIPVisionConfig(hidden_size=v["embed_dim"], image_size=v["image_size"], patch_size=v["patch_size"],
                                 intermediate_size=v["intermediate_size"], num_hidden_layers=v["num_hidden_layers"],
                                 num_attention_heads=v["num_attention_heads"], num_channels=v["num_channels"],
                                 hidden_act=v["hidden_act"], layer_norm_eps=v["layer_norm_eps"]).to_dict()
    mcfg = ModelConfig(
        lm=lm,
        vision=VisionConfig(kind="clip", image_size=v["image_size"], patch_size=v["patch_size"],
                            hidden_size=v["embed_dim"], intermediate_size=v["intermediate_size"],
                            num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"], features="hidden"),
        perceiver=PerceiverConfig(num_latents=p["resampler_n_latents"], depth=p["resampler_depth"],
                                  heads=p["resampler_n_heads"], dim_head=p["resampler_head_dim"], ff_mult=4,
                                  max_frames=1, frame_embeddings=False, qk_norm=bool(p["qk_layer_norms_perceiver"]),
                                  ff_act="relu"),
        xattn=XAttnConfig(every=hf["cross_layer_interval"], heads=heads, dim_head=width // heads, placement="first",
                          norm="rmsnorm", ff="swiglu", ff_hidden=hf["intermediate_size"],
                          qk_norm=bool(hf["qk_layer_norms"]), gate="vector" if hf["alpha_type"] == "vector" else "scalar",
                          reset_after_eos=True),
        freeze_lm=True, freeze_vision=True)
    return mcfg, lm_hf, vision_hf


def _token_ids(path, hf: dict, image_token_id: int | None) -> tuple[int, int]:
    """(<image>'s id, EOS's id): from the folder's tokenizer (its EOS is the one IDEFICS' processor
    resets the image attention at), or `image_token_id` and the config's EOS without one."""
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if image_token_id is None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{str(path)!r} has no tokenizer to find {IMAGE_TOKEN} in ({e}); pass image_token_id")
        image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id in (None, tok.unk_token_id):
            raise ValueError(f"the tokenizer in {str(path)!r} has no {IMAGE_TOKEN} token; pass image_token_id")
        eos = tok.eos_token_id if tok.eos_token_id is not None else eos
    return image_token_id, eos


def _meta(mcfg: ModelConfig, lm_hf: dict, vision_hf: dict, vocab_size: int, image_token_id: int, eos: int) -> dict:
    """What `flamingo_io.empty_flamingo` builds from. IDEFICS has no <|endofchunk|>: its documents
    end with EOS, which stands in for it."""
    return {"vocab_size": vocab_size, "image_token_id": image_token_id, "eoc_token_id": eos, "eos_token_id": eos,
            "lm_config": lm_hf, "vision_kind": "clip", "vision_config": vision_hf}


def _reader(reader: WeightReader, model: FlamingoModel, where: str):
    """read(furnace name) from an IDEFICS checkpoint, gates reshaped."""
    have = set(reader.names())

    def read(name: str) -> torch.Tensor:
        src = idefics_name(name)
        if src not in have:
            raise ValueError(f"{where} lacks {src} (furnace's {name}): not an IDEFICS checkpoint of this config")
        t = reader.read(src)
        return t.reshape(model.get_parameter(name).shape) if GATES.match(name) else t
    return read


# ------------------------------------------------------------------ in

def from_hf(path, *, image_token_id: int | None = None, dtype: torch.dtype | None = None) -> FlamingoModel:
    """A FlamingoModel with an IDEFICS folder's weights (safetensors), in their stored dtype
    unless `dtype`. `image_token_id`: <image>'s id, else read from the folder's tokenizer."""
    hf = read_idefics_config(path)
    mcfg, lm_hf, vision_hf = model_config(hf)
    image_id, eos = _token_ids(path, hf, image_token_id)
    model = empty_flamingo(_meta(mcfg, lm_hf, vision_hf, hf["vocab_size"] + hf["additional_vocab_size"],
                                 image_id, eos), mcfg)
    fill(model, _reader(WeightReader(path), model, str(path)), dtype=dtype, where=str(path))
    model.tie_weights()
    return model


def convert(path, out, *, image_token_id: int | None = None, max_shard_bytes: int = 5 * 2**30,
            progress: bool | None = None) -> Path:
    """An IDEFICS folder as OUT/flamingo, OUT/lm and OUT/vision, one tensor at a time (the
    process never holds the model). The folder's tokenizer, given furnace's special tokens, goes
    to OUT/lm and OUT/flamingo; tokens it adds (<|endofchunk|>) get new rows at the mean of the
    LM's embedding rows, as furnace starts every new token. `progress`: a tensor count on stderr
    (None: when it is a terminal)."""
    path, out = Path(path), Path(out)
    hf = read_idefics_config(path)
    mcfg, lm_hf, vision_hf = model_config(hf)
    tok = load_tokenizer(path)
    image_id, eos = _token_ids(path, hf, image_token_id)
    base, extra = hf["vocab_size"], hf["additional_vocab_size"]
    if len(tok) < base + extra:
        raise ValueError(f"the tokenizer in {str(path)!r} has {len(tok)} tokens, the checkpoint {base + extra} rows")
    meta = _meta(mcfg, lm_hf, vision_hf, len(tok), image_id, eos)
    meta["eos_token_id"] = tok.eos_token_id
    model = empty_flamingo(meta, mcfg)
    read = _reader(WeightReader(path), model, str(path))
    grow = len(tok) - base - extra  # new rows furnace's tokenizer added
    mean = read("lm.embed_tokens.weight").float().mean(0) if grow else None

    def full(name: str) -> torch.Tensor:
        if name.startswith("new_tokens.") and grow:
            have = read(name) if extra else torch.empty(0, mean.shape[0])
            return torch.cat([have, mean.to(have.dtype if extra else torch.float32).expand(grow, -1)])
        return read(name)

    (out / "flamingo").mkdir(parents=True, exist_ok=True)
    (out / "flamingo" / FLAMINGO_JSON).write_text(json.dumps(flamingo_meta(model, dataclasses.asdict(mcfg)), indent=2))
    tied = model.lm.cfg.tie_word_embeddings
    with (WeightWriter(out / "flamingo", max_shard_bytes=max_shard_bytes) as whole,
          WeightWriter(out / "lm", max_shard_bytes=max_shard_bytes) as lm,
          WeightWriter(out / "vision", max_shard_bytes=max_shard_bytes) as vision):
        names = [n for n, _ in model.named_parameters()]  # a tied head is listed once, as the embedding
        for name in tqdm(names, desc="import idefics", unit="tensor", file=sys.stderr,
                         disable=None if progress is None else not progress):
            t = full(name)
            whole.add(name, t)
            if name.startswith("lm."):
                lm.add(llama.hf_name(name.removeprefix("lm."), tied), t)
            elif name.startswith("vision.model."):
                vision.add(name.removeprefix("vision.model."), t)
    lm_cfg = llama.hf_config(model.lm)
    write_config(lm_cfg, out / "lm")
    write_config({**vision_hf, "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model"},
                 out / "vision")
    tok.save_pretrained(out / "lm")
    tok.save_pretrained(out / "flamingo")
    return out


# ------------------------------------------------------------------ out

def _expressible(model: FlamingoModel) -> None:
    """One line for a Flamingo IDEFICS cannot hold."""
    x, p, a = model.xattn[0], model.perceiver, model.lm.cfg
    ff = x.ff
    problems = [
        (not model.xattn_first, "model.xattn.placement=first"),
        (not hasattr(ff, "gate_proj"), "model.xattn.ff=swiglu"),
        (hasattr(ff, "gate_proj") and ff.gate_proj.out_features != a.intermediate_size,
         "model.xattn.ff_hidden = the LM's intermediate_size"),
        (not isinstance(x.attn.norm, type(model.lm.norm)), "model.xattn.norm=rmsnorm"),
        (x.attn.to_q.out_features != a.hidden_size or x.attn.dim_head != a.hidden_size // a.num_heads,
         "model.xattn.heads = the LM's heads and dim_head = its head size"),
        (p.frame_embs is not None, "model.perceiver.frame_embeddings=false"),
        (p.layers[0][1].act != "relu" or p.layers[0][1].fc1.out_features != 4 * p.latents.shape[1],
         "model.perceiver.ff_act=relu with ff_mult=4"),
        (a.num_kv_heads != a.num_heads or a.qkv_bias or a.o_bias or a.mlp_bias or a.attention_head_dim() * a.num_heads
         != a.hidden_size, "a Llama decoder without GQA or biases"),
        (model.vision.kind != "clip" or model.vision.features != "hidden", "a CLIP tower read as model.vision.features=hidden"),
    ]
    wrong = [fix for bad, fix in problems if bad]
    if wrong:
        raise ValueError(f"this Flamingo is not an IDEFICS model: IDEFICS needs {wrong[0]}")


def idefics_config(model: FlamingoModel) -> dict:
    """The IdeficsConfig (as a dict) of a Flamingo `_expressible` accepts."""
    a, v = model.lm.cfg, model.vision.model.config
    p, x = model.perceiver, model.xattn[0]
    att = p.layers[0][0] if len(p.layers) else None
    lm_hf = llama.hf_config(model.lm)
    return {
        "model_type": "idefics", "architectures": ["IdeficsForVisionText2Text"],
        "vocab_size": a.vocab_size, "additional_vocab_size": 0 if model.new_tokens is None else model.new_tokens.count,
        "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size, "num_hidden_layers": a.num_layers,
        "num_attention_heads": a.num_heads, "hidden_act": "silu", "rms_norm_eps": a.rms_norm_eps,
        "max_position_embeddings": a.max_position_embeddings, "rope_parameters": lm_hf["rope_parameters"],
        "tie_word_embeddings": a.tie_word_embeddings, "cross_layer_interval": model.xattn_every,
        "qk_layer_norms": x.attn.q_norm is not None, "alpha_type": "vector" if x.attn_gate.numel() > 1 else "float",
        "alpha_initializer": "zeros", "use_resampler": True, "eos_token_id": model.eos_token_id,
        "bos_token_id": lm_hf.get("bos_token_id"), "pad_token_id": lm_hf.get("pad_token_id", 0),
        "vision_config": {"embed_dim": v.hidden_size, "image_size": v.image_size, "patch_size": v.patch_size,
                          "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
                          "num_attention_heads": v.num_attention_heads, "num_channels": v.num_channels,
                          "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps},
        "perceiver_config": {"use_resampler": True, "resampler_n_latents": p.latents.shape[0],
                             "resampler_depth": len(p.layers),
                             "resampler_n_heads": att.to_q.out_features // att.dim_head if att else 1,
                             "resampler_head_dim": att.dim_head if att else 1,
                             "qk_layer_norms_perceiver": att is not None and att.q_norm is not None},
    }


def to_hf(model: FlamingoModel, path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """`model` as an IDEFICS folder (config.json + safetensors; LoRA adapters merged) that
    `IdeficsForVisionText2Text.from_pretrained` loads."""
    _expressible(model)
    state = merged_state_dict(model)
    # a tied head is listed once, as the embedding: transformers ties lm_head (and additional_fc) itself
    with WeightWriter(path, max_shard_bytes=max_shard_bytes) as w:
        for name, _ in model.named_parameters():
            if ".lora_" in name:
                continue
            t = state[name]
            w.add(idefics_name(name), t.reshape(1, 1, -1) if GATES.match(name) and t.numel() > 1 else t)
    cfg = idefics_config(model)
    cfg["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_config(cfg, path)
