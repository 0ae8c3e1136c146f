"""Validation: every key on its own (`RULES`), then the constraints between keys, for a given
number of ranks. Runs before any process group exists and fails with one line (ConfigError)
that names the key and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import typing
from dataclasses import dataclass

from furnace.config.loading import as_float, field_types, split_optional
from furnace.config.tree import FUSED_OPS, LORA_TARGETS, Config, ConfigError


@dataclass(frozen=True)
class Rule:
    """What one key accepts: `ok(value)` for a value of the declared type; the failure reads
    "<key> must be <need>; got <value>; e.g. --set <key>=<example>"."""
    ok: typing.Callable[[typing.Any], bool]
    need: str
    example: typing.Any


def _ge(n: int, example) -> Rule:
    return Rule(lambda v: v >= n, f">= {n}", example)


def _between(lo, hi, example, need: str | None = None) -> Rule:
    return Rule(lambda v: lo <= v <= hi, need or f"between {lo} and {hi}", example)


def _finite(example, *, gt: float | None = None, ge: float | None = None) -> Rule:
    need = "finite" + (f" and > {gt:g}" if gt is not None else f" and >= {ge:g}" if ge is not None else "")
    return Rule(lambda v: math.isfinite(v) and (gt is None or v > gt) and (ge is None or v >= ge), need, example)


def _one_of(*choices) -> Rule:
    words = [str(c) for c in choices]
    return Rule(lambda v: v in choices, f"{', '.join(words[:-1])} or {words[-1]}", choices[0])


def _nonempty(example) -> Rule:
    return Rule(lambda v: bool(v.strip()), "a non-empty string", example)


def _optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"none or {rule.need}", rule.example)


def split_sources(spec: str) -> list[str]:
    """The ';'-separated shard sources of data.train_shards / data.val_shards:
    'a-{0..9}.tar;b.tar' -> ['a-{0..9}.tar', 'b.tar']."""
    return [s.strip() for s in spec.split(";") if s.strip()]


def _weights(spec: str) -> list[float] | None:
    """data.train_weights "0.7,0.3" -> [0.7, 0.3]; None unless every weight is a finite number > 0."""
    out = [as_float(w) for w in spec.split(",")]
    return out if all(w is not None and math.isfinite(w) and w > 0 for w in out) else None


# Fault drills (debug.faults, run by furnace/training/faults.py): inf/nan poison a step's loss;
# die-* stop rank 0 at a point of a checkpoint save (files half written / written but not marked
# complete / marked complete but `latest` not moved).
FAULT_KINDS = ("inf", "nan", "die-write", "die-marker", "die-latest")
_FAULT = re.compile(rf"({'|'.join(FAULT_KINDS)})@([0-9]+)(?::([0-9]+))?")


def _fault_items(spec: str) -> list[re.Match | None]:
    return [_FAULT.fullmatch(x) for x in (x.strip() for x in spec.split(",")) if x]


def parse_faults(spec: str) -> list[tuple[str, int, int | None]]:
    """debug.faults -> [(kind, step, rank or None)]; ConfigError on a malformed item."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        m = _FAULT.fullmatch(item)
        if m is None:
            raise ConfigError(f"debug.faults: {item!r} is not kind@step[:rank] with kind {' | '.join(FAULT_KINDS)}")
        out.append((m[1], int(m[2]), None if m[3] is None else int(m[3])))
    return out


def _rope_scaling_ok(v: dict) -> bool:
    def num(x, lo=0.0):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > lo
    kind = v.get("rope_type", v.get("type", "default"))
    if kind == "default":
        return True
    if kind not in ("linear", "llama3") or not num(v.get("factor")):
        return False
    lo, hi = v.get("low_freq_factor"), v.get("high_freq_factor")
    return kind == "linear" or (num(lo) and num(hi) and hi > lo and num(v.get("original_max_position_embeddings"), 1))


_PATH = _optional(_nonempty("/path/to/local/hf_dir"))
_BOOL = Rule(lambda v: True, "true or false", "true")   # the type check is the whole rule
_POS = _ge(1, 1)

# One rule per key of the tree (tests/test_config_validation.py checks that none is missing).
# Cross-key constraints (divisibility, layouts, batch arithmetic) are in `validate` below.
RULES: dict[str, Rule] = {
    "model.lm.path": _PATH,
    "model.lm.vocab_size": _ge(0, 0),
    "model.lm.hidden_size": _ge(1, 256),
    "model.lm.intermediate_size": _ge(1, 704),
    "model.lm.num_layers": _ge(1, 4),
    "model.lm.num_heads": _ge(1, 8),
    "model.lm.num_kv_heads": _ge(1, 4),
    "model.lm.head_dim": _ge(0, 0),
    "model.lm.max_position_embeddings": _ge(1, 2048),
    "model.lm.rope_theta": _finite(10000.0, gt=0),
    "model.lm.rope_scaling": _optional(Rule(
        _rope_scaling_ok, "a mapping with rope_type default, linear (factor > 0) or llama3 (factor, "
        "low_freq_factor < high_freq_factor, original_max_position_embeddings)",
        "{rope_type: linear, factor: 2.0}")),
    "model.lm.rms_norm_eps": _finite(1e-5, gt=0),
    "model.lm.tie_word_embeddings": _BOOL,
    "model.lm.qkv_bias": _BOOL,
    "model.lm.o_bias": _BOOL,
    "model.lm.mlp_bias": _BOOL,
    "model.lm.sliding_window": _optional(_ge(1, 4096)),
    "model.lm.model_type": _one_of("llama", "mistral", "qwen2"),
    "model.vision.path": _PATH,
    "model.start_from": _optional(_nonempty("/path/to/exported/flamingo")),
    "model.vision.kind": _one_of("clip", "siglip"),
    "model.vision.image_size": _ge(1, 224),
    "model.vision.patch_size": _ge(1, 14),
    "model.vision.hidden_size": _ge(1, 128),
    "model.vision.intermediate_size": _ge(1, 512),
    "model.vision.num_layers": _ge(1, 2),
    "model.vision.num_heads": _ge(1, 4),
    "model.vision.sincos_positions": _BOOL,
    "model.vision.features": _one_of("hidden", "patches", "patches_normed"),
    "model.perceiver.num_latents": _ge(1, 64),
    "model.perceiver.depth": _ge(1, 6),
    "model.perceiver.heads": _ge(1, 8),
    "model.perceiver.dim_head": _ge(1, 64),
    "model.perceiver.ff_mult": _ge(1, 4),
    "model.perceiver.max_frames": _ge(1, 8),
    "model.perceiver.frame_embeddings": _BOOL,
    "model.perceiver.frame_init": _finite(0.02, ge=0),
    "model.perceiver.qk_norm": _BOOL,
    "model.perceiver.ff_act": _one_of("gelu", "relu"),
    "model.audio.kind": _one_of("none", "scratch", "whisper"),
    "model.audio.path": _optional(_nonempty("/path/to/local/whisper")),
    "model.audio.sample_rate": _ge(1, 16000),
    "model.audio.seconds": _finite(1.0, gt=0),
    "model.audio.num_mel_bins": _ge(1, 80),
    "model.audio.n_fft": _ge(2, 400),
    "model.audio.hop_length": _ge(1, 160),
    "model.audio.hidden_size": _ge(1, 64),
    "model.audio.intermediate_size": _ge(1, 256),
    "model.audio.num_layers": _ge(1, 2),
    "model.audio.num_heads": _ge(1, 4),
    "model.freeze_audio": _BOOL,
    "model.xattn.every": _ge(1, 4),
    "model.xattn.heads": _ge(1, 8),
    "model.xattn.dim_head": _ge(1, 64),
    "model.xattn.ff_mult": _ge(1, 4),
    "model.xattn.gate_init": _finite(0.0),
    "model.xattn.placement": _one_of("last", "first"),
    "model.xattn.norm": _one_of("layernorm", "rmsnorm"),
    "model.xattn.ff": _one_of("gelu", "swiglu"),
    "model.xattn.ff_hidden": _ge(0, 0),
    "model.xattn.qk_norm": _BOOL,
    "model.xattn.kernel": _one_of("general", "media"),
    "model.xattn.gate": _one_of("scalar", "vector"),
    "model.xattn.reset_after_eos": _BOOL,
    "model.lora.rank": _ge(0, 8),
    "model.lora.alpha": _finite(16.0, gt=0),
    "model.lora.dropout": Rule(lambda v: 0 <= v < 1, "at least 0 and below 1", 0.05),
    "model.lora.targets": Rule(lambda v: bool(v) and len(set(v)) == len(v) and set(v) <= set(LORA_TARGETS),
                               f"a non-empty list of distinct names from {', '.join(LORA_TARGETS)}", "q,k,v,o"),
    "model.contrastive.dim": _ge(0, 256),
    "model.contrastive.text_width": _ge(1, 256),
    "model.contrastive.temperature": _finite(0.07, gt=0),
    "model.freeze_lm": _BOOL,
    "model.freeze_vision": _BOOL,
    "model.activation_checkpointing": _BOOL,
    "model.attention_backend": _one_of("auto", "triton", "reference"),
    "model.compile": Rule(lambda v: v.strip() == "none" or (
        bool(v.strip()) and all(p.strip() in ("vision", "perceiver") for p in v.split(","))
        and len({p.strip() for p in v.split(",")}) == len(v.split(","))),
        "none, or a comma list of vision and perceiver", "vision,perceiver"),
    "model.fused_kernels": Rule(lambda v: v.strip() in ("none", "all") or (
        all(p.strip() in FUSED_OPS for p in v.split(",")) and len({p.strip() for p in v.split(",")}) == len(v.split(","))),
        f"none, all, or a comma list of distinct ops from {', '.join(FUSED_OPS)}", "rms_norm,swiglu"),
    "data.train_shards": Rule(lambda v: not v.strip() or bool(split_sources(v)),
                              "empty or ';'-separated shard patterns", "data/train-000000.tar"),
    "data.val_shards": Rule(lambda v: not v.strip() or bool(split_sources(v)), "empty or ';'-separated shard patterns",
                            "data/val-000000.tar"),
    "data.tokenizer": _PATH,
    "data.max_length": Rule(lambda v: v == 0 or v >= 4, "0 (read off the training data) or >= 4", 64),
    "data.max_images": _ge(1, 1),
    "data.video_frames": _ge(1, 4),
    "data.pack": _BOOL,
    "data.num_workers": _ge(0, 1),
    "data.canonical_streams": _ge(1, 64),
    "data.shuffle_buffer": _ge(0, 128),
    "data.synthetic_dir": _optional(_nonempty("data/demo")),
    "data.synthetic_n": _ge(1, 20000),
    "data.train_weights": _optional(Rule(lambda v: _weights(v) is not None,
                                         "a comma list of finite weights > 0, one per train source", "0.7,0.3")),
    "data.synthetic_seed": _ge(0, 0),
    "data.synthetic_image_size": _ge(8, 32),
    "data.synthetic_kind": _one_of("shapes", "video", "audio"),
    "data.max_member_bytes": _POS,
    "data.max_members_per_sample": _POS,
    "data.max_image_pixels": _POS,
    "data.max_shard_bytes": _POS,
    "data.max_video_frames": _POS,
    "data.max_audio_seconds": _finite(600.0, gt=0),
    "data.min_audio_seconds": _finite(0.05, ge=0),
    "parallel.tp": _ge(1, 1),
    "parallel.pp": _ge(1, 1),
    "parallel.zero_stage": _one_of(0, 1, 2, 3),
    "parallel.zero3_gather": _one_of("block", "module"),
    "parallel.offload_optimizer": _one_of("none", "cpu", "nvme"),
    "parallel.offload_params": _one_of("none", "cpu", "nvme"),
    "parallel.offload_nvme_path": _optional(_nonempty("/local_nvme/offload")),
    "parallel.layout": _one_of("manual", "auto"),
    "train.max_steps": _ge(1, 1000),
    "train.run_dir": _nonempty("runs/demo"),
    "train.save_every": _ge(0, 500),
    "train.eval_every": _ge(0, 250),
    "train.log_every": _ge(1, 10),
    "train.seed": _between(0, 2**63 - 1, 1234, "between 0 and 2**63-1"),
    "train.global_batch_size": _ge(1, 32),
    "train.micro_batch_size": _ge(1, 8),
    "train.precision": _one_of("bf16", "fp16", "fp32"),
    "train.lr": _finite(1e-3, ge=0),
    "train.min_lr_ratio": _between(0.0, 1.0, 0.1, "between 0 and 1"),
    "train.warmup_steps": _ge(0, 50),
    "train.lr_decay_steps": _ge(0, 0),
    "train.keep_checkpoints": _ge(1, 2),
    "train.weight_decay": _finite(0.0, ge=0),
    "train.grad_clip": _finite(1.0, ge=0),
    "train.contrastive_weight": _finite(0.0, ge=0),
    "train.fused_loss_scaling": _BOOL,
    "train.allow_config_change": _BOOL,
    "train.dist_timeout_minutes": _finite(30.0, gt=0),
    "debug.log_gate_grads": _BOOL,
    "debug.faults": Rule(lambda v: all(_fault_items(v)),
                         f"a comma list of kind@step[:rank] with kind {' | '.join(FAULT_KINDS)}", "nan@2:1"),
}

# The audio resampler's keys take the image resampler's rules.
RULES.update({k.replace("model.perceiver.", "model.audio_perceiver.", 1): r for k, r in list(RULES.items())
              if k.startswith("model.perceiver.")})

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
               list: "a list of names"}


def _type_ok(v, tp) -> bool:
    tp, optional = split_optional(tp)
    if v is None:
        return optional
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if typing.get_origin(tp) is list:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    return isinstance(v, tp) if isinstance(tp, type) else True


def config_keys(section=None, prefix: str = "") -> typing.Iterator[tuple[str, typing.Any, typing.Any, typing.Any]]:
    """(dotted key, section object, field name, declared type) for every leaf of the tree."""
    section = Config() if section is None else section
    hints = field_types(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from config_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", section, f.name, hints[f.name]


def _fail(key: str, value, need: str, example) -> typing.NoReturn:
    raise ConfigError(f"{key} must be {need}; got {value!r}; e.g. --set {shlex.quote(f'{key}={example}')}")


def _skipped(cfg: Config, key: str) -> bool:
    """Shape keys a pretrained checkpoint replaces (its own config.json decides them)."""
    return ((key.startswith("model.lm.") and key != "model.lm.path" and cfg.model.lm.path is not None)
            or (key.startswith("model.vision.") and key not in ("model.vision.path", "model.vision.features")
                and cfg.model.vision.path is not None)
            or (key.startswith("model.audio.") and key not in ("model.audio.path", "model.audio.kind")
                and cfg.model.audio.path is not None))


def check_keys(cfg: Config) -> None:
    """Every key on its own: its declared type, then its rule in RULES."""
    for key, section, name, tp in config_keys(cfg):
        value = getattr(section, name)
        rule = RULES[key]
        if not _type_ok(value, tp):
            inner, optional = split_optional(tp)
            word = _TYPE_WORDS.get(typing.get_origin(inner) or inner, getattr(inner, "__name__", str(inner)))
            _fail(key, value, ("none or " if optional else "") + word, rule.example)
        if not _skipped(cfg, key) and not rule.ok(value):
            _fail(key, value, rule.need, rule.example)


def _check_model(cfg: Config) -> None:
    m, lm, vis, data = cfg.model, cfg.model.lm, cfg.model.vision, cfg.data
    if lm.path is None:  # num_kv_heads, num_heads >= 1 are checked already: the modulos are safe
        if lm.num_heads % lm.num_kv_heads:
            raise ConfigError(f"model.lm.num_kv_heads must divide model.lm.num_heads={lm.num_heads}; got "
                              f"{lm.num_kv_heads}; e.g. --set model.lm.num_kv_heads="
                              f"{math.gcd(lm.num_heads, lm.num_kv_heads)}")
        if lm.head_dim == 0 and lm.hidden_size % lm.num_heads:
            raise ConfigError(f"model.lm.hidden_size={lm.hidden_size} must be a multiple of model.lm.num_heads="
                              f"{lm.num_heads} when model.lm.head_dim=0; e.g. --set model.lm.hidden_size="
                              f"{-(-lm.hidden_size // (2 * lm.num_heads)) * 2 * lm.num_heads}, "
                              "or set model.lm.head_dim")
        if lm.attention_head_dim() % 2:
            d = lm.attention_head_dim()
            raise ConfigError(f"model.lm.head_dim must be even (RoPE rotates pairs); got {d}"
                              f"{' (hidden_size // num_heads)' if lm.head_dim == 0 else ''}; "
                              f"e.g. --set model.lm.head_dim={d + 1}")
        if cfg.model.xattn.every > lm.num_layers:
            raise ConfigError(f"model.xattn.every={cfg.model.xattn.every} exceeds model.lm.num_layers="
                              f"{lm.num_layers}: no layer would get a cross-attention block; "
                              f"e.g. --set model.xattn.every={lm.num_layers}")
        if lm.sliding_window is not None and lm.sliding_window < data.max_length:
            raise ConfigError(f"model.lm.sliding_window={lm.sliding_window} is shorter than data.max_length="
                              f"{data.max_length}; e.g. --set data.max_length={lm.sliding_window}")
    if cfg.train.contrastive_weight > 0 and m.contrastive.dim == 0:
        raise ConfigError(f"train.contrastive_weight={cfg.train.contrastive_weight} weighs a contrastive loss the model "
                          "has no heads for: set --set model.contrastive.dim=256 (or train.contrastive_weight=0)")
    if m.contrastive.dim and not cfg.train.contrastive_weight:
        raise ConfigError(f"model.contrastive.dim={m.contrastive.dim} adds heads that only train.contrastive_weight > 0 "
                          "trains: set --set train.contrastive_weight=0.1 (or model.contrastive.dim=0)")
    if cfg.train.contrastive_weight > 0 and data.pack:
        raise ConfigError("train.contrastive_weight > 0 pairs each row's text with its images, one sample a row; "
                          "set --set data.pack=false")
    if m.lora.rank > 0 and not m.freeze_lm:
        # The adapters add a low-rank update to a frozen LM; a trained LM needs none (and would
        # learn the same update twice).
        raise ConfigError(f"model.lora.rank={m.lora.rank} adapts a frozen LM but model.freeze_lm=false trains the "
                          "whole LM: set --set model.freeze_lm=true (with model.lm.path), or model.lora.rank=0")
    _check_audio(cfg)
    if vis.path is None:
        if vis.features != "hidden" and vis.kind != "clip":
            raise ConfigError(f"model.vision.features={vis.features} drops CLIP's class token but model.vision.kind="
                              f"{vis.kind} has none: --set model.vision.features=hidden")
        if vis.image_size % vis.patch_size:
            raise ConfigError(f"model.vision.image_size={vis.image_size} must be a multiple of model.vision.patch_size="
                              f"{vis.patch_size}; e.g. --set model.vision.image_size="
                              f"{max(1, vis.image_size // vis.patch_size) * vis.patch_size}")
        if vis.hidden_size % vis.num_heads:
            raise ConfigError(f"model.vision.hidden_size={vis.hidden_size} must be a multiple of "
                              f"model.vision.num_heads={vis.num_heads}; e.g. --set model.vision.hidden_size="
                              f"{-(-vis.hidden_size // vis.num_heads) * vis.num_heads}")


def _check_audio(cfg: Config) -> None:
    a, m = cfg.model.audio, cfg.model
    if a.kind == "whisper" and a.path is None:
        raise ConfigError("model.audio.kind=whisper reads a local HF Whisper folder: set --set model.audio.path=/path/to/whisper "
                          "(or model.audio.kind=scratch for a tower trained from scratch)")
    if a.kind != "whisper" and a.path is not None:
        raise ConfigError(f"model.audio.path={a.path!r} is read only with model.audio.kind=whisper; set --set "
                          "model.audio.kind=whisper (or model.audio.path=none)")
    if a.kind == "none":
        return
    if m.audio_perceiver.num_latents != m.perceiver.num_latents:
        raise ConfigError(f"model.audio_perceiver.num_latents={m.audio_perceiver.num_latents} must equal "
                          f"model.perceiver.num_latents={m.perceiver.num_latents} (every medium gives the xattn blocks "
                          f"the same latents); e.g. --set model.audio_perceiver.num_latents={m.perceiver.num_latents}")
    if a.kind == "scratch" and (a.hidden_size % a.num_heads or a.hidden_size % 2):
        step = 2 * a.num_heads // math.gcd(2, a.num_heads)
        raise ConfigError(f"model.audio.hidden_size={a.hidden_size} must be even (sinusoidal positions) and a multiple of "
                          f"model.audio.num_heads={a.num_heads}; e.g. --set model.audio.hidden_size="
                          f"{-(-a.hidden_size // step) * step}")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if d.video_frames > cfg.model.perceiver.max_frames:
        raise ConfigError(f"data.video_frames={d.video_frames} exceeds model.perceiver.max_frames="
                          f"{cfg.model.perceiver.max_frames} (the resampler's frame embeddings); e.g. --set "
                          f"model.perceiver.max_frames={d.video_frames}, or a smaller data.video_frames")
    if d.video_frames > d.max_video_frames:
        raise ConfigError(f"data.video_frames={d.video_frames} exceeds data.max_video_frames={d.max_video_frames}: "
                          f"no clip could be read; e.g. --set data.max_video_frames={max(1024, d.video_frames)}")
    if d.synthetic_kind == "video" and d.synthetic_image_size % 2:
        raise ConfigError(f"data.synthetic_image_size={d.synthetic_image_size} must be even for data.synthetic_kind=video "
                          f"(4:2:0 H.264); e.g. --set data.synthetic_image_size={d.synthetic_image_size + 1}")
    if d.min_audio_seconds > d.max_audio_seconds:
        raise ConfigError(f"data.min_audio_seconds={d.min_audio_seconds} exceeds data.max_audio_seconds="
                          f"{d.max_audio_seconds}: no clip could be read; e.g. --set data.min_audio_seconds=0.05")
    if d.synthetic_kind == "audio" and cfg.model.audio.kind == "none":
        raise ConfigError("data.synthetic_kind=audio draws audio clips, which a model without an audio tower cannot "
                          "read: set --set model.audio.kind=scratch (or use --config demo-audio)")
    if d.train_weights is not None:
        n, sources = len(_weights(d.train_weights)), len(split_sources(d.train_shards))
        if n != sources:
            raise ConfigError(f"data.train_weights={d.train_weights!r} has {n} weights for {sources} ';'-separated "
                              f"data.train_shards sources; give one per source, e.g. --set data.train_weights="
                              f"{','.join(['1'] * sources)}")


def _check_offload(p) -> None:
    if p.offload_optimizer != "none" and p.zero_stage == 0:
        raise ConfigError(f"parallel.offload_optimizer={p.offload_optimizer} needs parallel.zero_stage 1, 2 or 3 "
                          "(ZeRO-Offload moves ZeRO's optimizer partitions); set --set parallel.zero_stage=1")
    if p.offload_params != "none" and p.zero_stage != 3:
        raise ConfigError(f"parallel.offload_params={p.offload_params} needs parallel.zero_stage=3 (only ZeRO-3 "
                          "partitions the parameters); set --set parallel.zero_stage=3 or parallel.offload_params=none")
    if "nvme" in (p.offload_optimizer, p.offload_params):
        if not p.offload_nvme_path:
            raise ConfigError("parallel.offload_optimizer/offload_params=nvme needs parallel.offload_nvme_path, a "
                              "folder on a local NVMe drive; e.g. --set parallel.offload_nvme_path=/local_nvme/offload")
        from deepspeed.ops.op_builder import AsyncIOBuilder  # lazy: DeepSpeed is heavy to import
        if not AsyncIOBuilder().is_compatible(verbose=False):
            raise ConfigError("parallel.offload_*=nvme needs DeepSpeed's async_io op, which cannot build here: "
                              "install libaio (apt install libaio-dev) or offload to cpu")


def _check_layout(cfg: Config, world_size: int) -> int:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1; got {world_size}; start at least one rank")
    # Two layouts: A = ZeRO-3 x TP x DP (pp = 1), B = ZeRO-1 x TP x PP x DP. (Plain data
    # parallelism, tp = pp = 1, also accepts ZeRO-0/1/2 for ablations.)
    if p.pp > 1 and p.zero_stage != 1:
        raise ConfigError(
            f"parallel.pp={p.pp} is layout B (ZeRO-1 x TP x PP x DP) and needs parallel.zero_stage=1 (DeepSpeed's "
            f"pipeline engine refuses ZeRO-2/3); set --set parallel.zero_stage=1 or parallel.pp=1")
    if p.pp == 1 and p.tp > 1 and p.zero_stage != 3:
        raise ConfigError(
            f"parallel.tp={p.tp} with parallel.pp=1 is layout A (ZeRO-3 x TP x DP) and needs parallel.zero_stage=3; "
            "set --set parallel.zero_stage=3, or parallel.pp>1 with zero_stage=1 for layout B")
    if world_size % (p.tp * p.pp) != 0:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp = {p.tp * p.pp}; "
                          "change tp/pp (--set parallel.tp=..., parallel.pp=...) or the number of ranks")
    dp = world_size // (p.tp * p.pp)
    if m.lm.path is None:
        if m.lm.num_heads % p.tp or m.lm.num_kv_heads % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide model.lm.num_heads={m.lm.num_heads} and "
                              f"model.lm.num_kv_heads={m.lm.num_kv_heads}; pick a tp that divides both")
        if m.lm.intermediate_size % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide model.lm.intermediate_size={m.lm.intermediate_size}; "
                              "pick a tp that divides it")
        if p.pp > m.lm.num_layers:
            raise ConfigError(f"parallel.pp={p.pp} exceeds model.lm.num_layers={m.lm.num_layers}; use at most one "
                              f"pipeline stage per decoder layer, e.g. --set parallel.pp={m.lm.num_layers}")
    if m.xattn.heads % p.tp or m.perceiver.heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide model.xattn.heads={m.xattn.heads} and "
                          f"model.perceiver.heads={m.perceiver.heads}; pick a tp that divides both")
    if m.audio.kind != "none" and m.audio_perceiver.heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide model.audio_perceiver.heads={m.audio_perceiver.heads}; "
                          "pick a tp that divides it")
    if m.xattn.ff_hidden % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide model.xattn.ff_hidden={m.xattn.ff_hidden}; pick a tp "
                          "that divides it")
    if t.global_batch_size % (t.micro_batch_size * dp) != 0:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel size ({dp}); e.g. --set train.global_batch_size="
            f"{max(1, round(t.global_batch_size / (t.micro_batch_size * dp))) * t.micro_batch_size * dp}")
    _check_offload(p)
    if cfg.data.canonical_streams % dp:
        raise ConfigError(
            f"data.canonical_streams={cfg.data.canonical_streams} is not a multiple of the data-parallel size {dp}: "
            f"set --set data.canonical_streams={cfg.data.canonical_streams * dp // math.gcd(cfg.data.canonical_streams, dp)} "
            "(the sample order changes with it) or use a data-parallel size that divides it")
    for match in _fault_items(cfg.debug.faults):
        if match and match[3] is not None and int(match[3]) >= world_size:
            raise ConfigError(f"debug.faults={cfg.debug.faults!r}: rank {match[3]} of {match[0]!r} does not exist "
                              f"in a world of {world_size}; e.g. --set debug.faults={match[1]}@{match[2]}:0")
    return dp


def validate(cfg: Config, world_size: int, *, check_paths: bool = True) -> int:
    """Check the whole tree for `world_size` ranks; returns the data-parallel size. Runs before
    any process group exists: every key on its own (RULES), then the constraints between keys."""
    check_keys(cfg)
    _check_model(cfg)
    _check_data(cfg)
    dp = _check_layout(cfg, world_size)
    if cfg.model.attention_backend == "triton":
        try:  # lazy: Triton is an optional, Linux-only dependency
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as e:
            raise ConfigError(f"model.attention_backend=triton but Triton cannot be imported ({type(e).__name__}: "
                              f"{e}); install triton, or --set model.attention_backend=auto") from None
    if check_paths:
        for key, path in (("model.lm.path", cfg.model.lm.path), ("model.vision.path", cfg.model.vision.path),
                          ("model.audio.path", cfg.model.audio.path), ("data.tokenizer", cfg.data.tokenizer)):
            if path is not None and not os.path.isdir(path):
                raise ConfigError(f"{key}={path!r} is not a directory; it must point at a local HF checkpoint "
                                  f"(nothing is downloaded), e.g. --set {key}=/path/to/local/hf_dir")
        start = cfg.model.start_from
        if start is not None and not (os.path.isfile(os.path.join(start, "flamingo.json")) or os.path.isfile(start)):
            raise ConfigError(f"model.start_from={start!r} is neither a furnace export folder (with flamingo.json) nor "
                              "an open_flamingo checkpoint.pt file; e.g. --set model.start_from=exported/flamingo")
        _check_pretrained(cfg)
    return dp


LM_TYPES = ("llama", "mistral", "qwen2")
VISION_TYPES = ("clip", "siglip")


def _hf_config(key: str, path: str) -> dict:
    f = os.path.join(path, "config.json")
    try:
        with open(f) as fh:
            out = json.load(fh)
    except OSError:
        raise ConfigError(f"{key}={path!r} holds no config.json: point it at a local HF checkpoint folder") from None
    except ValueError:
        raise ConfigError(f"{key}={path!r}: its config.json is not valid JSON; re-export the checkpoint") from None
    if not isinstance(out, dict):
        raise ConfigError(f"{key}={path!r}: its config.json is not an object; re-export the checkpoint")
    return out


def _check_pretrained(cfg: Config) -> None:
    """What a pretrained checkpoint's own config.json decides, checked against this run before
    anything is loaded: its architecture, and tp / pp / xattn placement against its heads and layers."""
    m, p = cfg.model, cfg.parallel
    if m.lm.path is not None:
        hf = _hf_config("model.lm.path", m.lm.path)
        kind = hf.get("model_type")
        if kind not in LM_TYPES:
            raise ConfigError(f"model.lm.path={m.lm.path!r} is a {kind!r} checkpoint; furnace's decoder is "
                              f"{', '.join(LM_TYPES)}: point model.lm.path at one of those")
        heads, layers = hf.get("num_attention_heads", 0), hf.get("num_hidden_layers", 0)
        kv = hf.get("num_key_value_heads") or heads
        if heads % p.tp or kv % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide the checkpoint's num_attention_heads={heads} and "
                              f"num_key_value_heads={kv} (model.lm.path={m.lm.path!r}); pick a tp that divides both")
        if hf.get("intermediate_size", 0) % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide the checkpoint's intermediate_size="
                              f"{hf.get('intermediate_size')} (model.lm.path); pick a tp that divides it")
        if p.pp > layers:
            raise ConfigError(f"parallel.pp={p.pp} exceeds the checkpoint's {layers} layers (model.lm.path); "
                              f"e.g. --set parallel.pp={layers}")
        if m.xattn.every > layers:
            raise ConfigError(f"model.xattn.every={m.xattn.every} places no xattn block in the checkpoint's {layers} "
                              f"layers (model.lm.path); e.g. --set model.xattn.every={layers}")
    if m.vision.path is not None:
        if os.path.isfile(os.path.join(m.vision.path, "open_clip_config.json")) and \
                not os.path.isfile(os.path.join(m.vision.path, "config.json")):
            kind = "clip"  # an open_clip ViT, read as an HF CLIP tower (furnace.model.open_clip_io)
        else:
            hf = _hf_config("model.vision.path", m.vision.path)
            kind = str(hf.get("model_type") or (hf.get("vision_config") or {}).get("model_type") or "")
        if not kind.startswith(VISION_TYPES):
            raise ConfigError(f"model.vision.path={m.vision.path!r} is a {kind!r} checkpoint; furnace's towers are "
                              "CLIP and SigLIP vision models (or open_clip ViTs): point model.vision.path at one of those")
        if m.vision.features != "hidden" and not kind.startswith("clip"):
            raise ConfigError(f"model.vision.features={m.vision.features} drops CLIP's class token but "
                              f"model.vision.path={m.vision.path!r} is a {kind} tower: --set model.vision.features=hidden")
    if m.audio.path is not None:
        hf = _hf_config("model.audio.path", m.audio.path)
        if hf.get("model_type") != "whisper":
            raise ConfigError(f"model.audio.path={m.audio.path!r} is a {hf.get('model_type')!r} checkpoint; furnace's audio "
                              "tower is a Whisper encoder: point model.audio.path at a local HF Whisper folder")


def check_trainable(cfg: Config) -> None:
    """A training run (not a benchmark, which measures a preset's shapes as they are) must
    not freeze a part it builds with random weights: that part would never learn. (A furnace
    export in model.start_from gives the parts the run names no path for: those are trained.)"""
    m = cfg.model
    if m.start_from is not None and os.path.isfile(os.path.join(m.start_from, "flamingo.json")):
        return
    if m.audio.kind == "scratch" and m.freeze_audio:
        raise ConfigError("model.freeze_audio=true with model.audio.kind=scratch would train around a frozen random audio "
                          "tower: --set model.freeze_audio=false (or model.audio.kind=whisper with model.audio.path)")
    for part, frozen, path in (("lm", m.freeze_lm, m.lm.path), ("vision", m.freeze_vision, m.vision.path)):
        if frozen and path is None:
            raise ConfigError(f"model.freeze_{part}=true with no model.{part}.path would train around a frozen random "
                              f"{'LM' if part == 'lm' else 'vision tower'}: set model.{part}.path to a local HF "
                              f"checkpoint, or --set model.freeze_{part}=false to train it from scratch")


def gradient_accumulation_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
