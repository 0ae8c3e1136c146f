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

Every image is fully decoded with PIL before it is written, and only as the formats the loader
reads (JPEG, PNG, WEBP). Any bad record (missing, corrupt, oversized or unsupported images,
non-regular files, wrongly typed JSON fields, undecodable lines ...) is skipped and counted
(reason -> count in stats.json); one bad input never aborts a run. Shards are written to
`NAME.tar.tmp` and renamed when complete; on an error, Ctrl-C or SIGTERM the partial shard is
removed (completed shards and stats.json stay). Exit status: 0, 1 when no sample was written,
2 for a bad command line or an unreadable input file, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import stat
import sys
import threading
import warnings
from collections import Counter
from typing import Iterable, Iterator

from PIL import Image
from tqdm import tqdm
from webdataset.writer import TarWriter

from furnace.data.images import PIL_FORMATS

_PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_EXAMPLES = 50
MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 40_000_000
MAX_LINE_BYTES = 64 << 20  # a longer JSONL line is skipped, never held in memory


class InputError(Exception):
    """A skipped input; `reason` is the stats key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _short(value, n: int = 80) -> str:
    return repr(value)[:n]


def _sniff_format(head: bytes) -> str | None:
    """The PIL format these leading bytes announce, among the loader's (PIL's own prefix tests)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _image_path(src) -> str:
    """`src` as a usable path string; paths come from untrusted JSON (ints, lists, NUL bytes ...)."""
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if src is None or src == "":
        raise InputError("missing_image", "no image path")
    if not isinstance(src, str):
        raise InputError("bad_image_path", f"{type(src).__name__} {_short(src)}")
    try:
        if "\x00" in src:
            raise ValueError("NUL byte in path")
        os.fsencode(src)  # lone surrogates from JSON "\ud800" cannot name a file
    except ValueError as e:
        raise InputError("bad_image_path", f"{_short(src, 300)}: {e}") from None
    return src


def _is_under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # different drives (Windows)
        return False


def read_image_file(path: str, *, max_bytes: int = MAX_IMAGE_BYTES, confine: str | None = None) -> bytes:
    """Bytes of the regular file `path` (at most `max_bytes`, else InputError image_too_large).

    Devices, FIFOs, sockets and directories are refused from their stat, never opened or read
    (/dev/zero never ends, a FIFO blocks). `confine`: the file, symlinks resolved, must lie under
    this folder (outside_images_root otherwise).
    """
    try:
        if confine is not None:
            path = os.path.realpath(path)
            root = os.path.realpath(confine)
            if not _is_under(path, root):
                raise InputError("outside_images_root", f"{path} is not under {root}")
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InputError("not_a_regular_file", path)
        if st.st_size > max_bytes:
            raise InputError("image_too_large", f"{path}: {st.st_size} bytes > --max-image-bytes {max_bytes}")
        # O_NONBLOCK: should the path become a FIFO after the stat, the open still cannot block.
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)),
                  "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InputError("not_a_regular_file", path)
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise InputError("missing_image", path) from None
    except (OSError, ValueError) as e:
        raise InputError("unreadable_image", f"{path}: {e}") from None
    if len(raw) > max_bytes:  # grew after the stat
        raise InputError("image_too_large", f"{path}: more than --max-image-bytes {max_bytes}")
    return raw


def _open_image(raw: bytes, name: str, max_pixels: int) -> Image.Image:
    """Decode `raw` as JPEG/PNG/WEBP only, refusing more than `max_pixels` before decoding."""
    if not raw:
        raise InputError("corrupt_image", f"{name}: empty file")
    if _sniff_format(raw[:16]) is None:  # never handed to PIL: other plugins (EPS: Ghostscript) stay unused
        raise InputError("unsupported_image_format", f"{name}: not JPEG/PNG/WEBP (starts {raw[:8]!r})")
    try:
        with warnings.catch_warnings():
            # The pixel cap below is the policy; PIL's bomb warning is noise (a crash under -W error).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=PIL_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise InputError("image_too_large", f"{name}: {w}x{h} pixels > --max-image-pixels {max_pixels}")
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError("image_too_large", f"{name}: {e}") from None
    except Exception as e:  # PIL raises many types on corrupt data
        raise InputError("corrupt_image", f"{name}: {e}") from None
    return img


def encode_image(src, *, resize: int | None = None, fmt: str = "keep", quality: int = 95,
                 max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                 confine: str | None = None) -> tuple[bytes, str]:
    """Validate (full decode) and optionally re-encode an image.

    src: a path, raw bytes or a PIL image. Returns (bytes, extension). `resize`: longest side at
    most this many pixels (aspect kept, never upsampled). fmt: keep | jpg | png | webp. Paths and
    bytes must hold JPEG/PNG/WEBP within `max_bytes` / `max_pixels` (see `read_image_file` for
    `confine`); anything else raises InputError with the skip reason.
    """
    raw = None
    if isinstance(src, Image.Image):
        img = src
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            raw, name = bytes(src), "<bytes>"
            if len(raw) > max_bytes:
                raise InputError("image_too_large", f"<bytes>: {len(raw)} bytes > {max_bytes}")
        else:
            name = _image_path(src)
            raw = read_image_file(name, max_bytes=max_bytes, confine=confine)
        img = _open_image(raw, name, max_pixels)
    src_ext = _PIL_FORMAT_EXT.get(getattr(img, "format", None) or "", None)
    out_ext = src_ext if fmt == "keep" else ("jpg" if fmt == "jpeg" else fmt)
    need_resize = resize is not None and max(img.size) > resize
    if raw is not None and not need_resize and out_ext == src_ext and out_ext is not None:
        return raw, out_ext
    try:
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
    except (OSError, ValueError) as e:  # odd modes that decode but do not convert
        raise InputError("corrupt_image", f"re-encoding as {out_ext}: {e}") from None
    return buf.getvalue(), out_ext


def _text(value, what: str) -> str:
    """A caption: None/blank -> missing_caption, not a UTF-8-encodable string -> bad_caption."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError("missing_caption", what)
    if not isinstance(value, str):
        raise InputError("bad_caption", f"{what}: caption is {type(value).__name__} {_short(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates, e.g. JSON "\ud800"
        raise InputError("bad_caption", f"{what}: {e}") from None
    return value


class ShardWriter:
    """Rotating tar writer (webdataset TarWriter underneath) that records what it wrote.

    Shards: `{out_dir}/{prefix}-%06d.tar`; a shard closes after `maxcount` samples or once it
    holds `maxsize` bytes. `close()` writes/updates `{out_dir}/stats.json` under key `prefix`.
    As a context manager it closes on success and `abort()`s on any exception (Ctrl-C included):
    the partial shard's `.tmp` is removed, completed shards stay and stats.json lists them.
    `max_image_bytes` / `max_image_pixels` / `confine`: limits on every image (`encode_image`).
    """

    def __init__(self, out_dir: str, prefix: str = "train", *, maxcount: int = 10000,
                 maxsize: float = 3e9, resize: int | None = None, image_format: str = "keep",
                 quality: int = 95, max_image_bytes: int = MAX_IMAGE_BYTES,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, confine: str | None = None):
        if maxcount < 1 or maxsize <= 0:
            raise ValueError("maxcount and maxsize must be positive")
        if max_image_bytes < 1 or max_image_pixels < 1:
            raise ValueError("max_image_bytes and max_image_pixels must be positive")
        self.out_dir, self.prefix = out_dir, prefix
        self.maxcount, self.maxsize = maxcount, maxsize
        self.resize, self.image_format, self.quality = resize, image_format, quality
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        self.confine = None if confine is None else os.path.realpath(confine)
        os.makedirs(out_dir, exist_ok=True)
        self.shards: list[dict] = []
        self.skipped: Counter = Counter()
        self.examples: list[dict] = []
        self.inputs = 0
        self._tar = None
        self._file = None
        self._count = 0
        self._bytes = 0
        self._index = 0
        self._final: dict | None = None

    # -- low level
    def _open(self):
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = os.path.join(self.out_dir, name + ".tmp")
        self._name = name
        # Our own file object: given a name, TarWriter would gopen() it ("pipe:..." runs a shell).
        self._file = open(self._tmp, "wb")
        self._tar = TarWriter(self._file, encoder=False, compress=False,
                              mtime=0)  # int: a float mtime costs a PAX header per member
        self._count = 0
        self._bytes = 0

    def _close_shard(self):
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        os.replace(self._tmp, os.path.join(self.out_dir, self._name))
        self._tar = self._file = None
        self.shards.append({"name": self._name, "samples": self._count,
                            "bytes": os.path.getsize(os.path.join(self.out_dir, self._name))})

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

    def skip_input(self, reason: str, detail: str = ""):
        """Count an input record rejected before it became a sample (keeps inputs = samples + skips)."""
        self.inputs += 1
        self.skip(reason, detail)

    def _encode(self, image) -> tuple[bytes, str]:
        return encode_image(image, resize=self.resize, fmt=self.image_format, quality=self.quality,
                            max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels,
                            confine=self.confine)

    # -- sample kinds
    def add_caption(self, image, caption, *, captions: list[str] | None = None) -> bool:
        """image: path | bytes | PIL image. Returns False (and counts why) when skipped."""
        self.inputs += 1
        try:
            caption = _text(caption, str(image)[:200] if isinstance(image, str) else "")
            if captions is not None:
                if not isinstance(captions, list):
                    raise InputError("bad_caption", f"captions is {type(captions).__name__}")
                captions = [_text(c, "captions") for c in captions]
            data, ext = self._encode(image)
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
                    raise InputError("bad_document", f"segment {_short(seg)}")
                if "image" in seg and seg["image"] is not None:
                    data, ext = self._encode(seg["image"])
                    name = f"{n_img}.{ext}"
                    members[name] = data
                    out_segments.append({"image": name})
                    n_img += 1
                elif isinstance(seg.get("text"), str):
                    if seg["text"].strip():
                        try:
                            seg["text"].encode("utf-8")
                        except UnicodeEncodeError as e:
                            raise InputError("bad_document", f"text: {e}") from None
                        has_text = True
                        out_segments.append({"text": seg["text"]})
                else:
                    raise InputError("bad_document", f"segment {_short(seg)}")
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

    def _finish(self, complete: bool) -> dict:
        if self._final is not None:  # close() after write_items' close(), or abort() after close()
            return self._final
        stats = self.stats()
        stats["complete"] = complete
        path = os.path.join(self.out_dir, "stats.json")
        allstats = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    allstats = json.load(f)
            except (OSError, ValueError):
                allstats = {}
        if not isinstance(allstats, dict):
            allstats = {}
        allstats[self.prefix] = stats
        tmp = path + f".tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(allstats, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        self._final = stats
        return stats

    def close(self) -> dict:
        self._close_shard()
        return self._finish(True)

    def abort(self) -> None:
        """Drop the shard being written (its `.tmp`) and record the completed ones ("complete": false)."""
        if self._tar is not None:
            with contextlib.suppress(Exception):  # marks the tar stream closed (else its __del__ writes later)
                self._tar.close()
            with contextlib.suppress(OSError):
                self._file.close()
            with contextlib.suppress(OSError):
                os.remove(self._tmp)
            self._tar = self._file = None
        with contextlib.suppress(OSError):
            self._finish(False)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_stats(out_dir: str, prefix: str | None = None) -> dict:
    with open(os.path.join(out_dir, "stats.json")) as f:
        stats = json.load(f)
    return stats if prefix is None else stats[prefix]


# ---------------------------------------------------------------------------- input readers

def _lines(f, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line of a binary file; None for a line over `limit` bytes, read past
    in chunks so one giant line cannot exhaust memory."""
    lineno = 0
    while line := f.readline(limit + 1):
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
            yield lineno, None
        else:
            yield lineno, line


def _jsonl(path: str, writer: ShardWriter) -> Iterator[tuple[str, dict]]:
    """("path:line", object) per JSON-object line; undecodable lines are skipped and counted."""
    with open(path, "rb") as f:
        for lineno, line in _lines(f, MAX_LINE_BYTES):
            where = f"{path}:{lineno}"
            if line is None:
                writer.skip_input("bad_json_line", f"{where}: line longer than {MAX_LINE_BYTES} bytes")
                continue
            try:
                text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                writer.skip_input("bad_utf8_line", f"{where}: {e}")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError) as e:  # RecursionError: [[[[... nested too deep
                writer.skip_input("bad_json_line", f"{where}: {e}")
                continue
            yield where, obj


def _resolve(root: str, p):
    """Relative path strings joined to `root`; anything else is passed on for encode_image to judge."""
    return os.path.join(root, p) if isinstance(p, str) and p and not os.path.isabs(p) else p


def caption_pairs_from_jsonl(path: str, images_root: str | None, writer: ShardWriter):
    root = images_root or os.path.dirname(os.path.abspath(path))
    for where, obj in _jsonl(path, writer):
        img = next((obj[k] for k in ("image", "path", "url", "file_name", "image_path") if k in obj), None)
        cap = next((obj[k] for k in ("caption", "text", "txt") if k in obj), None)
        if img is None or img == "":
            writer.skip_input("missing_image", f"{where}: no image path in {str(obj)[:80]}")
            continue
        yield ("caption", _resolve(root, img), cap, None)


def load_coco(path: str) -> dict:
    """The COCO captions JSON, its shape checked (ValueError/OSError say what is wrong)."""
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError("expected an object with 'images' and 'annotations' lists")
    if not isinstance(data.get("annotations") or [], list):
        raise ValueError("'annotations' is not a list")
    return data


def caption_pairs_from_coco(path: str, images_root: str | None, writer: ShardWriter, all_captions: bool):
    """Loads the JSON now (errors surface here), returns a generator of items."""
    root = images_root or os.path.dirname(os.path.abspath(path))
    return _coco_items(load_coco(path), root, writer, all_captions)


def _coco_id(v) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)  # hashable, and no None matching None


def _coco_items(data, root, writer, all_captions):
    by_image: dict = {}
    for i, ann in enumerate(data.get("annotations") or []):
        if not isinstance(ann, dict) or not _coco_id(ann.get("image_id")) or not isinstance(ann.get("caption"), str):
            writer.skip_input("bad_coco_annotation", f"annotations[{i}]: {_short(ann)}")
            continue
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _coco_id(img.get("id")):
            writer.skip_input("bad_coco_image", f"images[{i}]: {_short(img)}")
            continue
        caps = [c for c in by_image.get(img["id"], []) if c.strip()]
        if img.get("file_name") in (None, ""):
            writer.skip_input("missing_image", f"image id {img['id']} without file_name")
            continue
        file = _resolve(root, img["file_name"])
        if not caps:
            yield ("caption", file, None, None)
        elif all_captions:
            for c in caps:
                yield ("caption", file, c, None)
        else:
            yield ("caption", file, caps[0], caps)


def _document_segments(obj: dict, root: str) -> list:
    """A JSONL document as writer segments; InputError("bad_document") when its fields are mistyped."""
    if "segments" in obj:
        if not isinstance(obj["segments"], list):
            raise InputError("bad_document", f"'segments' is {type(obj['segments']).__name__}, not a list")
        return [{"image": "" if s["image"] is None else _resolve(root, s["image"])}
                if isinstance(s, dict) and "image" in s else s for s in obj["segments"]]
    if "text_list" not in obj:
        raise InputError("bad_document", "neither 'segments' nor 'text_list'")
    texts, infos = obj["text_list"], obj.get("image_info")
    infos = [] if infos is None else infos
    if not isinstance(texts, list) or not isinstance(infos, list):
        raise InputError("bad_document", "'text_list' and 'image_info' must be lists")
    before: dict[int, list] = {}
    for info in infos:
        if not isinstance(info, dict):
            raise InputError("bad_document", f"image_info entry {_short(info)}")
        i = info.get("matched_text_index", 0)
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= len(texts):
            raise InputError("bad_document", f"matched_text_index {_short(i, 40)} not in 0..{len(texts)}")
        p = next((info[k] for k in ("path", "image_name", "image", "file_name") if k in info), None)
        before.setdefault(i, []).append("" if p is None else _resolve(root, p))
    segs = []
    for i, t in enumerate(texts):
        segs.extend({"image": p} for p in before.get(i, []))
        segs.append({"text": t})
    segs.extend({"image": p} for p in before.get(len(texts), []))
    return segs


def documents_from_jsonl(path: str, images_root: str | None, writer: ShardWriter):
    root = images_root or os.path.dirname(os.path.abspath(path))
    for where, obj in _jsonl(path, writer):
        try:
            segs = _document_segments(obj, root)
        except InputError as e:
            writer.skip_input(e.reason, f"{where}: {e.detail}")
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
    """Lines for the progress bar, counted in chunks (a giant line is never held)."""
    try:
        n, last = 0, b"\n"
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n, last = n + chunk.count(b"\n"), chunk[-1:]
        return n + (last != b"\n")
    except OSError:
        return None


def _check_utf8_text(path: str) -> None:
    """Refuse a JSONL input that is plainly not UTF-8 (UTF-16/32, binary) before writing anything;
    single undecodable lines are skipped later (bad_utf8_line)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        raise ValueError("it looks like UTF-16/32 or binary data; re-encode it as UTF-8")


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM (kill, job timeouts) unwinds like Ctrl-C, so the partial shard is removed too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


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
    p.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES,
                   help="larger image files are skipped (image_too_large); default 32 MiB")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="images with more pixels are skipped before decoding (image_too_large)")
    p.add_argument("--confine", action="store_true",
                   help="skip images whose real path is outside --images (default: the input's folder)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _bad_args(args) -> str | None:
    if args.images is not None and not os.path.isdir(args.images):
        return f"image folder {args.images!r} not found"
    if args.maxcount < 1 or args.maxsize <= 0:
        return "--maxcount and --maxsize must be positive"
    if args.resize is not None and args.resize < 1:
        return "--resize must be a positive number of pixels"
    if not 0 <= args.quality <= 100:
        return "--quality must be in 0..100"
    if args.max_image_bytes < 1 or args.max_image_pixels < 1:
        return "--max-image-bytes and --max-image-pixels must be positive"
    if (not args.prefix or args.prefix in (".", "..") or "\x00" in args.prefix
            or any(sep and sep in args.prefix for sep in (os.sep, os.altsep))):
        return f"--prefix {args.prefix!r} must be a plain file name (no folders)"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(msg: str):
        print(f"furnace-shards: error: {msg}", file=sys.stderr)
        return 2

    if not os.path.exists(args.input):
        return fail(f"input file {args.input!r} not found")
    if not os.path.isfile(args.input):
        return fail(f"input {args.input!r} is not a regular file; pass the JSONL/JSON file itself")
    if (msg := _bad_args(args)) is not None:
        return fail(msg)
    # Whole-input problems end here, before the output folder or stats.json are touched.
    coco = None
    try:
        if args.kind == "coco":
            coco = load_coco(args.input)
        else:
            _check_utf8_text(args.input)
    except (ValueError, OSError) as e:
        what = "COCO captions JSON" if args.kind == "coco" else "input"
        return fail(f"cannot read {what} {args.input!r}: {e}")
    root = args.images or os.path.dirname(os.path.abspath(args.input))
    try:
        writer = ShardWriter(args.out, args.prefix, maxcount=args.maxcount, maxsize=args.maxsize,
                             resize=args.resize, image_format=args.format, quality=args.quality,
                             max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                             confine=root if args.confine else None)
    except (OSError, ValueError) as e:
        return fail(f"cannot create output folder {args.out!r}: {e}")
    if args.kind == "coco":
        items, total = _coco_items(coco, root, writer, args.all_captions), None
    else:
        read = caption_pairs_from_jsonl if args.kind == "jsonl" else documents_from_jsonl
        items = read(args.input, args.images, writer)
        total = None if args.no_progress else _count_lines(args.input)
    try:
        with _sigterm_unwinds(), writer:  # any exception: the partial shard's .tmp is removed
            stats = write_items(items, writer, progress=not args.no_progress, total=total, desc=args.prefix)
    except KeyboardInterrupt:
        print(f"furnace-shards: interrupted; completed shards and stats.json kept in {args.out!r}, "
              "the partial shard removed", file=sys.stderr)
        return 130
    except OSError as e:
        return fail(f"stopped by an I/O error ({e}); completed shards and stats.json are in {args.out!r}")
    print(json.dumps({k: stats[k] for k in ("samples", "inputs", "skipped")} | {"shards": len(stats["shards"]),
                                                                             "out": args.out}))
    if stats["samples"] == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in stats["skipped"].items()) or "no records in the input"
        print(f"furnace-shards: error: no samples written ({stats['inputs']} inputs skipped: {reasons}); "
              f"see 'skipped_examples' in {os.path.join(args.out, 'stats.json')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
