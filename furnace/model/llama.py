"""Decoder for the Llama family (Llama 2/3, Mistral, Qwen2): RMSNorm, RoPE, GQA, SwiGLU.

Parameter names match HF's `*ForCausalLM` minus the `model.` prefix, so import and export are
a key rename. Layers take their `LMConfig` and are stateless: positions, segments and the KV
cache arrive through forward. Attention goes through `furnace_kernels.attention`.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from furnace.config import LMConfig
from furnace.tokens import positions
from furnace_kernels import attention, rope_

from .hf_io import load_weights, read_config, save_weights, write_config
from .layers import RMSNorm, merge_heads, run_block, split_heads, swiglu
from .lora import merged_state_dict

SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


# ---------------------------------------------------------------------------- RoPE

def rope_inv_freq(cfg: LMConfig) -> torch.Tensor:
    d = cfg.attention_head_dim()
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_len / lo, inv / factor, torch.where(wavelen < old_len / hi, inv, blended))
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B, 1, L, D] for positions [B, L], computed in fp32."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :].float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------- layers

class KVCache:
    """Keys/values of one layer for cached decoding; owned by the caller, passed to forward."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class SelfAttention(nn.Module):
    fused: frozenset = frozenset()  # model.fused_kernels (furnace/model/fused.py)

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.head_dim = d = cfg.attention_head_dim()
        self.sliding_window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, segment_ids=None, kv_segment_ids=None, cache: KVCache | None = None):
        q = split_heads(self.q_proj(x), self.head_dim)
        k = split_heads(self.k_proj(x), self.head_dim)
        if "rope" in self.fused:  # in place: the projections' outputs, which their backward does not read
            q, k = rope_(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = split_heads(self.v_proj(x), self.head_dim)
        if cache is not None:
            k, v = cache.extend(k, v)
        if self.sliding_window is not None and k.shape[2] > self.sliding_window:
            raise ValueError(f"sequence of {k.shape[2]} tokens exceeds this model's sliding_window "
                             f"({self.sliding_window}); use sequences up to that length")
        if segment_ids is not None and kv_segment_ids is None:
            kv_segment_ids = segment_ids
        out = attention(q, k, v, causal=True, q_segment=segment_ids, kv_segment=kv_segment_ids)
        return self.o_proj(merge_heads(out))


class SwiGLU(nn.Module):
    fused: frozenset = frozenset()  # model.fused_kernels (furnace/model/fused.py)

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.fused))


class DecoderLayer(nn.Module):
    fused: frozenset = frozenset()  # model.fused_kernels (furnace/model/fused.py)

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, h, cos, sin, segment_ids=None, kv_segment_ids=None, cache=None):
        a = self.self_attn(self.input_layernorm(h), cos, sin, segment_ids, kv_segment_ids, cache)
        if "add_rms_norm" in self.fused:
            h, x = self.post_attention_layernorm(a, residual=h)
            return h + self.mlp(x)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(nn.Module):
    """`module(input_ids) -> logits [B, L, V]`. Flamingo drives `embed_tokens`, `layers` and
    `lm_head` itself so it can interleave its cross-attention blocks.

    `cfg.vocab_size` must be resolved (> 0). `hf_config` is the config.json this decoder was
    imported from, if any: export writes it back with what changed."""

    def __init__(self, cfg: LMConfig, hf_config: dict | None = None):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("LMConfig.vocab_size must be set (> 0) to build a decoder")
        self.cfg = cfg
        self.hf_config = dict(hf_config or {})
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Always a module, tied or not: ZeRO-3 gathers a parameter only inside its owner's forward,
        # so the head must run as a module call even when it shares the embedding's weight.
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.activation_checkpointing = False

    def reset_parameters(self, std: float = 0.02) -> None:
        init_weights(self, std)

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(self.inv_freq, position_ids, dtype)

    def forward(self, input_ids, position_ids=None, segment_ids=None):
        """Logits for input_ids [B, L]. `segment_ids` [B, L] restricts attention to equal ids
        (packed documents, or left padding with 0 for pads)."""
        h = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = positions(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        for layer in self.layers:
            h = run_block(self, layer, h, cos, sin, segment_ids, None)
        return self.lm_head(self.norm(h))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """A fresh decoder's weights, module by module in `module.modules()` order: N(0, std) matrices
    and embeddings, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)


# ---------------------------------------------------------------------------- HF import / export

def config_from_hf(cfg: dict, path: str | None = None) -> LMConfig:
    """The LMConfig of an HF config.json (Llama / Mistral / Qwen2); one clear error otherwise."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        archs = cfg.get("architectures") or [mt]
        raise ValueError(f"unsupported architecture {archs[0]!r}; supported: {', '.join(SUPPORTED.values())}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; the Llama family uses silu")
    rp = cfg.get("rope_parameters")
    if rp:  # transformers >= 5
        theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = None if rp.get("rope_type", "default") == "default" else dict(rp)
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {kind!r}; supported: {', '.join(ROPE_TYPES)}")
        if kind == "default":
            scaling = None
    window = cfg.get("sliding_window")
    if mt == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    bias = bool(cfg.get("attention_bias", False))
    return LMConfig(
        path=None if path is None else str(path),
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or 0,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=True if mt == "qwen2" else bias,
        o_bias=False if mt == "qwen2" else bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=window,
        model_type=mt,
    )


def hf_config(lm: Llama) -> dict:
    """The config.json to write: the imported one updated with what may have changed."""
    a = lm.cfg
    cfg = dict(lm.hf_config) if lm.hf_config else {
        "model_type": a.model_type,
        "hidden_act": "silu",
        "rope_parameters": {"rope_theta": a.rope_theta, "rope_type": "default", **(a.rope_scaling or {})},
        "attention_bias": a.qkv_bias,
        "mlp_bias": a.mlp_bias,
        "max_position_embeddings": a.max_position_embeddings,
    }
    cfg.update(
        architectures=[SUPPORTED[a.model_type]], model_type=a.model_type, vocab_size=a.vocab_size,
        hidden_size=a.hidden_size, intermediate_size=a.intermediate_size, num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads, head_dim=a.attention_head_dim(),
        rms_norm_eps=a.rms_norm_eps, tie_word_embeddings=a.tie_word_embeddings,
    )
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    return cfg


def skeleton(cfg: LMConfig, hf_config: dict | None = None) -> Llama:
    """A decoder of `cfg`'s shape on the meta device: no weights, nothing drawn from the RNG
    (`furnace.parallel.materialize` or `furnace.model.empty` fill it in)."""
    with torch.device("meta"):
        model = Llama(cfg, hf_config=hf_config)
    model.inv_freq = rope_inv_freq(cfg)  # non-persistent buffer: rebuild it off the meta device
    return model


def skeleton_from_hf(path) -> Llama:
    """The decoder a local HF checkpoint folder describes, as a `skeleton`."""
    raw = read_config(path)
    return skeleton(config_from_hf(raw, path), raw)


def hf_name(name: str, tied: bool) -> str:
    """The HF checkpoint key of a decoder parameter (a tied head is stored as the embedding)."""
    if name == "lm_head.weight":
        return "model.embed_tokens.weight" if tied else name
    return f"model.{name}"


def from_hf(path, dtype: torch.dtype = torch.float32) -> Llama:
    """Load a local HF Llama/Mistral/Qwen2 checkpoint folder (config.json + safetensors) whole."""
    model = skeleton_from_hf(path)
    state = {k.removeprefix("model."): v.to(dtype) for k, v in load_weights(path).items()}
    if model.cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter with two
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not match a {model.cfg.model_type} decoder: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in merged_state_dict(model).items():  # LoRA folded in: HF's plain decoder
        if k == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue  # HF stores a tied head once, as the embedding
        out[k if k.startswith("lm_head.") else f"model.{k}"] = v
    return out


def to_hf(model: Llama, path, *, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as a HF checkpoint folder that transformers' AutoModelForCausalLM loads."""
    state = hf_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    cfg = hf_config(model)
    cfg["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    write_config(cfg, path)
    save_weights(state, path, max_shard_bytes=max_shard_bytes)


def pieces(model: Llama) -> list[tuple[str, nn.Module]]:
    """The decoder in the pieces it is drawn (and filled) in, in module order."""
    return ([("embed_tokens", model.embed_tokens)] + [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
            + [("norm", model.norm), ("lm_head", model.lm_head)])


def _real(piece: nn.Module) -> nn.Module:
    """An uninitialised copy of a meta piece on the default device (meta itself under the planner's
    `torch.device("meta")`)."""
    return copy.deepcopy(piece).to_empty(device=torch.get_default_device())


def whole(name: str, piece: nn.Module) -> nn.Module:
    """The `drawn` hook that keeps every piece as drawn."""
    return piece


def draw(cfg: LMConfig, drawn=whole) -> tuple[Llama, torch.Tensor]:
    """A decoder with fresh weights, bit for bit those of `Llama(cfg)` then `reset_parameters()`,
    drawn one piece at a time (`pieces`): each is handed to `drawn(name, piece)` as soon as its
    weights are final, and what that returns takes its place (a parallel build keeps its share).
    Returns (decoder, the mean of its embedding rows in fp32, where new tokens start)."""
    model = skeleton(cfg)
    parts = pieces(model)
    # Llama(cfg)'s constructor draws torch's own init of every linear and embedding, which
    # reset_parameters then draws over: replay those draws, one piece at a time, for the RNG stream.
    for _, piece in parts:
        for m in _real(piece).modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()
    tied = cfg.tie_word_embeddings
    mean = None
    for name, piece in parts:
        real = _real(piece)
        init_weights(real)
        if name == "embed_tokens" and tied:
            continue  # the tied head's draw below overwrites these rows
        if name == "lm_head" and tied:
            embed = copy.deepcopy(model.embed_tokens)
            embed.weight = real.weight
            mean = real.weight.detach().float().mean(0)
            model.set_submodule("embed_tokens", drawn("embed_tokens", embed))
        elif name == "embed_tokens":
            mean = real.weight.detach().float().mean(0)
        model.set_submodule(name, drawn(name, real))
    model.tie_weights()
    return model, mean


def from_config(cfg: LMConfig) -> Llama:
    """A decoder with fresh weights (N(0, 0.02) matrices, unit norms)."""
    return draw(cfg)[0]
