"""Consolidate a run's checkpoint into HF-format safetensors, one tensor at a time.

    furnace-export RUN_DIR --out DIR [--tag stepNNNNNNNN] [--dtype fp32|bf16|fp16] [--lora merge|peft]

writes DIR/flamingo/ (the whole model: safetensors + flamingo.json + tokenizer, reloadable with
`furnace.model.flamingo_io.load_flamingo`) and DIR/lm/ (the decoder alone with the new token rows
merged, loadable by transformers' AutoModelForCausalLM, with the tokenizer). A run with LoRA
adapters (model.lora) gets them merged into DIR/lm's weights, or with --lora peft DIR/lm holds the
base weights and DIR/lora/ a peft adapter folder (`peft.PeftModel.from_pretrained(lm, DIR/lora)`). Whatever layout
saved the checkpoint, the model is built without weights and each parameter is read whole
(`training.consolidate`) and written into the current shard: the process holds one shard, never
the model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from furnace.config import Config, update
from furnace.data.tokenizer import load_tokenizer
from furnace.model.empty import empty, fill
from furnace.model.flamingo_io import (FLAMINGO_JSON, LORA_EXPORTS, empty_parts, flamingo_meta, write_lm,
                                       write_peft_adapter)
from furnace.model.hf_io import WeightWriter
from furnace.model.llama import skeleton_from_hf
from furnace.model.vision import vision_skeleton_from_hf
from furnace.training.build import build_model
from furnace.training.checkpoint import ARCHITECTURE, CheckpointError, checkpoint_dir, choose_resume_tag, verify
from furnace.training.consolidate import CheckpointWeights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_tag(run_dir, tag: str | None = None) -> str:
    """`tag`, checked complete, or the newest complete one."""
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
    return tag


def empty_run_model(run_dir, tag: str):
    """(the run's Flamingo without weights, its tokenizer, the config it was saved with)."""
    cfg = Config()
    update(cfg, json.loads((checkpoint_dir(run_dir) / tag / "config.json").read_text()), saved=True)
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer")
    if cfg.model.audio.path:  # a Whisper folder's encoder: its shape, written back when the run built it, rebuilds it
        cfg.model.audio.path, cfg.model.audio.kind = None, "scratch"
    arch = Path(run_dir) / ARCHITECTURE
    if arch.is_file():  # the shapes only: the weights come from the checkpoint
        lm, vision = empty_parts(json.loads(arch.read_text()), cfg.model.freeze_vision)
    else:  # a run from before architecture.json: the pretrained folders it started from
        for key, path in (("model.lm.path", cfg.model.lm.path), ("model.vision.path", cfg.model.vision.path)):
            if path and not os.path.isdir(path):
                raise FileNotFoundError(f"{key}={path!r} (the run's starting checkpoint) is gone and {run_dir} has "
                                        f"no {ARCHITECTURE}: restore the folder to export this run")
        lm = skeleton_from_hf(cfg.model.lm.path) if cfg.model.lm.path else None
        vision = vision_skeleton_from_hf(cfg.model.vision.path, cfg.model.freeze_vision) if cfg.model.vision.path else None
    with empty():
        model = build_model(cfg, tokenizer, lm=lm, vision=vision)
    model.tie_weights()
    return model, tokenizer, cfg


def load_run_model(run_dir, tag: str | None = None):
    """The Flamingo of a run at a checkpoint, on the CPU in fp32, whole in this process."""
    tag = resolve_tag(run_dir, tag)
    model, tokenizer, cfg = empty_run_model(run_dir, tag)
    work = checkpoint_dir(run_dir) / f".consolidate-{tag}-{os.getpid()}"
    with CheckpointWeights(run_dir, tag, model, work=work) as weights:
        fill(model, weights.read, where=f"checkpoint {tag}")
    return model.eval(), tokenizer, cfg, tag


def export(run_dir, out, tag: str | None = None, *, dtype: torch.dtype = torch.float32,
           max_shard_bytes: int = 5 * 2**30, progress: bool | None = None, lora: str = "merge") -> dict:
    """`lora`: "merge" folds LoRA adapters into out/lm's weights; "peft" writes them to out/lora."""
    if lora not in LORA_EXPORTS:
        raise ValueError(f"lora={lora!r}: choose one of {', '.join(LORA_EXPORTS)}")
    tag = resolve_tag(run_dir, tag)
    model, tokenizer, cfg = empty_run_model(run_dir, tag)
    if lora == "peft" and cfg.model.lora.rank == 0:
        raise ValueError(f"--lora peft: checkpoint {tag} has no LoRA adapters (model.lora.rank=0); leave out --lora")
    out = Path(out)
    flamingo, lm, adapter = out / "flamingo", out / "lm", out / "lora"
    cfg.model.lm.path = cfg.model.vision.path = None  # the folder holds everything: no pointer back
    for d in (flamingo, lm, adapter):
        shutil.rmtree(d, ignore_errors=True)  # no shard of an earlier export left beside the new ones
    flamingo.mkdir(parents=True)
    from tqdm import tqdm

    with CheckpointWeights(run_dir, tag, model, work=out / ".convert") as weights, \
            WeightWriter(flamingo, max_shard_bytes=max_shard_bytes) as writer:
        for name in tqdm(weights.names(), desc=f"export {tag}", unit="tensor", disable=None if progress is None
                         else not progress, file=sys.stderr):
            writer.add(name, weights.read(name).to(dtype))
    (flamingo / FLAMINGO_JSON).write_text(json.dumps(flamingo_meta(model, dataclasses.asdict(cfg.model)), indent=2))
    tokenizer.save_pretrained(flamingo)
    write_lm(flamingo, lm, max_shard_bytes=max_shard_bytes, lora=lora)
    tokenizer.save_pretrained(lm)
    res = {"tag": tag, "flamingo": str(flamingo), "lm": str(lm)}
    if lora == "peft":
        write_peft_adapter(flamingo, adapter, base_model=str(lm.resolve()))
        res["lora"] = str(adapter)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="furnace-export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="the exported weights' dtype")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (the memory export holds)")
    p.add_argument("--lora", default="merge", choices=LORA_EXPORTS,
                   help="LoRA adapters: merged into OUT/lm's weights, or a peft adapter folder OUT/lora over them")
    a = p.parse_args(argv)
    try:
        res = export(a.run_dir, a.out, a.tag, dtype=DTYPES[a.dtype], max_shard_bytes=int(a.max_shard_gb * 2**30),
                     lora=a.lora)
    except (FileNotFoundError, CheckpointError, ValueError) as e:  # ValueError: ConfigError, a damaged config.json
        print(f"furnace export: {e}", file=sys.stderr)
        return 2
    print(f"exported {res['tag']}: whole model -> {res['flamingo']}, LM alone -> {res['lm']}"
          + (f", its LoRA adapters (peft) -> {res['lora']}" if "lora" in res else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
