"""Config validation: every key range-checked before any process group, one line naming the fix;
`--set` coercion (strings stay strings, no bools or fractions for integers)."""
import math

import pytest

from furnace.config import RULES, Config, ConfigError, check_keys, config_keys, load_config, update, validate

NAN, INF = float("nan"), float("inf")

# (key, bad value, world size). The value is set on the demo preset's tree as is (bypassing
# --set coercion), so a wrong type must be caught by validate too. At least one row per key.
BAD = [
    ("model.lm.path", "", 1),
    ("model.lm.path", "/nonexistent/llama", 1),
    ("model.lm.vocab_size", -1, 1),
    ("model.lm.hidden_size", 0, 1),
    ("model.lm.hidden_size", 130, 1),               # not a multiple of num_heads=4
    ("model.lm.intermediate_size", 0, 1),
    ("model.lm.num_layers", 0, 1),
    ("model.lm.num_heads", 0, 1),
    ("model.lm.num_kv_heads", 0, 1),                # was a modulo by zero inside validate
    ("model.lm.num_kv_heads", 3, 1),                # does not divide num_heads=4
    ("model.lm.head_dim", -1, 1),
    ("model.lm.head_dim", 5, 1),                    # odd: RoPE rotates pairs
    ("model.lm.max_position_embeddings", 0, 1),
    ("model.lm.rope_theta", 0.0, 1),
    ("model.lm.rope_theta", NAN, 1),
    ("model.lm.rope_scaling", {"rope_type": "yarn", "factor": 4.0}, 1),
    ("model.lm.rope_scaling", {"rope_type": "linear"}, 1),
    ("model.lm.rope_scaling", {"rope_type": "llama3", "factor": 8.0}, 1),
    ("model.lm.rope_scaling", "linear", 1),
    ("model.lm.rms_norm_eps", 0.0, 1),
    ("model.lm.rms_norm_eps", -1e-6, 1),
    ("model.lm.tie_word_embeddings", "yes", 1),
    ("model.lm.qkv_bias", 1, 1),
    ("model.lm.o_bias", "no", 1),
    ("model.lm.mlp_bias", None, 1),
    ("model.lm.sliding_window", 0, 1),
    ("model.lm.sliding_window", 8, 1),              # shorter than data.max_length=12
    ("model.lm.model_type", "gpt2", 1),
    ("model.vision.path", "", 1),
    ("model.vision.path", "/nonexistent/clip", 1),
    ("model.vision.kind", "vit", 1),
    ("model.vision.image_size", 0, 1),
    ("model.vision.image_size", 30, 1),             # not a multiple of patch_size=4
    ("model.vision.patch_size", 0, 1),
    ("model.vision.patch_size", 5, 1),
    ("model.vision.hidden_size", 0, 1),
    ("model.vision.hidden_size", 98, 1),            # not a multiple of num_heads=4
    ("model.vision.intermediate_size", 0, 1),
    ("model.vision.num_layers", 0, 1),
    ("model.vision.num_heads", 0, 1),
    ("model.vision.sincos_positions", "true", 1),
    ("model.vision.features", "cls", 1),
    ("model.start_from", "", 1),
    ("model.start_from", "/nonexistent/flamingo", 1),
    ("data.pack", "yes", 1),
    ("model.perceiver.num_latents", 0, 1),
    ("model.perceiver.depth", 0, 1),
    ("model.perceiver.heads", 0, 1),
    ("model.perceiver.dim_head", 0, 1),
    ("model.perceiver.ff_mult", 0, 1),
    ("model.perceiver.max_frames", 0, 1),
    ("model.perceiver.frame_embeddings", "no", 1),
    ("model.perceiver.frame_init", -1.0, 1),
    ("model.perceiver.frame_init", NAN, 1),
    ("model.perceiver.qk_norm", 1, 1),
    ("model.perceiver.ff_act", "silu", 1),
    ("model.audio.kind", "clap", 1),
    ("model.audio.path", "", 1),
    ("model.audio.path", "/nonexistent/whisper", 1),   # read only with kind whisper
    ("model.audio.sample_rate", 0, 1),
    ("model.audio.seconds", 0.0, 1),
    ("model.audio.seconds", NAN, 1),
    ("model.audio.num_mel_bins", 0, 1),
    ("model.audio.n_fft", 1, 1),
    ("model.audio.hop_length", 0, 1),
    ("model.audio.hidden_size", 0, 1),
    ("model.audio.intermediate_size", 0, 1),
    ("model.audio.num_layers", 0, 1),
    ("model.audio.num_heads", 0, 1),
    ("model.audio_perceiver.num_latents", 0, 1),
    ("model.audio_perceiver.depth", 0, 1),
    ("model.audio_perceiver.heads", 0, 1),
    ("model.audio_perceiver.dim_head", 0, 1),
    ("model.audio_perceiver.ff_mult", 0, 1),
    ("model.audio_perceiver.max_frames", 0, 1),
    ("model.audio_perceiver.frame_embeddings", "no", 1),
    ("model.audio_perceiver.frame_init", -1.0, 1),
    ("model.audio_perceiver.qk_norm", 1, 1),
    ("model.audio_perceiver.ff_act", "silu", 1),
    ("model.xattn.every", 0, 1),
    ("model.xattn.every", 3, 1),                    # more than model.lm.num_layers=2
    ("model.xattn.heads", 0, 1),
    ("model.xattn.dim_head", 0, 1),
    ("model.xattn.ff_mult", 0, 1),
    ("model.xattn.gate_init", NAN, 1),
    ("model.xattn.gate_init", INF, 1),
    ("model.contrastive.dim", -1, 1),
    ("model.contrastive.text_width", 0, 1),
    ("model.contrastive.temperature", 0.0, 1),
    ("train.contrastive_weight", -0.1, 1),
    ("model.xattn.placement", "middle", 1),
    ("model.xattn.norm", "batchnorm", 1),
    ("model.xattn.ff", "relu", 1),
    ("model.xattn.ff_hidden", -1, 1),
    ("model.xattn.qk_norm", "yes", 1),
    ("model.xattn.gate", "matrix", 1),
    ("model.xattn.kernel", "flex", 1),
    ("model.xattn.reset_after_eos", 0, 1),
    ("model.lora.rank", -1, 1),
    ("model.lora.rank", 4, 1),                      # the demo trains its LM: LoRA needs model.freeze_lm
    ("model.lora.alpha", 0.0, 1),
    ("model.lora.dropout", 1.0, 1),
    ("model.lora.dropout", NAN, 1),
    ("model.lora.targets", [], 1),
    ("model.lora.targets", ["q", "qkv"], 1),
    ("model.lora.targets", ["q", "q"], 1),
    ("model.lora.targets", "q", 1),
    ("model.freeze_lm", "yes", 1),
    ("model.freeze_vision", 0, 1),
    ("model.freeze_audio", "yes", 1),
    ("model.activation_checkpointing", None, 1),
    ("model.attention_backend", "flash", 1),
    ("model.compile", "vision,tower", 1),
    ("model.fused_kernels", "rms_norm,gelu", 1),
    ("model.fused_kernels", "swiglu,swiglu", 1),
    ("model.fused_kernels", "", 1),
    ("data.train_shards", " ; ", 1),               # "" is valid: no data (train.py then asks for it)
    ("data.val_shards", ";", 1),
    ("data.tokenizer", "", 1),
    ("data.tokenizer", "/nonexistent/tokenizer", 1),
    ("data.max_length", 3, 1),
    ("data.max_images", 0, 1),
    ("data.video_frames", 0, 1),
    ("data.video_frames", 9, 1),                    # more than model.perceiver.max_frames=8
    ("data.num_workers", -1, 1),
    ("data.shuffle_buffer", -1, 1),
    ("data.canonical_streams", 0, 1),
    ("parallel.offload_optimizer", "gpu", 1),
    ("parallel.offload_params", "host", 1),
    ("parallel.offload_nvme_path", "", 1),
    ("parallel.layout", "best", 1),
    ("data.synthetic_dir", "", 1),
    ("data.synthetic_n", 0, 1),
    ("data.train_weights", "0.5,0.5", 1),           # two weights, one source
    ("data.train_weights", "1,-1", 1),
    ("data.train_weights", "nan", 1),
    ("data.train_weights", "heavy", 1),
    ("data.synthetic_seed", -1, 1),
    ("data.synthetic_image_size", 7, 1),
    ("data.synthetic_kind", "audio", 1),
    ("data.max_member_bytes", 0, 1),
    ("data.max_members_per_sample", 0, 1),
    ("data.max_image_pixels", 0, 1),
    ("data.max_shard_bytes", 0, 1),
    ("data.max_video_frames", 0, 1),
    ("data.max_audio_seconds", 0.0, 1),
    ("data.max_audio_seconds", INF, 1),
    ("data.min_audio_seconds", -1.0, 1),
    ("data.min_audio_seconds", 700.0, 1),             # above data.max_audio_seconds=600
    ("parallel.tp", 0, 1),
    ("parallel.tp", 2, 1),                          # layout A needs parallel.zero_stage=3 (demo has 0)
    ("parallel.pp", 0, 1),
    ("parallel.zero_stage", 4, 1),
    ("parallel.zero_stage", -1, 1),
    ("parallel.zero3_gather", "layer", 1),
    ("train.max_steps", 0, 1),
    ("train.max_steps", 3.5, 1),
    ("train.run_dir", "", 1),
    ("train.save_every", -1, 1),
    ("train.eval_every", -1, 1),
    ("train.log_every", 0, 1),                      # was a ZeroDivisionError in the loop
    ("train.seed", -1, 1),
    ("train.global_batch_size", 0, 1),
    ("train.global_batch_size", 48, 1),             # not a multiple of micro_batch_size=32
    ("train.micro_batch_size", 0, 1),
    ("train.micro_batch_size", True, 1),
    ("train.precision", "fp8", 1),
    ("train.lr", -1e-3, 1),
    ("train.lr", NAN, 1),
    ("train.lr", INF, 1),
    ("train.lr", True, 1),
    ("train.min_lr_ratio", 1.5, 1),
    ("train.min_lr_ratio", -0.1, 1),
    ("train.warmup_steps", -1, 1),
    ("train.lr_decay_steps", -1, 1),
    ("train.keep_checkpoints", 0, 1),
    ("train.weight_decay", -0.1, 1),
    ("train.weight_decay", NAN, 1),
    ("train.grad_clip", -1.0, 1),
    ("train.grad_clip", INF, 1),
    ("train.fused_loss_scaling", "on", 1),
    ("train.allow_config_change", 1, 1),
    ("train.dist_timeout_minutes", 0.0, 1),
    ("train.dist_timeout_minutes", NAN, 1),
    ("debug.log_gate_grads", None, 1),
    ("debug.faults", "boom@3", 1),
    ("debug.faults", "nan@x", 1),
    ("debug.faults", "inf@3;nan@4", 1),
    ("debug.faults", "nan@3:4", 2),                 # no rank 4 in a world of 2
]

ALL_KEYS = {key for key, *_ in config_keys()}


def _set(cfg: Config, key: str, value) -> None:
    *path, name = key.split(".")
    section = cfg
    for p in path:
        section = getattr(section, p)
    setattr(section, name, value)


def test_every_key_has_a_rule_and_a_bad_value():
    assert set(RULES) == ALL_KEYS, "a config key without a rule in furnace.config.RULES (or a stale rule)"
    missing = ALL_KEYS - {key for key, *_ in BAD}
    assert not missing, f"keys without a bad value in BAD: {sorted(missing)}"
    assert {key for key, *_ in BAD} <= ALL_KEYS


@pytest.mark.parametrize("key,bad,world", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_value_fails_in_one_line_naming_the_key_and_the_fix(key, bad, world):
    cfg = load_config("demo")
    validate(cfg, world, check_paths=True)  # the demo preset itself is fine at this world size
    _set(cfg, key, bad)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world, check_paths=True)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert key in msg, msg
    assert str(bad) in msg or repr(bad) in msg, msg
    assert "--set" in msg or "must" in msg, msg


@pytest.mark.parametrize("key", sorted(RULES))
def test_the_suggested_fix_is_itself_valid(key):
    """The `e.g. --set key=value` of each rule passes that rule (and its type) through --set."""
    cfg = load_config("demo", [f"{key}={RULES[key].example}"])
    check_keys(cfg)


def test_pretrained_lm_shape_is_not_checked():
    """With model.lm.path the checkpoint's config.json decides the shape: those keys are skipped."""
    cfg = load_config("demo", ["model.lm.path=/some/llama", "model.lm.num_kv_heads=0", "model.xattn.every=8"])
    assert validate(cfg, 1, check_paths=False) == 1


@pytest.mark.parametrize("preset,world", [("demo", 1), ("demo", 2), ("demo-video", 2), ("demo-audio", 2),
                                          ("flamingo-1b", 1), ("flamingo-1b", 2),
                                          ("flamingo-3b", 8), ("flamingo-9b", 8)])
def test_presets_validate(preset, world):
    assert validate(load_config(preset), world, check_paths=False) == world


# ---------------------------------------------------------------------------- --set coercion

def test_set_keeps_strings_verbatim():
    cfg = load_config("demo", ["train.run_dir=0123", "data.val_shards=off", "model.lm.path=0123",
                               "data.train_weights=1", "data.synthetic_dir=true", "debug.faults="])
    assert cfg.train.run_dir == "0123"          # not YAML octal 83
    assert cfg.data.val_shards == "off"         # not False
    assert cfg.model.lm.path == "0123"
    assert cfg.data.train_weights == "1"
    assert cfg.data.synthetic_dir == "true"
    assert cfg.debug.faults == ""


@pytest.mark.parametrize("text", ["none", "None", "null", ""])
def test_set_none_words_clear_optional_keys(text):
    cfg = load_config("demo", [f"data.tokenizer={text}", f"data.synthetic_dir={text}",
                               f"model.lm.sliding_window={text}", f"model.lm.rope_scaling={text}"])
    assert cfg.data.tokenizer is cfg.data.synthetic_dir is cfg.model.lm.sliding_window is None
    assert cfg.model.lm.rope_scaling is None


def test_a_str_key_set_to_off_stays_off_and_is_then_range_checked():
    cfg = load_config("demo", ["model.vision.kind=off"])
    assert cfg.model.vision.kind == "off"
    with pytest.raises(ConfigError, match=r"^model\.vision\.kind must be clip or siglip; got 'off'"):
        validate(cfg, 1, check_paths=False)


@pytest.mark.parametrize("item,needle", [
    ("train.micro_batch_size=3.5", "--set train.micro_batch_size: expected an integer, got 3.5"),
    ("train.micro_batch_size=true", "--set train.micro_batch_size: expected an integer, got true"),
    ("train.max_steps=2.5e0", "--set train.max_steps: expected an integer, got 2.5e0"),
    ("train.max_steps=nan", "--set train.max_steps: expected an integer, got nan"),
    ("train.max_steps=ten", "--set train.max_steps: expected an integer, got ten"),
    ("train.lr=true", "--set train.lr: expected a number, got true"),
    ("train.lr=fast", "--set train.lr: expected a number, got fast"),
    ("model.freeze_lm=maybe", "--set model.freeze_lm: expected true/false, got maybe"),
    ("model.lm.sliding_window=yes", "--set model.lm.sliding_window: expected an integer or none, got yes"),
    ("model.lm.rope_scaling=3", "--set model.lm.rope_scaling: expected a mapping or none, got 3"),
    ("model.lm.rope_scaling={rope_type: linear", "--set model.lm.rope_scaling: cannot read"),
    ("train.no_such_key=1", "unknown config key 'train.no_such_key'"),
    ("train.max_steps", "--set takes key=value"),
])
def test_set_refuses_in_one_line_naming_the_key(item, needle):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [item])
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("text,value", [("1e3", 1000), ("3.0", 3), ("0123", 123), ("1_000", 1000), (" 7 ", 7)])
def test_set_accepts_integral_values_for_ints(text, value):
    cfg = load_config("demo", [f"train.max_steps={text}"])
    assert cfg.train.max_steps == value and type(cfg.train.max_steps) is int


def test_set_numbers_bools_and_mappings_still_read_as_yaml():
    cfg = load_config("demo", ["train.lr=1e-4", "train.grad_clip=2", "model.freeze_lm=off",
                               "model.freeze_vision=yes", "model.lm.rope_scaling={rope_type: linear, factor: 2.0}",
                               "model.xattn={every: 2, heads: 2}"])
    assert cfg.train.lr == 1e-4 and cfg.train.grad_clip == 2.0 and type(cfg.train.grad_clip) is float
    assert cfg.model.freeze_lm is False and cfg.model.freeze_vision is True
    assert cfg.model.lm.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert (cfg.model.xattn.every, cfg.model.xattn.heads) == (2, 2)
    assert validate(cfg, 1, check_paths=False) == 1


def test_set_nan_for_a_float_is_read_then_refused_by_validate():
    cfg = load_config("demo", ["train.lr=nan"])
    assert math.isnan(cfg.train.lr)
    with pytest.raises(ConfigError, match=r"^train\.lr must be finite and >= 0; got nan; e\.g\. --set train\.lr="):
        validate(cfg, 1, check_paths=False)


@pytest.mark.parametrize("yaml_text,needle", [
    ("train: {max_steps: true}\n", "train.max_steps: expected an integer, got True"),
    ("train: {micro_batch_size: 3.5}\n", "train.micro_batch_size: expected an integer, got 3.5"),
    ("train: {lr: false}\n", "train.lr: expected a number, got False"),
    ("train: {run_dir: off}\n", "train.run_dir: expected a string, got False"),
    ("train: {run_dir: null}\n", "train.run_dir: expected a string, got None"),
    ("model: {lm: {rope_scaling: [1, 2]}}\n", "model.lm.rope_scaling: expected a mapping or none"),
    ("- just a list\n", "expected a mapping of config sections"),
    ("train: {max_steps: [\n", "not valid YAML"),
])
def test_yaml_files_go_through_the_same_coercion(tmp_path, yaml_text, needle):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg, msg


def test_yaml_files_accept_integral_and_exponent_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {max_steps: 2.0e3, lr: 1e-4, warmup_steps: '1e2', run_dir: runs/x}\n"
                    "model: {lm: {sliding_window: 4096}}\n")
    cfg = load_config(str(path))
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.warmup_steps) == (2000, 1e-4, 100)
    assert cfg.train.run_dir == "runs/x" and cfg.model.lm.sliding_window == 4096


def test_a_saved_config_round_trips():
    """A checkpoint's config.json (Config.to_dict) loads back through `update` unchanged."""
    import json

    cfg = load_config("flamingo-1b", ["model.lm.rope_scaling={rope_type: linear, factor: 2.0}",
                                      "model.lm.sliding_window=8192", "data.train_weights=0.7,0.3",
                                      "data.train_shards=a.tar;b.tar"])
    back = Config()
    update(back, json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    validate(back, 1, check_paths=False)


def test_train_py_refuses_to_freeze_a_part_built_with_random_weights(capsys, tmp_path):
    """flamingo-1b's shapes with no checkpoints: fine to benchmark, pointless to train."""
    from furnace.training.launch import main

    (tmp_path / "mine-000000.tar").write_bytes(b"")
    shards = ["--set", f"data.train_shards={tmp_path}/mine-000000.tar"]
    assert main(["--config", "flamingo-1b", *shards]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.freeze_lm=true with no model.lm.path" in err[0]
    assert "--set model.freeze_lm=false" in err[0]
    assert main(["--config", "flamingo-1b", *shards, "--set", "model.freeze_lm=false"]) == 2
    assert "model.freeze_vision=true with no model.vision.path" in capsys.readouterr().err
