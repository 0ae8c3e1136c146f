"""Data loader throughput: samples/s per worker for 224 px JPEG caption pairs.

    python benchmarks/dataloader.py [--n 4096] [--shards 64] [--streams 64] [--workers 0,1,2] [--out FILE.json]

Writes JPEG caption shards into a temporary folder (synthetic shapes drawn at 56 px, upscaled to
224 px and overlaid with Gaussian noise so the JPEGs are photo-sized, ~25 KB, not flat-colour
tiny files), then times `ShardLoader` in training mode (shuffle buffer, decode, resize check,
tokenise, pad, normalise) for each worker count. workers=0 runs in the main process (one core);
for workers=W the samples/s are divided by W. Also reported: samples per CPU-second of the
producing process (main process for workers=0, each worker otherwise), the per-core figure that
holds on a shared machine. Prints a table and writes JSON with the device, versions, the command
line and the results.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

from furnace.data.loader import ShardLoader  # noqa: E402
from furnace.data.shard_writer import ShardWriter  # noqa: E402
from furnace.data.synthetic import demo_tokenizer, draw_sample, sample_rng  # noqa: E402
from furnace.training.metrics import run_info  # noqa: E402


def make_shards(out: str, n: int, shards: int, size: int, seed: int = 0) -> tuple[list[str], float]:
    rng = np.random.default_rng(seed)
    w = ShardWriter(out, "bench", maxcount=-(-n // shards), image_format="keep")
    nbytes = 0
    for i in range(n):
        img, cap = draw_sample(sample_rng(seed, "bench", i), 56)
        arr = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32)
        arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        nbytes += buf.tell()
        w.add_caption(buf.getvalue(), cap)
    stats = w.close()
    return [os.path.join(out, s["name"]) for s in stats["shards"]], nbytes / n


def run(shards, tok, workers: int, batches: int, batch_size: int, size: int, warmup: int,
        streams: int, prefetch: int = 4) -> dict:
    """Wall-clock rate over `batches` timed batches, and the CPU-time rate per worker: samples a
    worker produced per CPU second it spent (each batch carries its producer's process_time),
    which does not depend on what else the machine is running."""
    ld = ShardLoader(shards, tok, batch_size=batch_size, image_size=size, max_length=32, num_workers=workers,
                     canonical_streams=streams, seed=0, prefetch_factor=prefetch)
    it = iter(ld)
    W = ld.num_workers_eff
    first: dict = {}
    # worker start-up and every stream's first shuffle-buffer fill are not timed
    for _ in range(warmup + W + len(ld.my_streams)):
        next(it)
        first[ld.last_meta["worker"]] = ld.last_meta["cpu"]
    t0 = time.perf_counter()
    n = 0
    last: dict = {}
    produced: dict = {w: 0 for w in range(W)}
    for _ in range(batches):
        b = next(it)
        n += b["input_ids"].shape[0]
        w = ld.last_meta["worker"]
        last[w] = ld.last_meta["cpu"]
        produced[w] += b["input_ids"].shape[0]
    dt = time.perf_counter() - t0
    del it
    cpu = sum(last[w] - first[w] for w in last)
    return {"workers": workers, "samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1),
            "samples_per_s_per_worker": round(n / dt / W, 1),
            "samples_per_cpu_s_per_worker": round(sum(produced.values()) / max(cpu, 1e-9), 1),
            "skipped": ld.skipped}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="samples written")
    p.add_argument("--shards", type=int, default=64, help="shards written (>= --streams: each read once)")
    p.add_argument("--streams", type=int, default=64, help="data.canonical_streams")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=128, help="timed batches per setting")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out", default=None, help="JSON output (default: print only)")
    p.add_argument("--tmp", default=None, help="folder for the shards (default: a temp dir, removed)")
    a = p.parse_args(argv)
    tmp = a.tmp or tempfile.mkdtemp(prefix="furnace-bench-")
    try:
        t0 = time.perf_counter()
        shards, avg_bytes = make_shards(tmp, a.n, a.shards, a.image_size)
        write_s = time.perf_counter() - t0
        tok = demo_tokenizer()
        results = [run(shards, tok, int(w), a.batches, a.batch_size, a.image_size, a.warmup, a.streams)
                   for w in a.workers.split(",")]
    finally:
        if a.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "benchmark": "dataloader",
        **run_info(),
        "config": {"n": a.n, "shards": a.shards, "canonical_streams": a.streams, "image_size": a.image_size, "batch_size": a.batch_size,
                   "batches": a.batches, "warmup": a.warmup, "avg_jpeg_bytes": round(avg_bytes),
                   "write_seconds": round(write_s, 2)},
        "results": results,
        "target_samples_per_s_per_worker": 400,
    }
    print(f"{'workers':>8} {'samples/s':>10} {'per worker':>11} {'per CPU-second':>15}")
    for r in results:
        print(f"{r['workers']:>8} {r['samples_per_s']:>10.1f} {r['samples_per_s_per_worker']:>11.1f} "
              f"{r['samples_per_cpu_s_per_worker']:>15.1f}")
    print(f"device: {report['device']} (load {report['cpu']['load_avg_1m']})")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
