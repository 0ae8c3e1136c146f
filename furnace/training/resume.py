"""Deciding whether and from where a run resumes, and making the new config's honoured
changes take effect.

Rank 0 chooses the newest complete, intact checkpoint (`checkpoint.choose_resume_tag`), scans its
pickles for anything outside the weights-only allowlist, and compares the saved config and
tokenizer with this run's. The verdict is broadcast: every rank then checks that its own state
file is there, and all agree before anything is loaded.

Config changes a checkpoint can honour (`HONOURED`) take effect on resume; any other change is
refused in one line listing it, unless `train.allow_config_change=true`.
"""
from __future__ import annotations

import json
import logging

import torch.distributed as dist

from furnace.config import ConfigError
from furnace.training.checkpoint import (MARKER, CheckpointError, checkpoint_dir, choose_resume_tag,
                                         rank_state_file, read_marker, unsafe_globals)

log = logging.getLogger("furnace")

# Keys whose new value a resumed run simply uses; every other key must match the checkpoint's.
HONOURED = {
    "train.max_steps", "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.lr_decay_steps",
    "train.weight_decay", "train.grad_clip", "train.eval_every", "train.save_every", "train.log_every",
    "train.keep_checkpoints", "train.allow_config_change", "train.dist_timeout_minutes", "train.run_dir",
    "data.val_shards", "data.max_member_bytes", "data.max_members_per_sample", "data.max_image_pixels",
    "data.max_shard_bytes", "data.max_video_frames", "data.max_audio_seconds",
    # how the same math is computed, not what it computes
    "model.activation_checkpointing", "model.attention_backend", "model.compile", "model.fused_kernels", "model.xattn.kernel",
    "train.fused_loss_scaling",
    "parallel.zero3_gather",
    "debug.log_gate_grads", "debug.faults",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k).endswith("rope_scaling"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(honoured, refused) changes between a checkpoint's config and this run's, as 'key: old -> new'."""
    a, b = _flatten(saved), _flatten(new)
    honoured, refused = [], []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:  # added or retired since the checkpoint was written
            continue
        if a.get(key) != b.get(key):
            (honoured if key in HONOURED else refused).append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return honoured, refused


LAYOUT = ("world_size", "tp", "pp", "dp")
# Config keys a resharded resume takes from this run: how the same state is partitioned
LAYOUT_KEYS = {"parallel.tp", "parallel.pp", "parallel.zero_stage", "parallel.offload_optimizer",
               "parallel.offload_params", "parallel.offload_nvme_path", "parallel.layout"}


def _layout(d: dict, stage) -> str:
    return f"{d.get('world_size')} ranks (tp={d.get('tp')}, pp={d.get('pp')}, dp={d.get('dp')}, ZeRO-{stage})"


def _new_layout(marker: dict, meta: dict, old_stage: int, new_stage: int) -> str:
    """How to load a checkpoint: "same" layout, "replicated" or "universal" (another layout)."""
    layout = {k: marker[k] for k in LAYOUT if k in marker}
    same = all(layout[k] == meta[k] for k in layout)
    if same and old_stage == new_stage:
        return "same"
    if layout.get("tp", 1) == meta["tp"] == 1 and layout.get("pp", 1) == meta["pp"] == 1 \
            and old_stage == new_stage == 0:
        return "replicated"  # ZeRO-0 on another dp size: every rank's file holds the whole state
    return "universal"  # reshard.py


def _verdict(run_dir, cfg, meta: dict) -> tuple[str | None, Exception | None, str | None]:
    """Rank 0: (tag to resume from or None, the one-line error refusing it or None, how to load it)."""
    tag, notes = choose_resume_tag(run_dir)
    for n in notes:
        log.warning(n)
    if tag is None:
        return None, None, None
    tagdir = checkpoint_dir(run_dir) / tag
    bad = unsafe_globals(tagdir)
    if bad:
        return tag, CheckpointError(f"checkpoint {tag} holds pickled objects outside the weights-only allowlist "
                                    f"({'; '.join(bad[:3])}): refusing to load it; remove the tag or use a new "
                                    "train.run_dir"), None
    marker = read_marker(tagdir) if (tagdir / MARKER).exists() else {}
    saved = json.loads((tagdir / "config.json").read_text())
    old_stage = saved.get("parallel", {}).get("zero_stage", cfg.parallel.zero_stage)
    mode = _new_layout(marker, meta, old_stage, cfg.parallel.zero_stage)
    honoured, refused = config_changes(saved, cfg.to_dict())
    if mode == "universal":  # the layout is how the same state is partitioned, not what it is
        honoured += [r for r in refused if r.split(":")[0] in LAYOUT_KEYS]
        refused = [r for r in refused if r.split(":")[0] not in LAYOUT_KEYS]
    if mode != "same":
        log.warning(f"resuming {tag} on a new layout: {_layout(marker, old_stage)} -> "
                    f"{_layout(meta, cfg.parallel.zero_stage)}")
    fp = marker.get("tokenizer")
    if fp is not None and fp != meta["tokenizer"]:
        refused.append(f"the tokenizer (fingerprint {fp} -> {meta['tokenizer']})")
    if refused and not cfg.train.allow_config_change:
        return tag, ConfigError(f"resuming {tag} would change {'; '.join(refused)}, which the checkpoint cannot "
                                "honour: restore them, use a new train.run_dir, or --set train.allow_config_change=true"), None
    if refused:
        log.warning(f"resuming {tag} with changes it cannot honour (train.allow_config_change): {'; '.join(refused)}")
    if honoured:
        log.warning(f"resuming {tag} with new settings: {'; '.join(honoured)}")
    return tag, None, mode


def agree_on_resume(run_dir, cfg, meta: dict) -> tuple[str | None, str | None]:
    """Collective: (the tag every rank resumes from, how to load it: "same" layout, "replicated"
    (ZeRO-0 on another dp size) or "universal" (reshard.py)); (None, None) is a fresh start.
    Raises the same one-line ConfigError/CheckpointError on every rank when the resume must not
    happen."""
    rank, world = dist.get_rank(), dist.get_world_size()
    box = [None]
    if rank == 0:
        try:
            box = [_verdict(run_dir, cfg, meta)]
        except (OSError, ValueError) as e:  # an unreadable run_dir or config.json: every rank hears it
            box = [(None, CheckpointError(f"cannot read the checkpoints in {run_dir}: {e}"), None)]
    dist.broadcast_object_list(box, src=0)
    tag, problem, mode = box[0]
    if problem is not None:
        raise problem
    if tag is None:
        return None, None
    if mode != "same":
        return tag, mode
    mine = (checkpoint_dir(run_dir) / tag / rank_state_file(rank)).is_file()
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    missing = [r for r, ok in enumerate(everyone) if not ok]
    if missing:
        raise CheckpointError(f"checkpoint {tag} has no state for rank(s) {missing[:8]} of this {world}-rank run: "
                              "it was written with another number of ranks; resume with the same layout")
    return tag, mode


def apply_honoured(engine, cfg) -> None:
    """After DeepSpeed restored the optimizer and scheduler: this run's lr, schedule, weight decay
    and gradient clip, not the checkpoint's (the step count is kept). With an unchanged config
    this sets the values they already hold."""
    t = cfg.train
    if hasattr(engine.optimizer, "clip_grad"):  # ZeRO and bf16 optimizers clip themselves (ZeRO-1/2 restore it)
        engine.optimizer.clip_grad = t.grad_clip
    if getattr(engine, "_config", None) is not None:  # plain optimizers: the engine clips
        engine._config.gradient_clipping = t.grad_clip
    groups = engine.optimizer.param_groups
    for group in groups:
        if group.get("name") == "decay":  # furnace.training.engine.param_groups names its groups
            group["weight_decay"] = t.weight_decay
    sched = engine.lr_scheduler
    if sched is not None:
        sched.base_lrs = [t.lr] * len(sched.base_lrs)
        for group, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * fn(sched.last_epoch)
