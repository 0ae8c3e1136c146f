"""One typed config tree: model, data, parallel, train, debug.

    cfg = load_config("demo", ["train.max_steps=100"])   # loading.py: defaults < preset/YAML < --set
    dp = validate(cfg, world_size)                          # validation.py: one line naming the fix
    cfg.model.lm.hidden_size                                # tree.py: the sections and their ranges
"""
from furnace.config.loading import PRESET_DIR, load_config, resolve_preset, update
from furnace.config.tree import (FUSED_OPS, LORA_TARGETS, AudioConfig, Config, ConfigError, ContrastiveConfig, DataConfig, DebugConfig, LMConfig,
                                 LoraConfig,
                                 ModelConfig, ParallelConfig, PerceiverConfig, TrainConfig, VisionConfig, XAttnConfig)
from furnace.config.validation import (FAULT_KINDS, RULES, check_keys, check_trainable, config_keys, gradient_accumulation_steps,
                                       parse_faults, split_sources, validate)

__all__ = ["AudioConfig", "Config", "ConfigError", "ContrastiveConfig", "DataConfig", "DebugConfig", "FAULT_KINDS", "FUSED_OPS", "LMConfig", "LORA_TARGETS",
           "LoraConfig", "ModelConfig",
           "PRESET_DIR", "ParallelConfig", "PerceiverConfig", "RULES", "TrainConfig", "VisionConfig", "XAttnConfig",
           "check_keys", "check_trainable", "config_keys", "gradient_accumulation_steps", "load_config", "parse_faults",
           "resolve_preset", "split_sources", "update", "validate"]
