"""Shard writer: user data -> webdataset tar shards + stats.json.

    python -m furnace.data.shards jsonl --input pairs.jsonl --out DIR [--prefix train]
    python -m furnace.data.shards coco --input captions_train2017.json --images train2017/ --out DIR
    python -m furnace.data.shards interleaved --input docs.jsonl --out DIR
    python -m furnace.data.shards video --input clips.jsonl --out DIR [--min-frames F]
    python -m furnace.data.shards audio --input sounds.jsonl --out DIR [--sample-rate 16000]

Inputs
  jsonl        one object per line: {"image": PATH, "caption": TEXT} ("url"/"path"/"file_name" and
               "text" are accepted too); relative paths are resolved against --images (default:
               the JSONL file's folder).
  coco         COCO captions JSON ({"images": [...], "annotations": [...]}) + image folder; one
               sample per image with its first caption in .txt and all captions in .json
               (--all-captions: one sample per caption).
  interleaved  one document per line, either {"segments": [{"text": T} | {"image": PATH}, ...]} or
               MMC4-like {"text_list": [...], "image_info": [{"image_name"|"path": PATH,
               "matched_text_index": i}, ...]} (each image goes before text i); a segment may be
               {"audio": PATH} too: documents mix images and audio clips.
  video        one clip per line: {"video": PATH, "caption": TEXT} (an MP4 or WebM file: H.264,
               HEVC, VP8, VP9, AV1 or MPEG-4), or {"frames": [PATH, ...] | DIR, "caption": TEXT}
               (the frames in order; a folder's JPEG/PNG/WEBP files in the order of the numbers
               in their names). Relative paths as for jsonl.
  audio        one clip per line: {"audio": PATH, "caption": TEXT} (WAV, FLAC, MP3 or Ogg: PCM,
               FLAC, MP3, Vorbis or Opus); written as it is at --sample-rate (the audio tower's
               rate, model.audio.sample_rate), else resampled (mono) and written as FLAC.

Shard members per sample (key = running 9-digit index): caption pair `KEY.jpg|png|webp` +
`KEY.txt` (+ `KEY.json` {"captions": [...]}); interleaved doc `KEY.json`
{"segments": [{"text": T} | {"image": "0.jpg"}]} + `KEY.0.jpg`, `KEY.1.png`, ...; clip `KEY.mp4|webm`
(the file's bytes as they are, after every frame decoded) + `KEY.txt`; frame folder `KEY.0.jpg`,
`KEY.1.jpg`, ... + `KEY.txt` (the loader samples data.video_frames of them uniformly); audio clip
`KEY.wav|flac|mp3|ogg` + `KEY.txt`; a document's clips `KEY.1.flac` ... next to its images.

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
import json
import os
import re
import signal
import sys
import threading
from typing import Iterable, Iterator

from tqdm import tqdm

from furnace.data.images import IMAGE_EXTS
from furnace.data.input_checks import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, InputError, short
from furnace.data.shard_writer import ShardWriter
from furnace.data.video import MAX_VIDEO_FRAMES

MAX_LINE_BYTES = 64 << 20  # a longer JSONL line is skipped, never held in memory


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
            writer.skip_input("bad_coco_annotation", f"annotations[{i}]: {short(ann)}")
            continue
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _coco_id(img.get("id")):
            writer.skip_input("bad_coco_image", f"images[{i}]: {short(img)}")
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
        return [{k: "" if s[k] is None else _resolve(root, s[k])} if isinstance(s, dict) and (k := _medium_key(s))
                else s for s in obj["segments"]]
    if "text_list" not in obj:
        raise InputError("bad_document", "neither 'segments' nor 'text_list'")
    texts, infos = obj["text_list"], obj.get("image_info")
    infos = [] if infos is None else infos
    if not isinstance(texts, list) or not isinstance(infos, list):
        raise InputError("bad_document", "'text_list' and 'image_info' must be lists")
    before: dict[int, list] = {}
    for info in infos:
        if not isinstance(info, dict):
            raise InputError("bad_document", f"image_info entry {short(info)}")
        i = info.get("matched_text_index", 0)
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= len(texts):
            raise InputError("bad_document", f"matched_text_index {short(i, 40)} not in 0..{len(texts)}")
        p = next((info[k] for k in ("path", "image_name", "image", "file_name") if k in info), None)
        before.setdefault(i, []).append("" if p is None else _resolve(root, p))
    segs = []
    for i, t in enumerate(texts):
        segs.extend({"image": p} for p in before.get(i, []))
        segs.append({"text": t})
    segs.extend({"image": p} for p in before.get(len(texts), []))
    return segs


def _medium_key(seg: dict) -> str | None:
    return "image" if "image" in seg else "audio" if "audio" in seg else None


def documents_from_jsonl(path: str, images_root: str | None, writer: ShardWriter):
    root = images_root or os.path.dirname(os.path.abspath(path))
    for where, obj in _jsonl(path, writer):
        try:
            segs = _document_segments(obj, root)
        except InputError as e:
            writer.skip_input(e.reason, f"{where}: {e.detail}")
            continue
        yield ("doc", segs, None, None)


def _natural(name: str) -> list:
    """Sort key: "frame10.jpg" after "frame9.jpg"."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"([0-9]+)", name)]


def _frame_paths(frames, root: str) -> list:
    """A clip's frames: a list of paths, or a folder's image files in natural order; InputError
    otherwise (bad_video_path, missing_video)."""
    if isinstance(frames, list):
        return [_resolve(root, f) for f in frames]
    if not isinstance(frames, str) or not frames or "\x00" in frames:
        raise InputError("bad_video_path", f"frames is {short(frames)}")
    folder = _resolve(root, frames)
    try:
        names = [n for n in os.listdir(folder) if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]
    except (OSError, ValueError) as e:
        raise InputError("missing_video", f"frame folder {folder}: {e}") from None
    return [os.path.join(folder, n) for n in sorted(names, key=_natural)]


def clips_from_jsonl(path: str, images_root: str | None, writer: ShardWriter):
    root = images_root or os.path.dirname(os.path.abspath(path))
    for where, obj in _jsonl(path, writer):
        cap = next((obj[k] for k in ("caption", "text", "txt") if k in obj), None)
        video = next((obj[k] for k in ("video", "clip", "path", "file_name") if k in obj), None)
        if video is not None:
            yield ("video", _resolve(root, video), cap, None)
        elif "frames" in obj:
            try:
                yield ("frames", _frame_paths(obj["frames"], root), cap, None)
            except InputError as e:
                writer.skip_input(e.reason, f"{where}: {e.detail}")
        else:
            writer.skip_input("missing_video", f"{where}: neither 'video' nor 'frames' in {str(obj)[:80]}")


def sounds_from_jsonl(path: str, images_root: str | None, writer: ShardWriter):
    root = images_root or os.path.dirname(os.path.abspath(path))
    for where, obj in _jsonl(path, writer):
        cap = next((obj[k] for k in ("caption", "text", "txt") if k in obj), None)
        audio = next((obj[k] for k in ("audio", "path", "file_name") if k in obj), None)
        if audio is None or audio == "":
            writer.skip_input("missing_audio", f"{where}: no 'audio' in {str(obj)[:80]}")
            continue
        yield ("audio", _resolve(root, audio), cap, None)


def write_items(items: Iterable[tuple], writer: ShardWriter, *, progress: bool = True, total=None,
                desc: str = "shards") -> dict:
    bar = tqdm(items, total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    for kind, a, b, c in bar:
        if kind == "caption":
            writer.add_caption(a, b, captions=c)
        elif kind == "video":
            writer.add_video(a, b)
        elif kind == "audio":
            writer.add_audio(a, b)
        elif kind == "frames":
            writer.add_frames(a, b)
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


def _check_utf8caption_text(path: str) -> None:
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
    p.add_argument("kind", choices=["jsonl", "coco", "interleaved", "video", "audio"], help="input kind")
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
    p.add_argument("--max-video-bytes", type=int, default=MAX_IMAGE_BYTES,
                   help="video: larger clip files are skipped (video_too_large); default 32 MiB, the loader's "
                        "data.max_member_bytes")
    p.add_argument("--max-video-frames", type=int, default=MAX_VIDEO_FRAMES,
                   help="video: clips with more frames are skipped (video_too_long); default the loader's "
                        "data.max_video_frames")
    p.add_argument("--min-frames", type=int, default=1,
                   help="video: clips with fewer frames are skipped (too_few_frames); set it to data.video_frames")
    p.add_argument("--sample-rate", type=int, default=16000,
                   help="audio: the rate clips are written at (resampled when theirs differs); the audio tower's, "
                        "model.audio.sample_rate")
    p.add_argument("--max-audio-bytes", type=int, default=MAX_IMAGE_BYTES,
                   help="audio: larger files are skipped (audio_too_large); default 32 MiB, the loader's "
                        "data.max_member_bytes")
    p.add_argument("--max-audio-seconds", type=float, default=600.0,
                   help="audio: longer clips are skipped (audio_too_long); default the loader's data.max_audio_seconds")
    p.add_argument("--min-audio-seconds", type=float, default=0.05,
                   help="audio: shorter clips are skipped (audio_too_short); default the loader's data.min_audio_seconds")
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
    if args.max_video_bytes < 1 or not 1 <= args.min_frames <= args.max_video_frames:
        return "--max-video-bytes must be positive and 1 <= --min-frames <= --max-video-frames"
    if args.sample_rate < 1 or args.max_audio_bytes < 1 or not 0 <= args.min_audio_seconds <= args.max_audio_seconds:
        return "--sample-rate and --max-audio-bytes must be positive and 0 <= --min-audio-seconds <= --max-audio-seconds"
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
            _check_utf8caption_text(args.input)
    except (ValueError, OSError) as e:
        what = "COCO captions JSON" if args.kind == "coco" else "input"
        return fail(f"cannot read {what} {args.input!r}: {e}")
    root = args.images or os.path.dirname(os.path.abspath(args.input))
    try:
        writer = ShardWriter(args.out, args.prefix, maxcount=args.maxcount, maxsize=args.maxsize,
                             resize=args.resize, image_format=args.format, quality=args.quality,
                             max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                             confine=root if args.confine else None, max_video_bytes=args.max_video_bytes,
                             max_video_frames=args.max_video_frames, min_frames=args.min_frames,
                             sample_rate=args.sample_rate, max_audio_bytes=args.max_audio_bytes,
                             max_audio_seconds=args.max_audio_seconds, min_audio_seconds=args.min_audio_seconds)
    except (OSError, ValueError) as e:
        return fail(f"cannot create output folder {args.out!r}: {e}")
    if args.kind == "coco":
        items, total = _coco_items(coco, root, writer, args.all_captions), None
    else:
        read = {"jsonl": caption_pairs_from_jsonl, "interleaved": documents_from_jsonl,
                "video": clips_from_jsonl, "audio": sounds_from_jsonl}[args.kind]
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
