"""`ShardWriter`: samples -> rotating webdataset tar shards + stats.json, never a partial shard
left behind; every skipped input counted under its reason (`furnace.data.input_checks`)."""
from __future__ import annotations

import contextlib
import json
import os
from collections import Counter

from webdataset.writer import TarWriter

from furnace.data.input_checks import (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, InputError, caption_text, encode_audio,
                                       encode_image, encode_video, short)
from furnace.data.video import MAX_VIDEO_FRAMES

MAX_EXAMPLES = 50  # skipped inputs described in stats.json

class ShardWriter:
    """Rotating tar writer (webdataset TarWriter underneath) that records what it wrote.

    Shards: `{out_dir}/{prefix}-%06d.tar`; a shard closes after `maxcount` samples or once it
    holds `maxsize` bytes. `close()` writes/updates `{out_dir}/stats.json` under key `prefix`.
    As a context manager it closes on success and `abort()`s on any exception (Ctrl-C included):
    the partial shard's `.tmp` is removed, completed shards stay and stats.json lists them.
    `max_image_bytes` / `max_image_pixels` / `confine`: limits on every image (`encode_image`);
    clips (`add_video`, `add_frames`): `max_video_bytes`, `max_image_pixels` a frame, between
    `min_frames` and `max_video_frames` frames; audio clips (`add_audio`, {"audio": ...} segments):
    `max_audio_bytes`, between `min_audio_seconds` and `max_audio_seconds`, written at `sample_rate`.
    """

    def __init__(self, out_dir: str, prefix: str = "train", *, maxcount: int = 10000,
                 maxsize: float = 3e9, resize: int | None = None, image_format: str = "keep",
                 quality: int = 95, max_image_bytes: int = MAX_IMAGE_BYTES,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, confine: str | None = None,
                 max_video_bytes: int = MAX_IMAGE_BYTES, max_video_frames: int = MAX_VIDEO_FRAMES,
                 min_frames: int = 1, sample_rate: int = 16000, max_audio_bytes: int = MAX_IMAGE_BYTES,
                 max_audio_seconds: float = 600.0, min_audio_seconds: float = 0.0):
        if maxcount < 1 or maxsize <= 0:
            raise ValueError("maxcount and maxsize must be positive")
        if max_image_bytes < 1 or max_image_pixels < 1:
            raise ValueError("max_image_bytes and max_image_pixels must be positive")
        if max_video_bytes < 1 or not 1 <= min_frames <= max_video_frames:
            raise ValueError("max_video_bytes must be positive and 1 <= min_frames <= max_video_frames")
        self.max_video_bytes, self.max_video_frames, self.min_frames = max_video_bytes, max_video_frames, min_frames
        if sample_rate < 1 or max_audio_bytes < 1 or not 0 <= min_audio_seconds <= max_audio_seconds:
            raise ValueError("sample_rate and max_audio_bytes must be positive and 0 <= min_audio_seconds <= "
                             "max_audio_seconds")
        self.sample_rate, self.max_audio_bytes = sample_rate, max_audio_bytes
        self.max_audio_seconds, self.min_audio_seconds = max_audio_seconds, min_audio_seconds
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

    def _encode_audio(self, audio) -> tuple[bytes, str]:
        return encode_audio(audio, self.sample_rate, max_bytes=self.max_audio_bytes, max_seconds=self.max_audio_seconds,
                            min_seconds=self.min_audio_seconds, confine=self.confine)

    # -- sample kinds
    def add_caption(self, image, caption, *, captions: list[str] | None = None) -> bool:
        """image: path | bytes | PIL image. Returns False (and counts why) when skipped."""
        self.inputs += 1
        try:
            caption = caption_text(caption, str(image)[:200] if isinstance(image, str) else "")
            if captions is not None:
                if not isinstance(captions, list):
                    raise InputError("bad_caption", f"captions is {type(captions).__name__}")
                captions = [caption_text(c, "captions") for c in captions]
            data, ext = self._encode(image)
        except InputError as e:
            self.skip(e.reason, e.detail)
            return False
        members = {ext: data, "txt": caption.strip().encode("utf-8")}
        if captions:
            members["json"] = json.dumps({"captions": captions}).encode("utf-8")
        self.write_raw(members)
        return True

    def add_video(self, video, caption) -> bool:
        """A clip (path | bytes: MP4 or WebM, every frame decoded to check it) + caption ->
        `KEY.mp4|webm` (the clip's bytes as they are) + `KEY.txt`. False (counted) when skipped."""
        self.inputs += 1
        try:
            caption = caption_text(caption, str(video)[:200] if isinstance(video, str) else "")
            data, ext = encode_video(video, max_bytes=self.max_video_bytes, max_pixels=self.max_image_pixels,
                                     max_frames=self.max_video_frames, min_frames=self.min_frames,
                                     confine=self.confine)
        except InputError as e:
            self.skip(e.reason, e.detail)
            return False
        self.write_raw({ext: data, "txt": caption.strip().encode("utf-8")})
        return True

    def add_audio(self, audio, caption) -> bool:
        """An audio clip (path | bytes: WAV, FLAC, MP3 or Ogg, decoded whole to check it) + caption ->
        `KEY.wav|flac|mp3|ogg` (the bytes as they are at `sample_rate`; otherwise resampled, FLAC)
        + `KEY.txt`. False (counted) when skipped."""
        self.inputs += 1
        try:
            caption = caption_text(caption, str(audio)[:200] if isinstance(audio, str) else "")
            data, ext = self._encode_audio(audio)
        except InputError as e:
            self.skip(e.reason, e.detail)
            return False
        self.write_raw({ext: data, "txt": caption.strip().encode("utf-8")})
        return True

    def add_frames(self, frames: list, caption) -> bool:
        """A clip as its frames in order (paths | bytes | PIL images) + caption -> `KEY.0.jpg`,
        `KEY.1.jpg`, ... (each image checked and encoded as `add_caption`'s) + `KEY.txt`."""
        self.inputs += 1
        try:
            caption = caption_text(caption, "frames")
            if not isinstance(frames, list) or not frames:
                raise InputError("missing_video", "no frames")
            if len(frames) < self.min_frames:
                raise InputError("too_few_frames", f"{len(frames)} frames < --min-frames {self.min_frames}")
            if len(frames) > self.max_video_frames:
                raise InputError("video_too_long", f"{len(frames)} frames > --max-video-frames {self.max_video_frames}")
            members = {}
            for i, frame in enumerate(frames):
                data, ext = self._encode(frame)
                members[f"{i}.{ext}"] = data
        except InputError as e:
            self.skip(e.reason, e.detail)
            return False
        members["txt"] = caption.strip().encode("utf-8")
        self.write_raw(members)
        return True

    def add_interleaved(self, segments: list[dict]) -> bool:
        """segments: [{"text": str} | {"image": path|bytes|PIL} | {"audio": path|bytes}] in document order."""
        self.inputs += 1
        try:
            if not isinstance(segments, list) or not segments:
                raise InputError("bad_document", "no segments")
            out_segments, members, n_img = [], {}, 0
            has_text = False
            for seg in segments:
                if not isinstance(seg, dict):
                    raise InputError("bad_document", f"segment {short(seg)}")
                if "image" in seg and seg["image"] is not None:
                    data, ext = self._encode(seg["image"])
                    name = f"{n_img}.{ext}"
                    members[name] = data
                    out_segments.append({"image": name})
                    n_img += 1
                elif "audio" in seg and seg["audio"] is not None:
                    data, ext = self._encode_audio(seg["audio"])
                    name = f"{n_img}.{ext}"  # media share one numbering: a member per medium
                    members[name] = data
                    out_segments.append({"audio": name})
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
                    raise InputError("bad_document", f"segment {short(seg)}")
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
