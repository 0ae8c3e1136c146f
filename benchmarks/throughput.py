"""End-to-end training throughput through the real trainer path (DeepSpeed engine).

    python benchmarks/throughput.py --preset flamingo-1b --steps 20 --out benchmarks/results/throughput-h100.json
    python benchmarks/throughput.py --preset demo --steps 5 --out /tmp/demo.json            # CPU, seconds
    python benchmarks/throughput.py --preset flamingo-1b --ablate all --out ...             # side-by-side ablations
    torchrun --nproc_per_node 8 benchmarks/throughput.py --preset flamingo-9b ...           # several ranks

Warm-up steps, then timed optimizer steps. Reported per variant: step time (median, p10, p90),
tokens/s and samples/s (whole job), model TFLOP/s and MFU against the device's dense bf16
peak, peak memory per rank, and the time split between data, forward, backward and optimizer
step (phases are separated by device synchronisation, which the split costs a little).

Data: the real loader on the synthetic shards (built if missing) or `--synthetic-data` random
tensors, which removes the loader from the measurement.

Setup is the trainer's own builder (`furnace.training.build.build`). A preset shaped like a
pretrained LM (model.lm.vocab_size set) gets a tokenizer like that LM's (`lm_like_tokenizer`):
<image> and <|endofchunk|> are new trainable rows of its vocabulary, as in a user's run, so
gradients reach the decoder layers before the first xattn block.

FLOPs: `furnace.training.metrics.flamingo_flops_per_sample` (its docstring has the formula): frozen parts
count forward plus activation-gradient backward only (no weight-gradient GEMMs); a frozen vision
tower counts forward only. Tokens are the non-padding tokens of the batches, and the FLOPs are
those of the samples at their real lengths (a packed row's samples each), so MFU counts useful
work only: padding lowers it. `--caption-data 10,40` feeds LAION-like caption lengths; `--ablate
pack` compares one sample a row with packed rows (`data.pack`).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from furnace.config import ConfigError, load_config, validate  # noqa: E402
from furnace.data.synthetic import vocabulary  # noqa: E402
from furnace.data.tokenizer import load_tokenizer, save_tokenizer  # noqa: E402
from furnace.parallel.topology import Topology  # noqa: E402
from furnace.tokens import EOC_TOKEN, IMAGE_TOKEN, build_labels  # noqa: E402
from furnace.training.build import build  # noqa: E402
from furnace.training.distributed import init_distributed  # noqa: E402
from furnace.training.metrics import (StepShape, device_peak_tflops, flamingo_flops_per_sample,  # noqa: E402
                                      peak_memory_gb, percentiles, run_info)

ABLATIONS = {
    # name: (baseline overrides, [variant overrides, ...], what it compares)
    "attention": (["model.attention_backend=triton"], [["model.attention_backend=reference"]],
                  "Triton attention vs the SDPA reference path"),
    "loss_scale": (["train.precision=fp16", "train.fused_loss_scaling=true"],
                   [["train.precision=fp16", "train.fused_loss_scaling=false"]],
                   "fp16: fused grad stats vs DeepSpeed's own overflow check / norm / unscale"),
    "ckpt": (["model.activation_checkpointing=false"], [["model.activation_checkpointing=true"]],
             "activation checkpointing off vs on"),
    "zero": (["parallel.zero_stage=3"], [["parallel.zero_stage=1"], ["parallel.zero_stage=2"]],
             "ZeRO-3 vs ZeRO-1 / ZeRO-2"),
    "micro_batch": ([], [["train.micro_batch_size=16"], ["train.micro_batch_size=32"]],
                    "the preset's micro-batch vs 16 / 32 samples (fewer, larger launches)"),
    "zero3_gather": (["parallel.zero_stage=3", "parallel.zero3_gather=block"],
                     [["parallel.zero_stage=3", "parallel.zero3_gather=module"]],
                     "ZeRO-3 gathering per block vs per module"),
    "compile": (["model.compile=none"], [["model.compile=vision,perceiver"]],
                "eager vs torch.compile per block of the tower and the resampler"),
    "fused": (["model.fused_kernels=none"], [["model.fused_kernels=all"]],
              "the model's own norms / SwiGLU / RoPE / logits + CE vs the fused kernels (no full logits)"),
    "xattn_kernel": (["model.xattn.kernel=general"], [["model.xattn.kernel=media"]],
                     "cross-attention through the general segment-mask kernel vs media_attention"),
    "pack": (["data.pack=false"], [["data.pack=true"]],
             "one sample a row vs packed rows (with --caption-data: LAION-length captions)"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--synthetic-data", action="store_true", help="random tensors instead of the loader")
    p.add_argument("--caption-data", default=None, metavar="MIN,MAX",
                   help="random captions of MIN..MAX tokens (LAION-like: 10,40), one image each, one a row "
                        "padded to data.max_length or packed with data.pack=true (implies --synthetic-data)")
    p.add_argument("--ablate", default="none", help=f"comma list of {sorted(ABLATIONS)}, 'all' or 'none'")
    p.add_argument("--profile", default=None,
                   help="write a torch.profiler table of the baseline's top ops (2 extra steps) to this file")
    a = p.parse_args(argv)
    a.synthetic_data = a.synthetic_data or bool(a.caption_data)
    return a


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synthetic_batches(cfg, tokenizer, vocab: int, image_size: int, n: int = 4):
    """Full-length rows with max_images <image> tokens spread evenly (an <|endofchunk|> before
    each next one); random ids elsewhere; fixed random images. Cycles through n batches."""
    img_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    eoc_id = tokenizer.convert_tokens_to_ids(EOC_TOKEN)
    specials = torch.tensor(sorted({i for i in tokenizer.all_special_ids if i is not None} | {img_id, eoc_id}))
    filler = next(i for i in range(vocab) if i not in set(specials.tolist()))
    b, l, t = cfg.train.micro_batch_size, cfg.data.max_length, cfg.data.max_images
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (b, l), generator=g)
        ids[torch.isin(ids, specials)] = filler
        for k in range(t):
            pos = k * l // t
            ids[:, pos] = img_id
            if k:
                ids[:, pos - 1] = eoc_id
        mask = torch.ones_like(ids)
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "labels": build_labels(ids, mask, image_token_id=img_id, eoc_token_id=eoc_id),
                        "images": torch.randn(b, t, 1, 3, image_size, image_size, generator=g),
                        "media_valid": torch.ones(b, t, dtype=torch.bool)})
    while True:
        yield from batches


def caption_batches(cfg, tokenizer, vocab: int, image_size: int, lengths: tuple[int, int], n: int = 4):
    """LAION-like rows: captions of uniformly drawn lengths in `lengths` tokens, each `[bos]
    <image> words <|endofchunk|> [eos]`, one a row (padded to max_length) or, with data.pack,
    back to back up to max_length tokens and max_images images (position and segment ids as the
    loader's `collate_packed` makes them). Cycles through n batches."""
    img_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    eoc_id = tokenizer.convert_tokens_to_ids(EOC_TOKEN)
    specials = {i for i in tokenizer.all_special_ids if i is not None} | {img_id, eoc_id}
    words = torch.tensor([i for i in range(min(vocab, 4096)) if i not in specials])
    pad = tokenizer.pad_token_id or 0
    b, l, t, pack = cfg.train.micro_batch_size, cfg.data.max_length, cfg.data.max_images, cfg.data.pack
    g = torch.Generator().manual_seed(0)

    def sample():
        k = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g)) - 3
        return [img_id, *words[torch.randint(0, len(words), (k,), generator=g)].tolist(), eoc_id, pad]

    batches = []
    for _ in range(n):
        ids = torch.full((b, l), pad, dtype=torch.long)
        pos, seg, labels = torch.zeros_like(ids), torch.zeros_like(ids), torch.full_like(ids, -100)
        valid = torch.zeros(b, t, dtype=torch.bool)
        for r in range(b):
            off = imgs = k = 0
            while True:
                s = sample()
                if off + len(s) > l or imgs + 1 > t or (k and not pack):
                    break
                ids[r, off: off + len(s)] = torch.tensor(s)
                pos[r, off: off + len(s)] = torch.arange(len(s))
                seg[r, off: off + len(s)] = k + 1
                labels[r, off + 1: off + len(s) - 1] = ids[r, off + 1: off + len(s) - 1]  # words and eoc
                valid[r, imgs] = True
                off, imgs, k = off + len(s), imgs + 1, k + 1
        batch = {"input_ids": ids, "attention_mask": (seg > 0).long(), "labels": labels,
                 "images": torch.randn(b, t, 1, 3, image_size, image_size, generator=g), "media_valid": valid}
        if pack:
            batch.update(position_ids=pos, segment_ids=seg)
        batches.append(batch)
    while True:
        yield from batches


def lm_like_tokenizer(cfg):
    """For a preset shaped like a pretrained LM (model.lm.vocab_size set, neither data.tokenizer
    nor model.lm.path given), a stand-in for that LM's tokenizer: lm.vocab_size word-level rows
    (the synthetic captions' words, then filler), without <image> and <|endofchunk|>, loaded as
    a user's tokenizer folder is, which adds those two as new rows. None otherwise: the
    trainer's own choice (the demo's tokenizer sizes its LM)."""
    n = cfg.model.lm.vocab_size
    if not n or cfg.data.tokenizer or cfg.model.lm.path:
        return None
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", *sorted({w.lower() for w in vocabulary()})]
    words += [f"<filler{i}>" for i in range(n - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    with tempfile.TemporaryDirectory() as d:
        save_tokenizer(tok, d)
        return load_tokenizer(d)


def run_variant(name: str, cfg, args, world: int) -> dict:
    rank = dist.get_rank()
    dp = validate(cfg, world, check_paths=True)
    if cfg.parallel.pp > 1:
        raise ConfigError("throughput.py measures layout A (parallel.pp=1): the pipeline engine runs whole "
                          "steps only; --set parallel.pp=1")
    if cfg.model.attention_backend == "triton" and not torch.cuda.is_available():
        return {"variant": name, "skipped": "the Triton attention path needs CUDA"}
    if cfg.train.precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            return {"variant": name, "skipped": "DeepSpeed does not support fp16 on this device"}
    run = build(cfg, Topology(cfg.parallel.tp, cfg.parallel.pp), loaders=not args.synthetic_data,
                progress=rank == 0, tokenizer=lm_like_tokenizer(cfg))
    model, engine, device, gas = run.model, run.engine, run.device, run.grad_accum
    fp = {}  # FLOPs per sample by (tokens, images)

    def flops_for(seq_len: float, images: float) -> float:
        key = (round(seq_len, 2), round(images, 2))
        if key not in fp:
            fp[key] = flamingo_flops_per_sample(model, StepShape(seq_len=seq_len, images=images))["train"]
        return fp[key]

    if args.caption_data:
        lo, hi = (int(x) for x in args.caption_data.split(","))
        it = caption_batches(cfg, run.tokenizer, model.vocab_size, model.vision.image_size, (lo, hi))
    elif args.synthetic_data:
        it = synthetic_batches(cfg, run.tokenizer, model.vocab_size, model.vision.image_size)
    else:
        it = iter(run.train_loader)
    mem_at_start = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    prof = None
    records = []
    # The profiler runs on extra steps after the timed ones (its overhead stays out of the
    # numbers), and only for the first variant (the run's baseline).
    profile = bool(args.profile) and name == "baseline"
    n_prof = 2 if profile else 0
    for step in range(args.warmup + args.steps + n_prof):
        if profile and step == args.warmup + args.steps:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] +
                                          ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
            prof.__enter__()
        split = dict(data=0.0, forward=0.0, backward=0.0, step=0.0)
        tokens = samples = 0
        flops = 0.0
        sync()
        t_step = time.perf_counter()
        for _ in range(gas):
            t0 = time.perf_counter()
            batch = next(it)
            n_tok = int(batch["attention_mask"].sum())  # real tokens: padding does no useful work
            # samples: packed rows hold several (their segment ids count them)
            b = int(batch["segment_ids"].amax(1).sum()) if "segment_ids" in batch else batch["input_ids"].shape[0]
            n_img = float(batch["media_valid"].sum()) / b
            model.check_media(batch["input_ids"], batch["media_valid"])  # as the trainer: on the CPU batch
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            sync()
            t1 = time.perf_counter()
            loss = engine(batch)
            sync()
            t2 = time.perf_counter()
            engine.backward(loss)
            sync()
            t3 = time.perf_counter()
            engine.step()
            sync()
            t4 = time.perf_counter()
            split["data"] += t1 - t0
            split["forward"] += t2 - t1
            split["backward"] += t3 - t2
            split["step"] += t4 - t3
            tokens += n_tok
            samples += b
            flops += b * flops_for(n_tok / b, n_img)
        dt = time.perf_counter() - t_step
        if args.warmup <= step < args.warmup + args.steps:
            records.append({"time": dt, "tokens": tokens, "samples": samples, "flops": flops, **split})
    if prof is not None:
        prof.__exit__(None, None, None)
        if rank == 0:
            key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=30)
            Path(args.profile).write_text(f"torch.profiler, {n_prof} steps after the timed ones, sorted by {key}\n"
                                          + table)
    # Whole-job rates: every dp rank processes its own samples (tp/pp peers share theirs).
    n_model = world // dp
    totals = torch.tensor([sum(r["tokens"] for r in records), sum(r["samples"] for r in records),
                           sum(r["flops"] for r in records)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    totals /= n_model
    times = [r["time"] for r in records]
    elapsed = sum(times)
    mem = peak_memory_gb()
    mems = [None] * world
    dist.all_gather_object(mems, round(mem, 3))
    # Without this the next variant starts with this one's weights and optimizer state still on
    # the GPU (ZeRO hooks keep the model alive): 6 GB more a variant on flamingo-1b.
    engine.destroy()
    peak = device_peak_tflops()
    tflops = float(totals[2]) / elapsed / 1e12
    res = {
        "variant": name, "overrides": getattr(cfg, "_overrides", []),
        "step_time_s": {"median": statistics.median(times), **percentiles(times)},
        "tokens_per_s": float(totals[0]) / elapsed, "samples_per_s": float(totals[1]) / elapsed,
        "model_tflops": tflops, "model_tflops_per_gpu": tflops / world,
        "mfu": (tflops / world / peak) if peak else None, "peak_bf16_tflops_per_gpu": peak,
        "peak_memory_gb_per_rank": mems,
        "memory_gb_at_start": round(mem_at_start, 3),
        "time_split_s_per_step": {k: sum(r[k] for r in records) / len(records)
                                  for k in ("data", "forward", "backward", "step")},
        "train_flops_per_sample": run.flops["train"],
        # the FLOP model depends on it: new rows put the first decoder layers on the gradient path
        "tokenizer": {"size": len(run.tokenizer),
                      "new_token_rows": 0 if model.new_tokens is None else model.new_tokens.count},
        "layout": {"world": world, "dp": dp, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
                   "zero_stage": cfg.parallel.zero_stage, "grad_accum": gas,
                   "micro_batch": cfg.train.micro_batch_size, "global_batch": cfg.train.global_batch_size},
        "precision": cfg.train.precision, "attention_backend": cfg.model.attention_backend,
        "activation_checkpointing": cfg.model.activation_checkpointing,
    }
    return res


def variants(args):
    """(name, overrides) in run order: the baseline first, then each ablation's baseline and variants."""
    out = [("baseline", [])]
    names = sorted(ABLATIONS) if args.ablate == "all" else [a for a in args.ablate.split(",") if a and a != "none"]
    for a in names:
        if a not in ABLATIONS:
            raise ConfigError(f"--ablate: unknown ablation {a!r}; choose from {sorted(ABLATIONS)}, all or none")
        base, variant_list, _ = ABLATIONS[a]
        out.append((f"{a}:baseline", base))
        out.extend((f"{a}:{' '.join(v)}", v) for v in variant_list)
    return out


def effective_config(cfg) -> str:
    """The config as the run will see it ("auto" attention resolved), to spot duplicate variants."""
    d = dataclasses.asdict(cfg)
    if d["model"]["attention_backend"] == "auto":
        d["model"]["attention_backend"] = "triton" if torch.cuda.is_available() else "reference"
    return json.dumps(d, sort_keys=True, default=str)


def print_table(results: list[dict]) -> None:
    head = f"{'variant':44s} {'step s':>8s} {'tok/s':>10s} {'smp/s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {'mem GB':>7s}"
    print(head)
    print("-" * len(head))
    for r in results:
        if "skipped" in r or "error" in r:
            print(f"{r['variant']:44s} {'skipped' if 'skipped' in r else 'failed'}: {r.get('skipped', r.get('error'))}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['variant']:44s} {r['step_time_s']['median']:8.3f} {r['tokens_per_s']:10.0f} "
              f"{r['samples_per_s']:8.1f} {r['model_tflops']:8.3f} {mfu:>6s} {max(r['peak_memory_gb_per_rank']):7.2f}")
    by = {r["variant"]: r for r in results if "skipped" not in r and "error" not in r}
    for a, (_, _, what) in ABLATIONS.items():
        base = by.get(f"{a}:baseline")
        if base is None:
            continue
        for name, r in by.items():
            if name.startswith(f"{a}:") and name != f"{a}:baseline":
                ratio = r["step_time_s"]["median"] / base["step_time_s"]["median"]
                print(f"  {what}: {name.split(':', 1)[1]} takes {ratio:.2f}x the baseline step time")


def write_report(args, results: list[dict]) -> None:
    out = {**run_info(), "preset": args.preset, "steps": args.steps, "warmup": args.warmup,
           "data": (f"LAION-like captions of {args.caption_data} tokens" if args.caption_data
                    else "synthetic tensors" if args.synthetic_data else "loader on the synthetic shards"),
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's per-call deprecations
    args = parse_args(argv)
    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    results = []
    done = {}  # effective config -> result: an ablation's baseline that equals the run's is not re-run
    try:
        for name, sets in variants(args):
            cfg = load_config(args.preset, [*args.set, *sets])
            cfg._overrides = [*args.set, *sets]
            key = effective_config(cfg)
            if key in done:
                results.append({**done[key], "variant": name, "overrides": cfg._overrides,
                                "same_run_as": done[key]["variant"]})
                if rank == 0:
                    print(f"[{name}] same configuration as [{done[key]['variant']}]: not re-run", flush=True)
                continue
            if rank == 0:
                print(f"[{name}] {args.warmup} warm-up + {args.steps} timed steps", flush=True)
            t0 = time.perf_counter()
            try:
                results.append(run_variant(name, cfg, args, world))
            except (ConfigError, KeyboardInterrupt):
                raise
            except Exception as e:
                if world > 1:  # the other ranks may be inside a collective: stop them all
                    raise
                # one process: a variant that fails (out of memory, say) must not cost the others
                results.append({"variant": name, "overrides": cfg._overrides, "error": f"{type(e).__name__}: {e}"})
                print(f"[{name}] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            results[-1]["wall_s"] = round(time.perf_counter() - t0, 1)
            done[key] = results[-1]
            gc.collect()  # free the variant's engine before the next one is built
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if rank == 0:  # after every variant, so a run cut short still leaves its numbers
                write_report(args, results)
    except ConfigError as e:
        if rank == 0:
            print(f"throughput: config error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        write_report(args, results)
        print_table(results)
        print(f"wrote {args.out}")
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
