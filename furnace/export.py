"""Consolidate a ZeRO checkpoint into HF-format safetensors.

    python -m furnace.export RUN_DIR --out DIR [--tag stepNNNNNNNN]

writes DIR/flamingo/ (the whole model: safetensors + flamingo.json + tokenizer, reloadable with
`furnace.model.flamingo_io.load_flamingo`) and DIR/lm/ (the decoder alone with the new token rows
merged, loadable by transformers' AutoModelForCausalLM, with the tokenizer).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from safetensors.torch import load_file

from furnace.config import Config, update
from furnace.data.tokenizer import load_tokenizer
from furnace.model import llama
from furnace.model.flamingo_io import lm_with_new_tokens, load_flamingo_state, parts_from, save_flamingo
from furnace.training.build import build_model
from furnace.training.checkpoint import (ARCHITECTURE, FULL_MODEL, CheckpointError, checkpoint_dir, choose_resume_tag,
                                         verify)
from furnace.training.safe_load import safe_load, safe_torch_load


def consolidated_state(run_dir, tag: str | None = None) -> tuple[dict, str]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if tag is None:
        tag, notes = choose_resume_tag(run_dir, set_aside=False)
        for n in notes:
            print(f"furnace export: {n}", file=sys.stderr)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(run_dir)}")
    tagdir = checkpoint_dir(run_dir) / tag
    problem = verify(tagdir) if tagdir.is_dir() else "not found"
    if problem is not None:
        raise CheckpointError(f"checkpoint {tag} under {checkpoint_dir(run_dir)} cannot be exported: {problem}; "
                              "leave out --tag for the newest complete one")
    if (tagdir / FULL_MODEL).exists():  # tensor/pipeline-parallel run: gathered at save time
        return load_file(str(tagdir / FULL_MODEL)), tag
    if not list(tagdir.glob("*optim_states.pt")):  # ZeRO-0: the module state is the model, whole
        module = safe_load(tagdir / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
        return {k: v.float() for k, v in module.items()}, tag
    with safe_torch_load():  # ZeRO-1/2/3: fp32 masters from the optimizer partitions; zero_to_fp32
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir(run_dir)), tag=tag), tag  # unpickles


def load_run_model(run_dir, tag: str | None = None):
    """The Flamingo of a run at a checkpoint, on the CPU in fp32."""
    state, tag = consolidated_state(run_dir, tag)
    cfg = Config()
    update(cfg, json.loads((checkpoint_dir(run_dir) / tag / "config.json").read_text()), saved=True)
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer")
    arch = Path(run_dir) / ARCHITECTURE
    if arch.is_file():  # the shapes only: the weights come from the checkpoint
        lm, vision = parts_from(json.loads(arch.read_text()), cfg.model.freeze_vision)
    else:  # a run from before architecture.json: the pretrained folders it started from
        lm = vision = None
        for key, path in (("model.lm.path", cfg.model.lm.path), ("model.vision.path", cfg.model.vision.path)):
            if path and not os.path.isdir(path):
                raise FileNotFoundError(f"{key}={path!r} (the run's starting checkpoint) is gone and {run_dir} has "
                                        f"no {ARCHITECTURE}: restore the folder to export this run")
    model = build_model(cfg, tokenizer, lm=lm, vision=vision)
    load_flamingo_state(model, state)
    return model.eval(), tokenizer, cfg, tag


def export(run_dir, out, tag: str | None = None) -> dict:
    model, tokenizer, cfg, tag = load_run_model(run_dir, tag)
    out = Path(out)
    cfg.model.lm.path = cfg.model.vision.path = None  # the folder holds everything: no pointer back
    save_flamingo(model, out / "flamingo", dataclasses.asdict(cfg.model))
    tokenizer.save_pretrained(out / "flamingo")
    llama.to_hf(lm_with_new_tokens(model), out / "lm")
    tokenizer.save_pretrained(out / "lm")
    return {"tag": tag, "flamingo": str(out / "flamingo"), "lm": str(out / "lm")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m furnace.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    a = p.parse_args(argv)
    try:
        res = export(a.run_dir, a.out, a.tag)
    except (FileNotFoundError, CheckpointError, ValueError) as e:  # ValueError: ConfigError, a damaged config.json
        print(f"furnace export: {e}", file=sys.stderr)
        return 2
    print(f"exported {res['tag']}: whole model -> {res['flamingo']}, LM alone -> {res['lm']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
