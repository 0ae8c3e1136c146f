"""Recompute the MFU of committed throughput results with the current FLOP model.

    python benchmarks/recompute_mfu.py                      # benchmarks/results/throughput-h100*.json
    python benchmarks/recompute_mfu.py path/to/throughput.json ...

Each measured variant keeps its fields as measured and gains `train_flops_per_sample_recomputed`,
`model_tflops_recomputed` and `mfu_recomputed`; the file gains a `flop_model` note. The model is
rebuilt on the meta device from the file's preset and the variant's overrides, with the tokenizer
the run had (its `tokenizer` field; files from before the benchmark recorded one used the demo's
word-level tokenizer, whose <image> / <|endofchunk|> lie inside the LM's vocabulary: no new
rows). Only synthetic-tensor runs are recomputed: every sample there is max_length tokens and
max_images images, so samples/s x FLOPs per sample is the job's FLOP rate; a loader run's average
shape is not recorded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from furnace.config import load_config  # noqa: E402
from furnace.data.synthetic import demo_tokenizer  # noqa: E402
from furnace.model.flamingo import build_flamingo  # noqa: E402
from furnace.training.metrics import StepShape, flamingo_flops_per_sample  # noqa: E402

NOTE = ("mfu_recomputed: samples_per_s x train_flops_per_sample_recomputed / gpus / peak, the FLOP model of "
        "furnace.training.metrics as of issue #23 item 6: decoder layers before the first xattn block get no "
        "backward unless something upstream of them (the LM's embedding, new token rows) trains; attention "
        "products 2x forward in backward; new token rows' head weight gradient; a trained tower's patch "
        "embedding weight gradient only. A result without a `tokenizer` field ran with the demo's tokenizer (no new "
        "token rows). The other fields are as measured (mfu with the FLOP model of the time).")


def flops_per_sample(preset: str, overrides: list[str], tokenizer: dict | None) -> float:
    """Training FLOPs of one sample of the variant's model, built as the run built it."""
    cfg = load_config(preset, overrides)
    # the tokenizer's size decides the new rows (those past the LM's vocabulary); its ids do not
    # change the FLOPs. Unrecorded: the demo's (the benchmark's choice before it recorded one).
    size = len(demo_tokenizer()) if tokenizer is None else tokenizer["size"]
    with torch.device("meta"):  # shapes only: any size, no memory
        model = build_flamingo(cfg.model, vocab_size=size, image_token_id=size - 2, eoc_token_id=size - 1)
    rows = 0 if model.new_tokens is None else model.new_tokens.count
    if tokenizer is not None and rows != tokenizer["new_token_rows"]:
        raise ValueError(f"rebuilt model has {rows} new token rows; the run had {tokenizer['new_token_rows']}")
    return flamingo_flops_per_sample(model, StepShape(seq_len=cfg.data.max_length, images=cfg.data.max_images, frames=cfg.data.video_frames))["train"]


def recompute(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    lines = []
    if data.get("data") != "synthetic tensors":
        return [f"{path.name}: not synthetic tensors; left as is"]
    for r in data["results"]:
        if "step_time_s" not in r:  # skipped or failed
            continue
        f = flops_per_sample(data["preset"], r["overrides"], r.get("tokenizer"))
        tflops = r["samples_per_s"] * f / 1e12
        world = r["layout"]["world"]
        peak = r["peak_bf16_tflops_per_gpu"]
        r["train_flops_per_sample_recomputed"] = f
        r["model_tflops_recomputed"] = tflops
        r["mfu_recomputed"] = tflops / world / peak if peak else None
        if r["mfu_recomputed"] is not None and r["mfu"] is not None:
            lines.append(f"{path.name} {r['variant']}: MFU {100 * r['mfu']:.1f}% -> {100 * r['mfu_recomputed']:.1f}%")
    data["flop_model"] = NOTE
    path.write_text(json.dumps(data, indent=2))  # as throughput.py writes it
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path)
    args = p.parse_args(argv)
    files = args.files or sorted((ROOT / "benchmarks" / "results").glob("throughput-h100*.json"))
    for path in files:
        print("\n".join(recompute(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
