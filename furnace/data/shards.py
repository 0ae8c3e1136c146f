"""Shard writer: user data -> webdataset tar shards + stats.json.

    python -m furnace.data.shards jsonl --input pairs.jsonl --out DIR [--prefix train]
    python -m furnace.data.shards coco --input captions_train2017.json --images train2017/ --out DIR
    python -m furnace.data.shards interleaved --input docs.jsonl --out DIR

Inputs
  jsonl        one object per line: {"image": PATH, "caption": TEXT} ("url"/"path"/"file_name" and
               "text" are accepted too); relative paths are resolved against --images (default:
               the JSONL file's folder).
  coco         COCO captions JSON ({"images": [...], "annotations": [...]}) + image folder; one
               sample per image with its first caption in .txt and all captions in .json
               (--all-captions: one sample per caption).
  interleaved  one document per line, either {"segments": [{"text": T} | {"image": PATH}, ...]} or
               MMC4-like {"text_list": [...], "image_info": [{"image_name"|"path": PATH,
               "matched_text_index": i}, ...]} (each image goes before text i).

Shard members per sample (key = running 9-digit index): caption pair `KEY.jpg|png|webp` +
`KEY.txt` (+ `KEY.json` {"captions": [...]}); interleaved doc `KEY.json`
{"segments": [{"text": T} | {"image": "0.jpg"}]} + `KEY.0.jpg`, `KEY.1.png`, ...

Every image is fully decoded with PIL before it is written: missing or corrupt images, empty
captions and bad JSON lines are skipped and counted (reason -> count in stats.json); one bad
input never aborts a run. Shards are written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter
from typing import Iterable, Iterator

from PIL import Image
from tqdm import tqdm
from webdataset.writer import TarWriter

_PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_EXAMPLES = 50


class InputError(Exception):
    """A skipped input; `reason` is the stats key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode_image(src, *, resize: int | None = None, fmt: str = "keep", quality: int = 95) -> tuple[bytes, str]:
    """Validate (full decode) and optionally re-encode an image.

    src: a path, raw bytes or a PIL image. Returns (bytes, extension). `resize`: longest side at
    most this many pixels (aspect kept, never upsampled). fmt: keep | jpg | png | webp.
    """
    raw = None
    if isinstance(src, Image.Image):
        img = src
    else:
        try:
            if isinstance(src, (bytes, bytearray)):
                raw = bytes(src)
            else:
                with open(src, "rb") as f:
                    raw = f.read()
        except FileNotFoundError:
            raise InputError("missing_image", str(src)) from None
        except OSError as e:
            raise InputError("unreadable_image", f"{src}: {e}") from None
        try:
            img = Image.open(io.BytesIO(raw))
            img.load()
        except Exception as e:  # PIL raises many types on corrupt data
            raise InputError("corrupt_image", f"{src if not isinstance(src, bytes) else '<bytes>'}: {e}") from None
    src_ext = _PIL_FORMAT_EXT.get(getattr(img, "format", None) or "", None)
    out_ext = src_ext if fmt == "keep" else ("jpg" if fmt == "jpeg" else fmt)
    need_resize = resize is not None and max(img.size) > resize
    if raw is not None and not need_resize and out_ext == src_ext and out_ext is not None:
        return raw, out_ext
    if need_resize:
        w, h = img.size
        s = resize / max(w, h)
        img = img.convert("RGB").resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    if out_ext is None:
        out_ext = "png"
    buf = io.BytesIO()
    if out_ext == "jpg":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif out_ext == "png":
        img.convert("RGB").save(buf, format="PNG")
    else:
        img.convert("RGB").save(buf, format="WEBP", quality=quality)
    return buf.getvalue(), out_ext


class ShardWriter:
    """Rotating tar writer (webdataset TarWriter underneath) that records what it wrote.

    Shards: `{out_dir}/{prefix}-%06d.tar`; a shard closes after `maxcount` samples or once it
    holds `maxsize` bytes. `close()` writes/updates `{out_dir}/stats.json` under key `prefix`.
    """

    def __init__(self, out_dir: str, prefix: str = "train", *, maxcount: int = 10000,
                 maxsize: float = 3e9, resize: int | None = None, image_format: str = "keep",
                 quality: int = 95):
        if maxcount < 1 or maxsize <= 0:
            raise ValueError("maxcount and maxsize must be positive")
        self.out_dir, self.prefix = out_dir, prefix
        self.maxcount, self.maxsize = maxcount, maxsize
        self.resize, self.image_format, self.quality = resize, image_format, quality
        os.makedirs(out_dir, exist_ok=True)
        self.shards: list[dict] = []
        self.skipped: Counter = Counter()
        self.examples: list[dict] = []
        self.inputs = 0
        self._tar = None
        self._count = 0
        self._bytes = 0
        self._index = 0

    # -- low level
    def _open(self):
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = os.path.join(self.out_dir, name + ".tmp")
        self._name = name
        self._tar = TarWriter(self._tmp, encoder=False, mtime=0)  # int: a float mtime costs a PAX header per member
        self._count = 0
        self._bytes = 0

    def _close_shard(self):
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp, os.path.join(self.out_dir, self._name))
        self.shards.append({"name": self._name, "samples": self._count,
                            "bytes": os.path.getsize(os.path.join(self.out_dir, self._name))})
        self._tar = None

    def write_raw(self, members: dict[str, bytes]) -> str:
        """Write one sample: {extension: bytes}. Returns its key."""
        if self._tar is not None and (self._count >= self.maxcount or self._bytes >= self.maxsize):
            self._close_shard()
        if self._tar is None:
            self._open()
        key = f"{self._index:09d}"
        sample = {"__key__": key}
        sample.update(members)
        self._tar.write(sample)
        self._index += 1
        self._count += 1
        self._bytes += sum(len(v) for v in members.values()) + 512 * (1 + len(members))
        return key

    def skip(self, reason: str, detail: str = ""):
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"reason": reason, "detail": detail[:300]})

    # -- sample kinds
    def add_caption(self, image, caption, *, captions: list[str] | None = None) -> bool:
        """image: path | bytes | PIL image. Returns False (and counts why) when skipped."""
        self.inputs += 1
        try:
            if not isinstance(caption, str) or not caption.strip():
                raise InputError("missing_caption", str(image) if isinstance(image, str) else "")
            data, ext = encode_image(image, resize=self.resize, fmt=self.image_format, quality=self.quality)
        except InputError as e:
            self.skip(e.reason, e.detail)
            return False
        members = {ext: data, "txt": caption.strip().encode("utf-8")}
        if captions:
            members["json"] = json.dumps({"captions": captions}).encode("utf-8")
        self.write_raw(members)
        return True

    def add_interleaved(self, segments: list[dict]) -> bool:
        """segments: [{"text": str} | {"image": path|bytes|PIL}] in document order."""
        self.inputs += 1
        try:
            if not isinstance(segments, list) or not segments:
                raise InputError("bad_document", "no segments")
            out_segments, members, n_img = [], {}, 0
            has_text = False
            for seg in segments:
                if not isinstance(seg, dict):
                    raise InputError("bad_document", f"segment {seg!r}")
                if "image" in seg and seg["image"] is not None:
                    data, ext = encode_image(seg["image"], resize=self.resize, fmt=self.image_format,
                                             quality=self.quality)
                    name = f"{n_img}.{ext}"
                    members[name] = data
                    out_segments.append({"image": name})
                    n_img += 1
                elif isinstance(seg.get("text"), str):
                    if seg["text"].strip():
                        has_text = True
                        out_segments.append({"text": seg["text"]})
                else:
                    raise InputError("bad_document", f"segment {str(seg)[:80]}")
            if n_img == 0:
                raise InputError("no_images", "")
            if not has_text:
                raise InputError("missing_caption", "document without text")
        except InputError as e:
            self.skip(e.reason, e.detail)
            return False
        members["json"] = json.dumps({"segments": out_segments}).encode("utf-8")
        self.write_raw(members)
        return True

    # -- finish
    def stats(self) -> dict:
        return {
            "shards": list(self.shards),
            "samples": sum(s["samples"] for s in self.shards),
            "inputs": self.inputs,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": list(self.examples),
            "maxcount": self.maxcount,
            "maxsize": self.maxsize,
        }

    def close(self) -> dict:
        self._close_shard()
        stats = self.stats()
        path = os.path.join(self.out_dir, "stats.json")
        allstats = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    allstats = json.load(f)
            except (OSError, ValueError):
                allstats = {}
        allstats[self.prefix] = stats
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(allstats, f, indent=1)
        os.replace(tmp, path)
        return stats

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_stats(out_dir: str, prefix: str | None = None) -> dict:
    with open(os.path.join(out_dir, "stats.json")) as f:
        stats = json.load(f)
    return stats if prefix is None else stats[prefix]


# ---------------------------------------------------------------------------- input readers

def _jsonl(path: str, writer: ShardWriter) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                writer.inputs += 1
                writer.skip("bad_json_line", f"{path}:{lineno}: {e}")
                continue
            yield obj


def _resolve(root: str, p) -> str | None:
    if not isinstance(p, str) or not p:
        return None
    return p if os.path.isabs(p) else os.path.join(root, p)


def caption_pairs_from_jsonl(path: str, images_root: str | None, writer: ShardWriter):
    root = images_root or os.path.dirname(os.path.abspath(path))
    for obj in _jsonl(path, writer):
        img = next((obj[k] for k in ("image", "path", "url", "file_name", "image_path") if k in obj), None)
        cap = next((obj[k] for k in ("caption", "text", "txt") if k in obj), None)
        resolved = _resolve(root, img)
        if resolved is None:
            writer.inputs += 1
            writer.skip("missing_image", f"no image path in {str(obj)[:80]}")
            continue
        yield ("caption", resolved, cap, None)


def caption_pairs_from_coco(path: str, images_root: str | None, writer: ShardWriter, all_captions: bool):
    """Loads the JSON now (errors surface here), returns a generator of items."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError("expected an object with 'images' and 'annotations' lists")
    root = images_root or os.path.dirname(os.path.abspath(path))
    by_image: dict = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann.get("image_id"), []).append(ann.get("caption"))
    return _coco_items(data, by_image, root, writer, all_captions)


def _coco_items(data, by_image, root, writer, all_captions):
    for img in data.get("images", []):
        caps = [c for c in by_image.get(img.get("id"), []) if isinstance(c, str) and c.strip()]
        file = _resolve(root, img.get("file_name"))
        if file is None:
            writer.inputs += 1
            writer.skip("missing_image", f"image id {img.get('id')} without file_name")
            continue
        if not caps:
            yield ("caption", file, None, None)
        elif all_captions:
            for c in caps:
                yield ("caption", file, c, None)
        else:
            yield ("caption", file, caps[0], caps)


def documents_from_jsonl(path: str, images_root: str | None, writer: ShardWriter):
    root = images_root or os.path.dirname(os.path.abspath(path))
    for obj in _jsonl(path, writer):
        if "segments" in obj:
            segs = []
            for s in obj["segments"] if isinstance(obj["segments"], list) else []:
                if isinstance(s, dict) and "image" in s:
                    segs.append({"image": _resolve(root, s["image"]) or ""})
                else:
                    segs.append(s)
        elif "text_list" in obj:
            texts = obj.get("text_list") or []
            before: dict[int, list] = {}
            for info in obj.get("image_info") or []:
                p = next((info[k] for k in ("path", "image_name", "image", "file_name") if k in info), None)
                before.setdefault(int(info.get("matched_text_index", 0)), []).append(_resolve(root, p) or "")
            segs = []
            for i, t in enumerate(texts):
                segs.extend({"image": p} for p in before.get(i, []))
                segs.append({"text": t})
            for i in sorted(k for k in before if k >= len(texts)):
                segs.extend({"image": p} for p in before[i])
        else:
            writer.inputs += 1
            writer.skip("bad_document", "neither 'segments' nor 'text_list'")
            continue
        yield ("doc", segs, None, None)


def write_items(items: Iterable[tuple], writer: ShardWriter, *, progress: bool = True, total=None,
                desc: str = "shards") -> dict:
    bar = tqdm(items, total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    for kind, a, b, c in bar:
        if kind == "caption":
            writer.add_caption(a, b, captions=c)
        else:
            writer.add_interleaved(a)
        if writer.inputs % 256 == 0:
            bar.set_postfix(written=writer._index, skipped=sum(writer.skipped.values()), refresh=False)
    return writer.close()


# ---------------------------------------------------------------------------- CLI

def _count_lines(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="furnace-shards", description="Write webdataset tar shards + stats.json.")
    p.add_argument("kind", choices=["jsonl", "coco", "interleaved"], help="input kind")
    p.add_argument("--input", "-i", required=True, help="JSONL file / COCO captions JSON")
    p.add_argument("--images", default=None, help="image root for relative paths (default: input's folder)")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--prefix", default="train", help="shard name prefix (PREFIX-000000.tar)")
    p.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most")
    p.add_argument("--maxsize", type=float, default=3e9, help="bytes per shard (a shard closes once past it)")
    p.add_argument("--resize", type=int, default=None, help="longest side at most N px (aspect kept)")
    p.add_argument("--format", default="keep", choices=["keep", "jpg", "png", "webp"], help="image encoding")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--all-captions", action="store_true", help="coco: one sample per caption")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(msg: str):
        print(f"furnace-shards: error: {msg}", file=sys.stderr)
        return 2

    if not os.path.isfile(args.input):
        return fail(f"input file {args.input!r} not found")
    if args.images is not None and not os.path.isdir(args.images):
        return fail(f"image folder {args.images!r} not found")
    if args.maxcount < 1 or args.maxsize <= 0:
        return fail("--maxcount and --maxsize must be positive")
    if args.resize is not None and args.resize < 1:
        return fail("--resize must be a positive number of pixels")
    writer = ShardWriter(args.out, args.prefix, maxcount=args.maxcount, maxsize=args.maxsize,
                         resize=args.resize, image_format=args.format, quality=args.quality)
    total = None
    try:
        if args.kind == "jsonl":
            items, total = caption_pairs_from_jsonl(args.input, args.images, writer), _count_lines(args.input)
        elif args.kind == "coco":
            try:
                items = caption_pairs_from_coco(args.input, args.images, writer, args.all_captions)
            except (ValueError, OSError) as e:
                return fail(f"cannot read COCO captions JSON {args.input!r}: {e}")
        else:
            items, total = documents_from_jsonl(args.input, args.images, writer), _count_lines(args.input)
        stats = write_items(items, writer, progress=not args.no_progress, total=total, desc=args.prefix)
    except UnicodeDecodeError as e:
        return fail(f"input {args.input!r} is not UTF-8 text: {e}")
    print(json.dumps({k: stats[k] for k in ("samples", "inputs", "skipped")} | {"shards": len(stats["shards"]),
                                                                             "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
