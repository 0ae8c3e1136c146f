"""Evaluate a model with the field's metrics: captioning (COCO / Flickr30k style), VQAv2,
image-text retrieval and zero-shot classification, 0- or few-shot.

    furnace-eval caption   --model M --annotations captions.json --images DIR   [--shards 'val-{0..3}.tar']
    furnace-eval vqa       --model M --questions q.json --annotations a.json --images DIR
    furnace-eval retrieval --model M --annotations captions.json --images DIR
    furnace-eval classify  --model M --images ROOT [--class-names names.json]
      [--shots 0 4 8] [--seed 0] [--demo-...] [--template T] [--batch-size 8] [--limit N] [--out DIR]
      [--num-beams K] [--quantize int8] [--dtype bf16]

M is an exported model folder (furnace-export's OUT/flamingo) or a training run directory (its
newest complete checkpoint, or --tag). Launched on several ranks (`torchrun --nproc_per_node N
-m furnace.evaluate ...`), each rank loads the model and scores its share of the set; rank 0
gathers, scores and writes OUT/report.json (device, versions, command, settings, scores per
shot count, what was skipped, every sample's output) and, for captioning and VQA, the
predictions in the official results format beside the references they were scored against.
With `--tp K` the model is split tensor-parallel over groups of K ranks (each reads only its cut
of each tensor; the vocabulary's logits are gathered), and the groups divide the set.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from furnace.eval import prompts, sets
from furnace.data.tokenizer import load_tokenizer
from furnace.eval.scoring import ModelScorer
from furnace.eval.tasks import Settings, outputs, score
from furnace.export import load_run_model
from furnace.generate import load
from furnace.model.flamingo_io import load_flamingo
from furnace.model.quantize import quantize_lm
from furnace.parallel.topology import Topology
from furnace.training.distributed import join_launched_group
from furnace.training.metrics import run_info

TASKS = ("caption", "vqa", "retrieval", "classify")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_NEW_TOKENS = {"caption": 20, "vqa": 5}


def load_model(path, tag: str | None = None, topology=None, device="cpu"):
    """(model, tokenizer, description) from an exported folder or a run directory; with a
    tensor-parallel `topology`, this rank's part (`furnace.generate.load`)."""
    path = Path(path)
    if topology is not None and topology.tp > 1:
        if tag is not None:
            raise ValueError("--tag with --tp: export that checkpoint (furnace-export --tag) and evaluate the export")
        model, tokenizer = load(path, device, topology)
        return model, tokenizer, {"model": str(path), "tp": topology.tp}
    if (path / "flamingo.json").is_file():
        return load_flamingo(path), load_tokenizer(path), {"model": str(path)}
    if (path / "checkpoints").is_dir():
        model, tokenizer, _, tag = load_run_model(path, tag)
        return model, tokenizer, {"model": str(path), "tag": tag}
    raise FileNotFoundError(f"{str(path)!r} is neither an exported model (no flamingo.json) nor a run directory "
                            "(no checkpoints/): pass furnace-export's OUT/flamingo or a train.run_dir")


def read_set(task: str, a, demo: bool = False):
    """(items, class names, skipped counts) of the evaluated set, or of the demonstration pool."""
    get = (lambda k: getattr(a, f"demo_{k}")) if demo else (lambda k: getattr(a, k))
    flag = "--demo-" if demo else "--"
    skipped: collections.Counter = collections.Counter()
    names: list = []
    if task in ("caption", "retrieval"):
        if get("shards"):
            items = sets.caption_shards(get("shards"), skipped)
        elif get("annotations") and get("images"):
            items = sets.coco_captions(get("annotations"), get("images"), skipped)
        else:
            raise sets.EvalSetError(f"{task} reads {flag}annotations (COCO captions JSON) with {flag}images, "
                                    f"or {flag}shards")
    elif task == "vqa":
        if not (get("questions") and get("annotations") and get("images")):
            raise sets.EvalSetError(f"vqa reads {flag}questions, {flag}annotations (VQAv2 JSON) and {flag}images")
        items = sets.vqa(get("questions"), get("annotations"), get("images"), skipped)
    else:
        if not get("images"):
            raise sets.EvalSetError(f"classify reads {flag}images ROOT with one subfolder of images per class")
        items, names = sets.image_folder(get("images"), a.class_names)
    return items, names, skipped


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="furnace-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--model", required=True, help="an exported model folder or a training run directory")
    p.add_argument("--tag", default=None, help="a run directory's checkpoint (default: the newest complete one)")
    for prefix in ("", "demo-"):
        what = "the demonstrations' " if prefix else ""
        p.add_argument(f"--{prefix}annotations", help=f"{what}COCO captions JSON (caption, retrieval) or VQAv2 "
                       "annotations JSON (vqa)")
        p.add_argument(f"--{prefix}images", help=f"{what}image folder (classify: one subfolder per class)")
        p.add_argument(f"--{prefix}shards", help=f"{what}webdataset caption shards, e.g. 'val-{{000000..000003}}.tar'")
        p.add_argument(f"--{prefix}questions", help=f"{what}VQAv2 questions JSON")
    p.add_argument("--ranking", choices=("auto", "embeddings", "likelihood"), default="auto",
                   help="retrieval: the contrastive heads' cosine (auto: when the model has them) or log p(caption | image)")
    p.add_argument("--class-names", help="classify: JSON list (sorted-subfolder order) or object of class names")
    p.add_argument("--shots", type=int, nargs="+", default=[0], help="demonstrations per query, e.g. 0 4 8 16 32")
    p.add_argument("--seed", type=int, default=0, help="draws the demonstrations")
    p.add_argument("--template", default=None, help="one example, its answer field last (default: open_flamingo's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="the first N items of the set only")
    p.add_argument("--score", choices=("mean", "sum"), default="mean",
                   help="retrieval/classify: a candidate's per-token mean log-prob, or the sum")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 20 (caption), 5 (vqa)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (a Java program) even with Java present")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="the LM's linear weights in int8 (LLM.int8()) or 4-bit NF4, by bitsandbytes")
    p.add_argument("--device", default=None, help="default: this rank's GPU when there is one, else the CPU")
    p.add_argument("--tp", type=int, default=1, help="split the model tensor-parallel over this many of the launched "
                   "ranks (a model one process cannot hold); the rest of the ranks divide the set")
    p.add_argument("--out", default=None, help="the report's folder (default: RUN/eval/TASK-TAG for a run, "
                   "else ./eval-TASK)")
    return p


def _check(p, a) -> None:
    for flag, ok in (("--shots", all(s >= 0 for s in a.shots)), ("--batch-size", a.batch_size >= 1), ("--tp", a.tp >= 1),
                     ("--limit", a.limit is None or a.limit >= 1), ("--num-beams", a.num_beams >= 1),
                     ("--max-new-tokens", a.max_new_tokens is None or a.max_new_tokens >= 1),
                     ("--repetition-penalty", a.repetition_penalty > 0)):
        if not ok:
            p.error(f"{flag} is out of range")
    if a.task == "retrieval" and any(a.shots):
        p.error("retrieval ranks zero-shot only: leave out --shots")
    if a.ranking != "auto" and a.task != "retrieval":
        p.error("--ranking applies to retrieval only")


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def evaluate(a, rank: int = 0, world: int = 1) -> dict | None:
    """Runs the evaluation `a` (parsed flags) on this rank; rank 0 returns the report."""
    started = time.time()
    items, names, skipped = read_set(a.task, a)
    if a.limit:
        items = items[: a.limit]
    if not items:
        raise sets.EvalSetError(f"the {a.task} set holds no readable item ({dict(skipped)})")
    pool_is_set = not any(getattr(a, f"demo_{k}") for k in ("annotations", "images", "shards", "questions"))
    pool = items if pool_is_set else read_set(a.task, a, demo=True)[0]
    template = a.template or prompts.TEMPLATES["caption" if a.task == "retrieval" else a.task]
    prompts.check_template(template, a.task)

    device = a.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    if world % a.tp:
        raise ValueError(f"--tp {a.tp} must divide the {world} launched ranks")
    topology = Topology(tp=a.tp) if a.tp > 1 else None
    model, tokenizer, source = load_model(a.model, a.tag, topology, device)
    model = model.to(device, DTYPES[a.dtype]).eval()
    quantized = None
    if a.quantize != "none":
        quantized = quantize_lm(model, a.quantize)
    scorer = ModelScorer(model, tokenizer, device)
    # data-parallel shares; tensor-parallel peers score the same items together
    dp_rank, dp_size = (topology.coord.dp, topology.dp) if topology is not None else (rank, world)
    share = list(range(dp_rank, len(items), dp_size))
    decoding = {"num_beams": a.num_beams, "length_penalty": a.length_penalty,
                "repetition_penalty": a.repetition_penalty}
    from tqdm import tqdm

    results, samples = {}, {}
    for shots in a.shots:
        s = Settings(task=a.task, template=template, shots=shots, seed=a.seed, batch_size=a.batch_size,
                     max_new_tokens=a.max_new_tokens or MAX_NEW_TOKENS.get(a.task, 20), decoding=decoding,
                     reduce=a.score, class_names=names, ranking=a.ranking)
        counts: collections.Counter = collections.Counter()
        with tqdm(total=len(share), desc=f"{a.task} {shots}-shot", unit="item", file=sys.stderr,
                  disable=True if rank else None) as bar:
            rows = outputs(s, scorer, items, share, pool, pool_is_set, counts, progress=bar)
        everyone = _gather((rows, dict(counts)), world)
        if topology is not None:  # one copy of each share: its tensor-parallel rank 0's
            everyone = [e for r, e in enumerate(everyone) if topology.coord_of(r).tp == 0]
        if rank == 0:
            rows = sorted((r for share_rows, _ in everyone for r in share_rows), key=lambda r: r["index"])
            total = collections.Counter(skipped)
            for _, c in everyone:
                total.update(c)
            results[str(shots)] = {**score(s, items, rows, meteor=not a.no_meteor), "skipped_items": dict(total)}
            samples[str(shots)] = rows
    if rank != 0:
        return None
    info = run_info()
    info["command"] = " ".join(["furnace-eval", *sys.argv[1:]]) if sys.argv[0].endswith("furnace-eval") else info["command"]
    return {"task": a.task, **source, **info, "world_size": world, "dtype": a.dtype, "quantized": quantized,
            "settings": {"template": template, "shots": a.shots, "seed": a.seed, "batch_size": a.batch_size,
                         "max_new_tokens": a.max_new_tokens or MAX_NEW_TOKENS.get(a.task),
                         "decoding": decoding, "score": a.score, "limit": a.limit,
                         "demonstrations": "the evaluated set, never the query itself" if pool_is_set else "--demo-* set"},
            "classes": names or None, "items": len(items), "seconds": round(time.time() - started, 2),
            "results": results, "samples": samples}


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    if report["task"] == "caption":  # COCO results + the references they were scored against
        for shots, rows in report["samples"].items():
            (out / f"predictions-{shots}shot.json").write_text(json.dumps(
                [{"image_id": r["id"], "caption": r["prediction"]} for r in rows], indent=1))
            ids = [r["id"] for r in rows]
            (out / f"references-{shots}shot.json").write_text(json.dumps({
                "info": {"description": "the references furnace-eval scored against"}, "licenses": [], "type": "captions",
                "images": [{"id": i} for i in ids],
                "annotations": [{"image_id": r["id"], "id": n, "caption": c} for n, (r, c) in enumerate(
                    (r, c) for r in rows for c in r["references"])]}, indent=1))
    elif report["task"] == "vqa":  # the VQAv2 results format
        for shots, rows in report["samples"].items():
            (out / f"predictions-{shots}shot.json").write_text(json.dumps(
                [{"question_id": r["id"], "answer": r["prediction"]} for r in rows], indent=1))


def summary(report: dict) -> str:
    lines = []
    for shots, res in report["results"].items():
        flat = {}
        for k, v in res.items():
            if isinstance(v, dict) and k not in ("skipped", "skipped_items", "by_answer_type"):
                flat.update({f"{k} {kk}": vv for kk, vv in v.items()})
            elif isinstance(v, float):
                flat[k] = v
        scores = "  ".join(f"{k} {v:.4f}" for k, v in flat.items())
        skipped = f"  (items skipped: {res['skipped_items']})" if res.get("skipped_items") else ""
        lines.append(f"{report['task']} {shots}-shot: {scores}{skipped}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)
    _check(p, a)
    rank, world = join_launched_group()
    try:
        report = evaluate(a, rank, world)
    except (FileNotFoundError, ValueError) as e:  # EvalSetError, a bad template, too few demonstrations
        print(f"furnace-eval: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            dist.destroy_process_group()
    if report is not None:
        out = Path(a.out) if a.out else (Path(a.model) / "eval" / f"{a.task}-{report['tag']}" if "tag" in report
                                         else Path(f"eval-{a.task}"))
        write_report(report, out)
        print(summary(report))
        print(f"report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
