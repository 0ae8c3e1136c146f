"""Small data makers shared by the data tests and benchmarks/dataloader.py (no downloads)."""
from __future__ import annotations

import io
import os
import tarfile

from furnace.data.shard_writer import ShardWriter
from furnace.data.synthetic import draw_sample, sample_rng


def write_caption_shards(out: str, n: int, *, shards: int = 4, image_size: int = 32, seed: int = 0,
                         prefix: str = "train", image_format: str = "png", draw_size: int | None = None) -> list[str]:
    """n synthetic caption pairs in `shards` shards through the shard writer; returns shard paths."""
    w = ShardWriter(out, prefix, maxcount=max(1, -(-n // shards)), image_format=image_format)
    for i in range(n):
        img, cap = draw_sample(sample_rng(seed, prefix, i), draw_size or image_size)
        if draw_size and draw_size != image_size:
            img = img.resize((image_size, image_size))
        w.add_caption(img, cap)
    stats = w.close()
    return [os.path.join(out, s["name"]) for s in stats["shards"]]


def write_doc_shards(out: str, n: int, *, shards: int = 2, images_per_doc: int = 2, image_size: int = 32,
                     seed: int = 0, prefix: str = "docs") -> list[str]:
    """n interleaved documents: [text?] <image> caption <image> caption ... through the writer."""
    w = ShardWriter(out, prefix, maxcount=max(1, -(-n // shards)), image_format="png")
    for i in range(n):
        segs = [{"text": "a"}] if i % 2 else []
        for j in range(images_per_doc):
            img, cap = draw_sample(sample_rng(seed, f"{prefix}{j}", i), image_size)
            segs += [{"image": img}, {"text": cap}]
        w.add_interleaved(segs)
    stats = w.close()
    return [os.path.join(out, s["name"]) for s in stats["shards"]]


def add_members(path: str, members: dict[str, bytes]) -> None:
    """Append raw members (e.g. a `.pyd` pickle) to an uncompressed tar."""
    with tarfile.open(path, "a") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def write_raw_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    """A tar with exactly these members, in order (for corrupt-data tests)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def tar_keys(path: str) -> list[str]:
    """Sample keys in a (well-formed) tar, in order."""
    keys: list[str] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            k = m.name.split(".", 1)[0]
            if not keys or keys[-1] != k:
                keys.append(k)
    return keys
