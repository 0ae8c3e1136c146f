"""Continuing a checkpoint on another layout: another data-parallel, tensor-parallel or pipeline
size, or another ZeRO stage.

1. Rank 0 converts a ZeRO-1/2/3 tag with DeepSpeed's `ds_to_universal` (in a subprocess whose every
   torch.load is limited to weights and the allowlist) into one folder per parameter holding its
   fp32 weights and Adam moments whole. DeepSpeed merges the ZeRO partitions; the tensor-parallel
   slices are joined by furnace's plan (`parallel.apply.tp_split_dim`), handed to the conversion
   as patterns rather than read from the checkpoint, so checkpoints written before this existed
   convert too. Pipeline checkpoints name parameters by layer ("3.layer.mlp.up_proj.weight");
   `pipeline_param_names` maps them to the model's names. A ZeRO-0 tag (tp = pp = 1, one file
   with the whole state) is rewritten in the same form by `convert_plain`.
2. Every rank reads, one parameter at a time, the parameters its engine holds, cuts out its
   tensor-parallel part (`tp_shard`, as `parallelize` cuts the model) and writes it into its ZeRO
   partition with DeepSpeed's fragment setters (whole, without ZeRO). The Adam step, the schedule
   and the engine's counters come from the saved engine state. Frozen parameters are not in the
   optimizer and never change: the ones this run built are the checkpoint's.

No rank holds more than one whole parameter beyond its own share at a time.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from furnace.parallel.apply import COLUMN_MODULES, ROW_MODULES, VOCAB_MODULES, tp_shard
from furnace.parallel.pipeline import pipeline_param_names
from furnace.training.checkpoint import CheckpointError, checkpoint_dir
from furnace.training.engine import named_param_groups
from furnace.training.safe_load import safe_load

UNIVERSAL = "universal"  # a tag converted for another layout, while it loads (removed after)
STATES = ("fp32", "exp_avg", "exp_avg_sq")

# furnace's tensor-parallel plan as DeepSpeed's merge patterns (names with or without a pipeline
# layer prefix; tests/test_reshard.py checks them against tp_split_dim for every parameter).
_VISION = r"^(?:\d+\.)?(?:vision|audio\.tower)\."  # the towers (apply.REPLICATED_TOWERS)
_ANY = lambda mods: "(?:" + "|".join(mods) + ")"  # noqa: E731
# LoRA: a column-parallel linear's lora_B is split like its weight, a row-parallel one's lora_A.
_ROW_SPLIT = rf"\.{_ANY(ROW_MODULES)}\.(?:lora_A\.)?weight$"
_SPLIT = (rf"\.(?:{_ANY(COLUMN_MODULES + VOCAB_MODULES)}\.(?:weight|bias)|{_ANY(COLUMN_MODULES)}\.lora_B\.weight"
          rf"|{_ANY(ROW_MODULES)}\.(?:lora_A\.)?weight)$")
PATTERNS = {
    "tp_replicated_parameter_patterns": [rf"{_VISION}|^(?!.*{_SPLIT})"],
    "parameter_with_row_parallelism_patterns": [rf"(?!{_VISION}).*{_ROW_SPLIT}"],
    "vocabulary_parameter_patterns": [rf"(?!{_VISION}).*\.{_ANY(VOCAB_MODULES)}\.weight$"],
    "pipeline_replicated_parameter_patterns": [r"^tied_modules\."],  # the tied embedding's second copy
}

# ds_to_universal with furnace's plan and every torch.load limited to weights and the allowlist
_CONVERT = ("import json, runpy, sys\n"
            "from deepspeed.checkpoint import ds_to_universal as conv\n"
            "from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO\n"
            "from furnace.training.safe_load import safe_torch_load\n"
            "info = json.loads(sys.argv.pop(1))\n"
            "def inject(ckpt):\n"
            "    ckpt.global_state[UNIVERSAL_CHECKPOINT_INFO] = info\n"
            "conv._inject_missing_state = inject\n"
            "conv._load_universal_checkpoint_info_stage3 = lambda files: info\n"
            "sys.argv[0] = 'ds_to_universal'\n"
            "with safe_torch_load():\n"
            "    conv.main(conv.parse_arguments())\n")


def merge_info(vocab_size: int, trained: list[str] | None = None) -> dict:
    """DeepSpeed's UNIVERSAL_CHECKPOINT_INFO for furnace's plan. `trained`: the saved names of the
    parameters the optimizer holds; a pattern none of them matches is left out (ds_to_universal
    refuses unused patterns, e.g. the vocabulary's when the LM is frozen)."""
    import re

    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    patterns = PATTERNS if trained is None else {
        key: [p for p in pats if any(re.match(p, n) for n in trained)] for key, pats in PATTERNS.items()}
    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE, "original_vocab_size": vocab_size,
            **patterns}


def trained_names(model, saved_pp: int) -> list[str]:
    """The checkpoint names (`saved_names`) of the parameters the optimizer trains."""
    if saved_pp > 1:  # every pipeline name of a parameter (a tied layer's included)
        return [k for k, n in pipeline_param_names(model).items() if model.get_parameter(n).requires_grad]
    return [n for n, p in model.named_parameters() if p.requires_grad]


def saved_names(model, saved_pp: int) -> dict[str, str]:
    """{the model's parameter name: its name in a checkpoint written with `saved_pp` stages}."""
    if saved_pp == 1:
        return {n: n for n, _ in model.named_parameters()}
    out: dict[str, str] = {}
    for pipe_name, name in pipeline_param_names(model).items():
        out.setdefault(name, pipe_name)
    return out


def convert(tagdir: Path, out: Path, model, saved_pp: int) -> None:
    """Rank 0: the tag as one folder per parameter under `out/zero` (fp32 weights, Adam moments)."""
    shutil.rmtree(out, ignore_errors=True)
    info = merge_info(model.base_vocab, trained_names(model, saved_pp))
    cmd = [sys.executable, "-c", _CONVERT, json.dumps(info), "--input_folder", str(tagdir),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"converting {tagdir.name} for the new layout failed ({last}); resume with the "
                              "layout it was saved with")


def convert_plain(tagdir: Path, out: Path, model) -> None:
    """Rank 0: a ZeRO-0 tag (tp = pp = 1: one file holds the model and AdamW's state, numbered in
    `named_param_groups` order) in the layout `convert` writes."""
    sd = safe_load(tagdir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True)
    opt = sd.get("optimizer") or {}
    inner = opt.get("optimizer_state_dict", opt)  # fp16/bf16: DeepSpeed's wrapper around AdamW
    masters = opt.get("fp32_groups")  # ... and its fp32 master weights, per group
    names = [[n for n, _ in group] for _, group in named_param_groups(model)]
    saved = [g["params"] for g in inner.get("param_groups", [])]
    if "fp32_groups_flat" in opt or [len(g) for g in saved] != [len(g) for g in names]:
        raise CheckpointError(f"checkpoint {tagdir.name} holds a ZeRO-0 optimizer state furnace cannot map to "
                              "parameter names; resume with the layout it was saved with")
    shutil.rmtree(out, ignore_errors=True)
    for g, (ids, group_names) in enumerate(zip(saved, names)):
        for j, (i, name) in enumerate(zip(ids, group_names)):
            st = inner["state"].get(i, {})
            folder = out / "zero" / name
            folder.mkdir(parents=True)
            weights = masters[g][j] if masters else sd["module"][name]
            for state, t in (("fp32", weights), ("exp_avg", st.get("exp_avg")), ("exp_avg_sq", st.get("exp_avg_sq"))):
                torch.save({"param": torch.zeros_like(weights, dtype=torch.float32) if t is None else t.float()},
                           folder / f"{state}.pt")


def engine_state(tagdir: Path) -> dict:
    """The saved engine's own state (schedule, counters) from rank 0's model-states file."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tagdir / name).is_file():
            sd = safe_load(tagdir / name, map_location="cpu", mmap=True)  # it may hold the whole module: map, not read
            out = {k: sd.get(k) for k in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")}
            out["shapes"] = {n: tuple(s) for group in sd.get("param_shapes") or [] for n, s in group.items()}
            return out
    raise CheckpointError(f"checkpoint {tagdir.name} has no DeepSpeed model-states file of rank 0; resume with "
                          "the layout it was saved with")


def read_state(folder: Path, state: str, shape) -> torch.Tensor:
    """One state of one parameter, whole. A ZeRO-3 conversion without tensor parallelism writes
    it flat: `shape` is the parameter's as rank 0 saved it (whole, at tp 1)."""
    path = folder / f"{state}.pt"
    if not path.is_file():
        raise CheckpointError(f"the converted checkpoint has no {state} for {folder.name}; resume with the layout "
                              "it was saved with")
    got = safe_load(path, map_location="cpu")
    return got["param"] if isinstance(got, dict) else got.view(shape)


def _set_plain(opt: torch.optim.Optimizer, p: torch.nn.Parameter, values: dict) -> None:
    """No ZeRO: the parameter and its AdamW state, whole."""
    with torch.no_grad():
        p.data.copy_(values["fp32"].to(p.dtype))
    st = _adam_state(opt, p)
    for key in ("exp_avg", "exp_avg_sq"):
        st[key].copy_(values[key])


def _adam_state(opt: torch.optim.Optimizer, t: torch.Tensor) -> dict:
    """AdamW's state for `t`, made now if the optimizer would make it at its first step."""
    st = opt.state[t]
    for key in ("exp_avg", "exp_avg_sq"):
        if key not in st:
            st[key] = torch.zeros_like(t, dtype=torch.float32)
    return st


def _make_adam_states(opt, inner: torch.optim.Optimizer) -> None:
    """DeepSpeed's optimizers make AdamW's state at their first step (ZeRO-1/2 and bf16 then link
    each parameter to its fragment of it); the state being loaded needs it now."""
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        for flat in getattr(opt, name, None) or []:  # ZeRO-3, ZeRO-1/2, bf16
            if flat is not None and flat.numel():
                _adam_state(inner, flat)
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()


def _set_adam_step(opt: torch.optim.Optimizer, step: int) -> None:
    """Every AdamW state its own step (DeepSpeed's partitions are separate tensors)."""
    for t, st in opt.state.items():  # ZeRO-3 hands its optimizer the partitions only while stepping
        if "exp_avg" not in st:
            continue
        old = st.get("step")
        if torch.is_tensor(old):
            st["step"] = torch.full_like(old, float(step))
        elif old is not None or not isinstance(opt, torch.optim.AdamW):  # DeepSpeed's CPU Adam counts in an int
            st["step"] = int(step)
        else:  # torch's (fused) AdamW keeps a float32 step on the parameter's device
            st["step"] = torch.tensor(float(step), dtype=torch.float32, device=t.device)


def _set_zero3_partition(opt, p, value: torch.Tensor, key: str | None) -> None:
    """This rank's ZeRO-3 partition of `value` into the fp32 master (key None) or an Adam moment.
    DeepSpeed's own setter (0.19.8) reads past the end of a parameter whose last partition is
    padding (a 1-element gate on 2 ranks); here the padding stays zero."""
    part, group = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    n = part.numel()
    start = n * opt._get_param_partition_rank(p)
    mine = value.flatten()[start:start + n]
    part.data.zero_()
    part.data[: mine.numel()].copy_(mine)
    if opt._swappable_optimizer_subgroup(group):
        opt._optimizer_states_and_gradient_swap_out(group)


def load_into(engine, model, topology, zero_dir: Path, names: dict[str, str], shapes: dict, adam_step: int) -> None:
    """Every rank: the converted checkpoint's weights and moments into this engine's parameters
    and ZeRO partitions, cut for this rank's tensor-parallel part; `adam_step`: the optimizer
    steps taken."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    held = {id(p) for p in engine.module.parameters()}
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    tp_rank, tp = topology.coord.tp, topology.tp
    _make_adam_states(engine.optimizer, inner)
    for name, p in model.named_parameters():
        if id(p) not in held or not p.requires_grad:
            continue
        folder = zero_dir / names[name]
        shape = tuple(getattr(p, "ds_shape", p.shape))
        values = {}
        for state in STATES:
            full = read_state(folder, state, shapes.get(names[name]))
            local = tp_shard(full, name, tp_rank, tp)
            if tuple(local.shape) != shape:
                raise CheckpointError(f"{name} is {tuple(full.shape)} in the checkpoint, which does not cut into this "
                                      f"run's {shape} at tp={tp}: the model changed; resume with the saved config")
            values[state] = local
        if hasattr(p, "ds_id"):
            for state in STATES:
                _set_zero3_partition(engine.optimizer, p, values[state], None if state == "fp32" else state)
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimizer
            safe_set_full_fp32_param(p, values["fp32"].to(torch.float32))
            for state in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, values[state].to(torch.float32), state)
        else:
            _set_plain(inner, p, values)
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: the working copy follows the fp32 master
        for fp32, lp in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat):
            if fp32.numel():
                lp.data.copy_(fp32.data)
    elif hasattr(opt, "update_lp_params"):  # ZeRO-1/2 and bf16: the same, then gathered
        opt.update_lp_params()
    _set_adam_step(inner, adam_step)


def _restore_loss_scale(opt, optimizer_state: Path) -> None:
    """fp16: the dynamic loss scale where the saved run left it (scale, iteration counters), into
    whichever scaler this run's optimizer uses."""
    live = getattr(opt, "loss_scaler", None)
    if live is None or not optimizer_state.is_file():
        return
    saved = safe_load(optimizer_state, map_location="cpu", mmap=True).get("loss_scaler")  # with rank 0's partitions
    for key in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis"):  # DeepSpeed's and furnace's
        value = getattr(saved, key, None)
        if isinstance(value, (int, float)) and hasattr(live, key):
            setattr(live, key, value)


def load_resharded(engine, model, topology, run_dir, tag: str) -> None:
    """Collective: `tag`, written on another layout, into this run's engine (see the module
    docstring). The converted copy is removed afterwards."""
    ckdir = checkpoint_dir(run_dir)
    saved_pp = json.loads((ckdir / tag / "config.json").read_text()).get("parallel", {}).get("pp", 1)
    rank = dist.get_rank()
    out = ckdir / UNIVERSAL / tag
    box = [None]
    if rank == 0:
        try:
            if any((ckdir / tag).glob("*optim_states.pt")):  # ZeRO-1/2/3 (and bf16) partitions
                convert(ckdir / tag, out, model, saved_pp)
            else:
                convert_plain(ckdir / tag, out, model)
        except CheckpointError as e:
            box = [str(e)]
        except Exception as e:  # every rank must hear it, not wait for rank 0 in the broadcast
            box = [f"converting {tag} for the new layout failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
                   "resume with the layout it was saved with"]
    dist.broadcast_object_list(box, src=0)  # every rank raises rank 0's one line
    if box[0] is not None:
        raise CheckpointError(box[0])
    problem = None
    try:
        saved = engine_state(ckdir / tag)
        load_into(engine, model, topology, out / "zero", saved_names(model, saved_pp), saved["shapes"],
                  (saved["global_steps"] or 0) - (saved["skipped_steps"] or 0))  # overflow steps skip Adam
        if engine.lr_scheduler is not None and saved["lr_scheduler"] is not None:
            engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if engine.fp16_enabled():
            _restore_loss_scale(engine.optimizer, out / "zero" / "optimizer_state.pt")
        for key in ("global_steps", "global_samples", "skipped_steps"):
            if saved[key] is not None:
                setattr(engine, key, saved[key])
    except Exception as e:  # agreed below: no rank waits for a failed one
        problem = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem)
    if rank == 0:
        shutil.rmtree(ckdir / UNIVERSAL, ignore_errors=True)
    failed = [(r, p) for r, p in enumerate(everyone) if p is not None]
    if failed:
        r, p = failed[0]
        raise CheckpointError(f"loading {tag} on the new layout failed on rank {r}: {p}")

