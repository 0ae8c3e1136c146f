"""One typed config tree: model, data, parallel, train, debug.

Sources, later wins: dataclass defaults < preset or YAML file < `--set a.b=value` overrides.
`validate(cfg, world_size)` fails early with one line (ConfigError) that names the fix.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """An invalid configuration; the message is one line that names the fix."""


@dataclass
class LMConfig:
    """The Llama-family decoder. With `path`, the checkpoint's own config.json replaces every
    shape field below (`furnace.model.llama.from_hf`)."""
    path: str | None = None            # local HF checkpoint dir (Llama / Mistral / Qwen2); None = from scratch
    vocab_size: int = 0                # from scratch: 0 = size of the tokenizer
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 0                  # 0 = hidden_size // num_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "linear" | "llama3", ...} as in HF configs
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    qkv_bias: bool = False             # Qwen2
    o_bias: bool = False               # Llama's attention_bias sets qkv_bias and o_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: longer sequences are refused
    model_type: str = "llama"          # llama | mistral | qwen2: the architecture export writes

    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class VisionConfig:
    path: str | None = None            # local HF CLIP/SigLIP dir; None = from scratch (below)
    kind: str = "clip"                 # clip | siglip (from scratch)
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    sincos_positions: bool = True      # from scratch: start the position rows at a 2-D sin-cos code


@dataclass
class PerceiverConfig:
    num_latents: int = 64
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    max_frames: int = 8


@dataclass
class XAttnConfig:
    every: int = 4                     # a gated xattn block before every k-th decoder layer
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    # tanh gates start at 0 so a pretrained LM is untouched at step 0 (Flamingo). An LM trained
    # from scratch has nothing to protect; closed gates only delay learning to look.
    gate_init: float = 0.0


@dataclass
class ModelConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    freeze_lm: bool = True
    freeze_vision: bool = True
    activation_checkpointing: bool = False
    attention_backend: str = "auto"    # auto | triton | reference


@dataclass
class DataConfig:
    train_shards: str = "data/demo/train-{000000..000015}.tar"   # ';' separates sources to mix
    val_shards: str = "data/demo/val-000000.tar"
    tokenizer: str | None = None       # local HF tokenizer dir; None = the demo tokenizer
    max_length: int = 64
    max_images: int = 1
    num_workers: int = 1
    shuffle_buffer: int = 1000
    synthetic_dir: str | None = "data/demo"   # build the synthetic set here if the shards are missing
    synthetic_n: int = 20000
    train_weights: str | None = None   # mixing weights for ';'-separated train_shards, e.g. "0.7,0.3"
    synthetic_seed: int = 0
    synthetic_image_size: int = 32     # pixels the synthetic set is drawn at (the loader resizes)
    # Bounds on what one untrusted shard can make a loader worker read or decode; what exceeds
    # them is skipped and counted, never decoded.
    max_member_bytes: int = 32 * 2**20        # one tar member (an image, a caption, a document)
    max_members_per_sample: int = 256         # members under one sample key
    max_image_pixels: int = 40_000_000        # width x height, read from the header before decoding
    max_shard_bytes: int = 4 * 2**30          # bytes a compressed shard may expand to


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 3
    zero3_gather: str = "block"        # ZeRO-3 gathers whole repeated blocks ("block") or every module ("module")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    run_dir: str = "runs/demo"
    save_every: int = 500
    eval_every: int = 250
    log_every: int = 10
    seed: int = 1234
    global_batch_size: int = 32        # samples per optimizer step, whatever the layout
    micro_batch_size: int = 8
    precision: str = "bf16"            # bf16 | fp16 | fp32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    lr_decay_steps: int = 0            # cosine horizon; 0 = max_steps (set it to extend a run exactly)
    keep_checkpoints: int = 2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    fused_loss_scaling: bool = True    # fp16: furnace's fused grad stats instead of DeepSpeed's
    # Resuming with a changed config that the checkpoint cannot honour (model shape, layout,
    # data, seed, batch sizes) is refused unless this is set.
    allow_config_change: bool = False
    dist_timeout_minutes: float = 30.0  # how long a collective may wait for a rank before failing


@dataclass
class DebugConfig:
    """Diagnostics; none of them is needed to train."""
    # Every rank reads the 1-rank stream of micro-batches and keeps those whose index % dp is
    # its dp rank: every layout then sees the 1-rank run's micro-batches (the parity tests).
    replicated_data: bool = False
    log_gate_grads: bool = False       # record the xattn tanh gates' gradients as gate_grad/* metrics
    # Fault drills, a comma list of kind@step[:rank] (furnace/training/faults.py): inf@3, nan@2:1, die@6.
    faults: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- building

def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(value, tp, key: str):
    """Turn a YAML/CLI value into the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(float(value)) if tp is int and isinstance(value, str) and "e" in value.lower() else tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        return str(value)
    if tp is dict and not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def update(obj, data: dict, prefix: str = "") -> None:
    """Set the fields of config section `obj` from a nested dict (YAML, a saved config.json),
    coercing each value to its declared type. `prefix` names the section in errors."""
    types = _field_types(type(obj))
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key {key!r}; known keys under {prefix or 'the root'}: {known}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping, got {v!r}")
            update(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, types[k], key))


def _parse_set(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"--set takes key=value (e.g. train.max_steps=100); got {item!r}")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} not found; pass an existing YAML file or a preset name")
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        names = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset {name_or_path!r}; choose one of: {names}, or pass a YAML file")
    return preset


def load_config(preset: str | None = "demo", overrides: typing.Sequence[str] = ()) -> Config:
    cfg = Config()
    if preset:
        with open(resolve_preset(preset)) as f:
            data = yaml.safe_load(f) or {}
        update(cfg, data)
    for item in overrides:
        update(cfg, _parse_set(item))
    return cfg


# ---------------------------------------------------------------------------- validation

def validate(cfg: Config, world_size: int, *, check_paths: bool = True) -> int:
    """Check the whole tree for `world_size` ranks; returns the data-parallel size."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if t.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision must be bf16, fp16 or fp32; got {t.precision!r}")
    if m.attention_backend not in ("auto", "triton", "reference"):
        raise ConfigError(f"model.attention_backend must be auto, triton or reference; got {m.attention_backend!r}")
    if p.tp < 1 or p.pp < 1:
        raise ConfigError("parallel.tp and parallel.pp must be >= 1")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0..3; got {p.zero_stage}")
    if p.zero3_gather not in ("block", "module"):
        raise ConfigError(f"parallel.zero3_gather must be block or module; got {p.zero3_gather!r}")
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
                          "change tp/pp or the number of ranks")
    dp = world_size // (p.tp * p.pp)
    if m.lm.path is None:
        if m.lm.num_heads % p.tp or m.lm.num_kv_heads % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide model.lm.num_heads={m.lm.num_heads} and "
                              f"model.lm.num_kv_heads={m.lm.num_kv_heads}; pick a tp that divides both")
        if m.lm.num_heads % m.lm.num_kv_heads:
            raise ConfigError("model.lm.num_kv_heads must divide model.lm.num_heads")
        if m.lm.intermediate_size % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide model.lm.intermediate_size={m.lm.intermediate_size}")
        if p.pp > m.lm.num_layers:
            raise ConfigError(f"parallel.pp={p.pp} exceeds model.lm.num_layers={m.lm.num_layers}; "
                              "use at most one pipeline stage per decoder layer")
    if m.xattn.heads % p.tp or m.perceiver.heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide model.xattn.heads={m.xattn.heads} and "
                          f"model.perceiver.heads={m.perceiver.heads}")
    if m.xattn.every < 1:
        raise ConfigError("model.xattn.every must be >= 1")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if t.global_batch_size % (t.micro_batch_size * dp) != 0:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel size ({dp}); e.g. --set train.global_batch_size="
            f"{max(1, round(t.global_batch_size / (t.micro_batch_size * dp))) * t.micro_batch_size * dp}")
    if t.max_steps < 1:
        raise ConfigError("train.max_steps must be >= 1")
    if check_paths:
        for key, path in (("model.lm.path", m.lm.path), ("model.vision.path", m.vision.path),
                          ("data.tokenizer", cfg.data.tokenizer)):
            if path is not None and not os.path.isdir(path):
                raise ConfigError(f"{key}={path!r} is not a directory; point it at a local HF checkpoint "
                                  "(nothing is downloaded)")
    return dp


def gradient_accumulation_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
