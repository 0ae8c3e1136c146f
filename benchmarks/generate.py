"""Decoding speed, memory and caption quality of a model at each precision: fp32, bf16, and the
LM's linear weights in int8 (bitsandbytes LLM.int8()) and 4-bit NF4.

    python benchmarks/generate.py --model runs/demo --shards data/demo/val-000000.tar \
        --template "<image>{caption}<|endofchunk|>" --out benchmarks/results/generate-cpu.json

For each mode, on the same held-out captions (greedy, batched, KV cache):
    tokens_per_s       generated tokens (up to each row's <|endofchunk|>) over the decoding time
    model_bytes        parameters and buffers as stored (quantised weights at their packed size)
    lm_linear_bytes    the weights quantisation touches, before -> after
    peak_gb            CUDA peak allocation (GPU only; on the CPU the process's RSS mixes modes)
    agreement          captions identical to fp32's, as a fraction
    CIDEr, BLEU-4      pycocoevalcap against the references, and their delta to fp32
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from furnace.eval import sets  # noqa: E402
from furnace.eval.scoring import ModelScorer  # noqa: E402
from furnace.evaluate import load_model  # noqa: E402
from furnace.model.quantize import quantize_lm  # noqa: E402
from furnace.training.caption_scores import caption_scores  # noqa: E402
from furnace.training.metrics import run_info  # noqa: E402

MODES = ("fp32", "bf16", "int8", "int4")


def stored_bytes(model) -> int:
    """Parameters and buffers at their stored size (a quantised weight's int8 / packed data and
    its scales: bitsandbytes keeps them on the weight and its quant_state)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()
        for extra in ("SCB",):
            if getattr(t, extra, None) is not None:
                total += getattr(t, extra).numel() * getattr(t, extra).element_size()
        state = getattr(t, "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def run_mode(mode: str, a, items: list, device: str) -> dict:
    model, tokenizer, _ = load_model(a.model)
    model = model.to(device, torch.bfloat16 if mode == "bf16" else torch.float32).eval()
    quant = quantize_lm(model, mode) if mode in ("int8", "int4") else None
    scorer = ModelScorer(model, tokenizer, device)
    prompt = a.template[: a.template.rindex("{")]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    captions, tokens, seconds = [], 0, 0.0
    for start in range(0, len(items), a.batch_size):
        batch = items[start: start + a.batch_size]
        for im in batch:
            scorer.pixels(im["image"])  # decoded before the clock starts
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = scorer.generate([prompt] * len(batch), [[im["image"]] for im in batch], max_new_tokens=a.max_new_tokens)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        captions += out
        tokens += sum(len(scorer.text.encode(c)) + 1 for c in out)  # + its <|endofchunk|>
    row = {"mode": mode, "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
           "model_bytes": stored_bytes(model), "quantized": quant,
           "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None}
    scores = caption_scores({i: c for i, c in enumerate(captions)}, {i: it["captions"] for i, it in enumerate(items)})
    row.update({k: scores[k] for k in ("CIDEr", "BLEU-4")}, tokenizer=scores["tokenizer"])
    return row, captions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model folder or a training run directory")
    p.add_argument("--shards", help="webdataset caption shards (held-out)")
    p.add_argument("--annotations", help="or a COCO captions JSON with --images")
    p.add_argument("--images")
    p.add_argument("--template", default="<image>Output:{caption}<|endofchunk|>")
    p.add_argument("--limit", type=int, default=256, help="captions decoded per mode")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    skipped: collections.Counter = collections.Counter()
    items = (sets.caption_shards(a.shards, skipped) if a.shards
             else sets.coco_captions(a.annotations, a.images, skipped))[: a.limit]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, base = [], None
    for mode in a.modes.split(","):
        row, captions = run_mode(mode, a, items, device)
        if base is None:
            base = (row, captions)
        row["agreement_with_" + base[0]["mode"]] = sum(x == y for x, y in zip(captions, base[1])) / len(captions)
        row["CIDEr_delta"] = row["CIDEr"] - base[0]["CIDEr"]
        row["BLEU-4_delta"] = row["BLEU-4"] - base[0]["BLEU-4"]
        rows.append(row)
        print(f"{mode:5s} {row['tokens_per_s']:9.1f} tok/s  {row['model_bytes'] / 2**20:8.2f} MiB  "
              f"agreement {row['agreement_with_' + base[0]['mode']]:.3f}  CIDEr {row['CIDEr']:.3f} "
              f"({row['CIDEr_delta']:+.3f})  BLEU-4 {row['BLEU-4']:.3f}")
    report = {**run_info(argv), "model": a.model, "captions": len(items), "batch_size": a.batch_size,
              "max_new_tokens": a.max_new_tokens, "template": a.template, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
