"""Building a Flamingo from a pretrained LM across ranks: each rank's peak host memory and its
time to a ready engine, per layout, on CPU ranks (gloo) or GPUs.

    python benchmarks/load.py --out benchmarks/results/load-cpu.json
    python benchmarks/load.py --layouts zero3_dp1,zero3_dp2 --hidden 2048 --layers 16 --out /tmp/load.json

The parent writes one local HF Llama checkpoint (bf16 safetensors shards + index, as the hub
ships them) and a small CLIP tower, then runs each layout as its own torchrun job of the
builder train.py uses (`build(cfg, topology, loaders=False)`, the finetune preset: LM and tower
frozen, resampler and xattn blocks trained). Per rank:

    rss_before_gib   resident memory once the libraries are imported, before anything is built
    peak_rss_gib     the process's peak resident memory (getrusage), once the engine is ready
    build_s          wall time of build()
    held_gib         peak - before: what building and loading cost this rank

`checkpoint_gib` is the LM's size on disk. Sharded loading (issue #18) aims at held ~ the
rank's share of the model and optimizer plus one tensor.

With `--fresh`, nothing is written or read: the same shapes (the Llama, the CLIP tower) are drawn
from the seed (`model.lm.path` / `model.vision.path` unset), each rank keeping its share of each
piece as it is drawn (`furnace.parallel.fresh`); `checkpoint_gib` is then what the LM would
take in bf16. Each rank first builds the model alone (`build_weights`, what `build` makes before
the engine) and records

    weights_peak_rss_gib, weights_held_gib, weights_s    its peak memory then (and - before), its time

With `--after`, each layout then goes on as a run would: one training step, greedy captions
through the model as the ranks hold it (no rank builds a whole copy), a checkpoint, and
`furnace-export` of it (bf16) in a process of its own:

    peak_rss_after_step_gib / _after_eval_gib / _after_save_gib   each rank's peak so far
    export.peak_rss_gib, export.s                                  the export process (0.1 GiB shards)
    export.conversion_peak_rss_gib                                 its ds_to_universal child
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from furnace.config import load_config, validate  # noqa: E402
from furnace.parallel.topology import Topology  # noqa: E402
from furnace.training.build import build  # noqa: E402
from furnace.training.distributed import init_distributed  # noqa: E402
from furnace.training.metrics import run_info  # noqa: E402

# name: (ranks, extra --set items)
LAYOUTS = {
    "zero3_dp1": (1, ("parallel.zero_stage=3",)),
    "zero3_dp2": (2, ("parallel.zero_stage=3",)),
    "zero3_dp4": (4, ("parallel.zero_stage=3",)),
    "tp2": (2, ("parallel.tp=2", "parallel.zero_stage=3")),
    "pp2": (2, ("parallel.pp=2", "parallel.zero_stage=1")),
}
GIB = 2 ** 30
EXPORT_SHARD_GIB = 0.1  # small next to the model, so the export's peak shows what streaming holds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {sorted(LAYOUTS)}")
    p.add_argument("--hidden", type=int, default=1024, help="the LM's hidden size")
    p.add_argument("--layers", type=int, default=12, help="the LM's decoder layers")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--after", action="store_true", help="also train a step, evaluate, save and export")
    p.add_argument("--fresh", action="store_true", help="draw the model from the seed instead of loading it")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON path rank 0 writes
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)  # where --after saves
    p.add_argument("--models", default=None, help=argparse.SUPPRESS)  # the folder with llama/ and clip/
    p.add_argument("--write-models", default=None, help=argparse.SUPPRESS)  # in a child: its memory goes back
    return p.parse_args(argv)


def write_models(out: Path, hidden: int, layers: int, vocab: int) -> dict:
    """A random Llama (bf16, sharded safetensors) with a word-level tokenizer, and a CLIP tower."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", *(f"w{i}" for i in range(vocab - 4))]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # drawn in bf16: a 3B model fits the machine writing it
    cfg = LlamaConfig(**lm_config(hidden, layers, vocab), max_position_embeddings=256, tie_word_embeddings=False)
    lm = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in lm.parameters())
    lm.save_pretrained(out / "llama", max_shard_size="200MB")
    del lm
    tok.save_pretrained(out / "llama")
    CLIPVisionModel(CLIPVisionConfig(**TOWER)).save_pretrained(out / "clip")
    size = sum(f.stat().st_size for f in (out / "llama").glob("*.safetensors"))
    return {"lm_params": params, "checkpoint_gib": size / GIB, "shards": len(list((out / "llama").glob("*.safetensors"))),
            "hidden": hidden, "layers": layers, "vocab": vocab}


def lm_config(hidden: int, layers: int, vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128)


TOWER = dict(image_size=64, patch_size=16, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
             num_attention_heads=4)


def fresh_sets(hidden: int, layers: int, vocab: int) -> list[str]:
    """The --set items of a fresh model of write_models' shapes."""
    c, t = lm_config(hidden, layers, vocab), TOWER
    return ["model.lm.path=null", "model.vision.path=null", f"model.lm.vocab_size={vocab}",
            f"model.lm.hidden_size={hidden}", f"model.lm.intermediate_size={c['intermediate_size']}",
            f"model.lm.num_layers={layers}", f"model.lm.num_heads={c['num_attention_heads']}",
            f"model.lm.num_kv_heads={c['num_key_value_heads']}", "model.lm.max_position_embeddings=256",
            "model.vision.kind=clip", f"model.vision.image_size={t['image_size']}",
            f"model.vision.patch_size={t['patch_size']}", f"model.vision.hidden_size={t['hidden_size']}",
            f"model.vision.intermediate_size={t['intermediate_size']}", f"model.vision.num_layers={t['num_hidden_layers']}",
            f"model.vision.num_heads={t['num_attention_heads']}"]


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def _after_build(run, cfg, run_dir: Path) -> dict:
    """One training step, greedy captions and a checkpoint, as a run makes them; each rank's
    peak memory after each."""
    from furnace.model.flamingo_io import architecture
    from furnace.parallel.pipeline import batch_to_pipe
    from furnace.parallel.staged import StagedFlamingo
    from furnace.tokens import build_labels
    from furnace.training import checkpoint as ckpt

    model, dev = run.model, run.device
    b, length = cfg.train.micro_batch_size, cfg.data.max_length
    torch.manual_seed(0)
    ids = torch.randint(4, model.base_vocab, (b, length))
    ids[:, 0] = model.image_token_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "images": torch.randn(b, 1, 1, 3, model.vision.image_size, model.vision.image_size),
             "media_valid": torch.ones(b, 1, dtype=torch.bool)}
    batch["labels"] = build_labels(ids, batch["attention_mask"], image_token_id=model.image_token_id,
                                   eoc_token_id=model.eoc_token_id)
    out = {}
    if run.pipe is not None:
        run.engine.train_batch(data_iter=iter([batch_to_pipe(batch)] * run.grad_accum))
    else:
        on_dev = {k: v.to(dev) for k, v in batch.items()}
        for _ in range(run.grad_accum):
            run.engine.backward(run.engine(on_dev))
            run.engine.step()
    out["peak_rss_after_step_gib"] = _peak_gib()
    runner = StagedFlamingo(model, run.pipe, run.topology) if run.pipe is not None else model
    synced = run.topology.get_data_parallel_group() if run.pipe is None and cfg.parallel.zero_stage == 3 else None
    runner.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        runner.generate(ids[:, :1].to(dev), None, batch["images"].to(dev), batch["media_valid"].to(dev),
                        max_new_tokens=8, synced_group=synced)
    out["eval_s"] = time.perf_counter() - t0
    out["peak_rss_after_eval_gib"] = _peak_gib()
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        run.tokenizer.save_pretrained(run_dir / "tokenizer")
        (run_dir / ckpt.ARCHITECTURE).write_text(json.dumps(architecture(model)))
    t0 = time.perf_counter()
    ckpt.save_checkpoint(run.engine, run_dir, 1, {"step": 1}, ckpt.config_snapshot(cfg), {}, keep=1)
    out["save_s"] = time.perf_counter() - t0
    out["peak_rss_after_save_gib"] = _peak_gib()
    return out


def _weights(cfg, tp: int, pp: int, before: float) -> dict:
    """This rank's model as `build` makes it, without the engine: its peak memory and time."""
    import gc

    from furnace.training import engine as eng
    from furnace.training.build import build_tokenizer, build_weights

    topology = Topology(tp, pp)
    zero3 = (eng.build_ds_config(cfg, topology.dp, 1) if cfg.parallel.zero_stage == 3 and pp == 1 else None)
    dist.barrier()
    t0 = time.perf_counter()
    model = build_weights(cfg, build_tokenizer(cfg, loaders=False), topology, zero3=zero3)
    dist.barrier()
    out = {"weights_s": time.perf_counter() - t0, "weights_peak_rss_gib": _peak_gib(),
           "weights_held_gib": _peak_gib() - before}
    del model
    gc.collect()
    return out


def worker(args) -> None:
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = (fresh_sets(args.hidden, args.layers, args.vocab) if args.fresh else
             [f"model.lm.path={Path(args.models) / 'llama'}", f"model.vision.path={Path(args.models) / 'clip'}"])
    cfg = load_config("finetune", [*model, "data.max_length=64", "train.micro_batch_size=1", *args.set])
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    cfg.train.global_batch_size = world // (tp * pp)
    validate(cfg, world, check_paths=False)
    before = _rss_gib()
    rec = {"rank": rank, "rss_before_gib": before}
    if args.fresh:  # the model alone first: the engine's own buffers come on top of it in build()
        rec.update(_weights(cfg, tp, pp, before))
    dist.barrier()
    t0 = time.perf_counter()
    run = build(cfg, Topology(tp, pp), loaders=False)
    dist.barrier()
    took = time.perf_counter() - t0
    peak = _peak_gib()
    rec.update(peak_rss_gib=peak, held_gib=peak - before, build_s=took)
    if args.after:
        rec.update(_after_build(run, cfg, Path(args.run_dir)))
    out = [None] * world
    dist.all_gather_object(out, rec)
    if rank == 0:
        Path(args.worker).write_text(json.dumps(out))
    dist.barrier()


def _export(run_dir: Path, out: Path) -> dict:
    """furnace-export of the saved run in a process of its own: its peak memory and time."""
    wrapper = ("import resource, sys\nfrom furnace.export import main\n"
               "code = main(sys.argv[1:])\n"
               "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
               " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\nsys.exit(code)\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", wrapper, str(run_dir), "--out", str(out), "--dtype", "bf16",
                          "--max-shard-gb", str(EXPORT_SHARD_GIB)], capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"export failed: {res.stderr[-2000:]}")
    own, child = (int(x) / 2 ** 20 for x in res.stdout.split("PEAK")[-1].split()[:2])  # KiB
    size = sum(f.stat().st_size for f in (out / "flamingo").glob("*.safetensors"))
    return {"peak_rss_gib": own, "conversion_peak_rss_gib": child, "s": took, "flamingo_gib": size / GIB,
            "max_shard_gib": EXPORT_SHARD_GIB}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.write_models:
        info = write_models(Path(args.write_models), args.hidden, args.layers, args.vocab)
        (Path(args.write_models) / "info.json").write_text(json.dumps(info))
        return 0
    if not args.out:
        print("load.py: --out FILE.json is required", file=sys.stderr)
        return 2
    results = {}
    with tempfile.TemporaryDirectory() as models:
        if args.fresh:
            c = lm_config(args.hidden, args.layers, args.vocab)
            h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
            kv = c["num_key_value_heads"] * 64
            params = 2 * args.vocab * h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
            model = {"lm_params": params, "checkpoint_gib": 2 * params / GIB, "shards": 0, "hidden": args.hidden,
                     "layers": args.layers, "vocab": args.vocab, "fresh": True}
            print(f"drawing a {args.layers}-layer, hidden {args.hidden} Llama ({params / 1e6:.0f}M parameters)",
                  flush=True)
        else:
            print(f"writing a {args.layers}-layer, hidden {args.hidden} Llama checkpoint ...", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write-models", models, "--hidden",
                            str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)], check=True)
            model = json.loads((Path(models) / "info.json").read_text())
            print(f"  {model['lm_params'] / 1e6:.0f}M parameters, {model['checkpoint_gib']:.2f} GiB in "
                  f"{model['shards']} shards", flush=True)
        for name in args.layouts.split(","):
            nproc, extra = LAYOUTS[name]
            with tempfile.TemporaryDirectory() as td:
                f = Path(td) / "ranks.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                       str(Path(__file__).resolve()), "--worker", str(f), "--models", models,
                       "--run-dir", str(Path(td) / "run"), "--hidden", str(args.hidden), "--layers", str(args.layers),
                       "--vocab", str(args.vocab)] + (["--after"] if args.after else []) + (["--fresh"] if args.fresh else [])
                for s in (*extra, *args.set):
                    cmd += ["--set", s]
                env = {**os.environ, "OMP_NUM_THREADS": "1",
                       "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")}
                res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if res.returncode != 0:
                    print(res.stderr[-3000:], file=sys.stderr)
                    return 1
                ranks = json.loads(f.read_text())
                exported = _export(Path(td) / "run", Path(td) / "exported") if args.after else None
            results[name] = {"ranks": nproc, "sets": list(extra), "per_rank": ranks, "export": exported,
                             "max_peak_rss_gib": max(r["peak_rss_gib"] for r in ranks),
                             "max_held_gib": max(r["held_gib"] for r in ranks),
                             "held_vs_checkpoint": max(r["held_gib"] for r in ranks) / model["checkpoint_gib"],
                             "build_s": max(r["build_s"] for r in ranks)}
            if args.fresh:
                results[name]["max_weights_held_gib"] = max(r["weights_held_gib"] for r in ranks)
            r = results[name]
            if args.fresh:
                print(f"{name}: the model alone: held {r['max_weights_held_gib']:.2f} GiB a rank", flush=True)
            print(f"{name}: {nproc} ranks, peak RSS {r['max_peak_rss_gib']:.2f} GiB a rank (held {r['max_held_gib']:.2f} "
                  f"= {r['held_vs_checkpoint']:.1f}x the checkpoint), build {r['build_s']:.1f} s", flush=True)
            if exported is not None:
                r["max_peak_rss_after_save_gib"] = max(x["peak_rss_after_save_gib"] for x in ranks)
                print(f"  after a step, captions and a save: peak RSS {r['max_peak_rss_after_save_gib']:.2f} GiB a rank; "
                      f"export {exported['peak_rss_gib']:.2f} GiB peak (conversion {exported['conversion_peak_rss_gib']:.2f}),"
                      f" {exported['s']:.1f} s", flush=True)
    doc = {"benchmark": "load", "model": model, "overrides": args.set, **run_info(), "layouts": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
