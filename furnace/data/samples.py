"""One raw tar sample -> one row (token ids, decoded media), or a SkipSample with its reason.

A row is (ids, [media], interleaved, filler): `interleaved` marks documents (their labels skip
the text outside image chunks), `filler` the loader's padding rows. A medium is a still image,
uint8 [S, S, 3], or a clip's F = `frames` sampled frames, uint8 [F, S, S, 3]; the collate
repeats a still over the F frames of the batch.

A caption sample's medium is, in this order of preference: a clip member (`KEY.mp4` / `KEY.webm`,
decoded by `furnace.data.video`), a still (`KEY.jpg|jpeg|png|webp`), or a frame folder
(`KEY.0.jpg`, `KEY.1.jpg`, ... in the order of their numbers). F frames are sampled uniformly
(`video.uniform_indices`) from a clip or a frame folder of N >= F frames (only those F are
decoded from a folder); N < F is skipped as too_few_frames. Clips in interleaved documents are
not read.
An audio clip (`KEY.wav|flac|mp3|ogg`, decoded by `furnace.data.audio`, when the decoder has an
`AudioSpec`: a run with an audio tower) is a medium too: float32 [n] mono samples, at most the
tower's window. A caption sample without any image medium takes its clip; an interleaved
document names clips as it names images ({"audio": "0.flac"}), so images and audio mix.
Whatever one sample's bytes hold, `row` either returns a row or raises SkipSample: an error
no check below anticipates is counted as `bad_sample`, never raised.
"""
from __future__ import annotations

import base64
import binascii
import json
import re

import numpy as np

from furnace.data.audio import AUDIO_EXTS, AudioError, AudioSpec, decode_audio, is_audio_member
from furnace.data.images import IMAGE_EXTS, ImageTooLarge, decode_image, is_image_member
from furnace.data.text import SkipSample, TextEncoder
from furnace.data.video import MAX_VIDEO_FRAMES, VIDEO_EXTS, VideoError, decode_clip, uniform_indices

FRAME_MEMBER = re.compile(r"([0-9]+)\.(?:jpg|jpeg|png|webp)")


class Clip:
    """A clip member's bytes, not decoded."""
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


class FrameFolder:
    """A frame folder's encoded frames, in order, not decoded."""
    __slots__ = ("frames",)

    def __init__(self, frames: list[bytes]):
        self.frames = frames


class Audio:
    """An audio member's bytes, not decoded."""
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


class SampleDecoder:
    def __init__(self, encoder: TextEncoder, image_size: int, max_image_pixels: int = 40_000_000,
                 frames: int = 1, max_video_frames: int = MAX_VIDEO_FRAMES, audio: AudioSpec | None = None):
        self.encoder, self.image_size, self.max_image_pixels = encoder, image_size, max_image_pixels
        self.frames, self.max_video_frames = frames, max_video_frames
        self.audio = audio

    def row(self, raw: dict) -> tuple:
        """raw tar sample -> (ids, images, interleaved, filler=False); raises SkipSample."""
        if "__skip__" in raw:  # past a read bound (furnace/data/tar.py)
            raise SkipSample(raw["__skip__"])
        try:
            return self._row(raw)
        except (SkipSample, ImportError):  # ImportError: no PyAV, which no sample should hide
            raise
        except RecursionError:  # JSON nested deeper than the parser goes
            raise SkipSample("bad_json") from None
        except Exception:
            raise SkipSample("bad_sample") from None

    def _row(self, raw: dict) -> tuple:
        ids, media, interleaved = self.parse(raw)
        return ids, [self.media(m) for m in media], interleaved, False

    def parse(self, raw: dict) -> tuple[list[int], list, bool]:
        """(token ids, media in order, interleaved) of a sample, nothing decoded: a medium is an
        encoded image (bytes), a `Clip` or a `FrameFolder`.
        Three layouts: a caption pair (image + .txt, or a .json with "caption"/"captions": also
        img2dataset's shards, whose .json is metadata); furnace's interleaved document (.json
        "segments" naming image members); an MMC4 document as open_flamingo's shards hold it
        (.json "text_list" + "image_info" with base64 images, each before its matched sentence)."""
        doc = None
        if "json" in raw:
            try:
                doc = json.loads(raw["json"].decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise SkipSample("bad_json") from None
            if not isinstance(doc, dict):
                raise SkipSample("bad_json")
        if doc is not None and "segments" in doc:
            segs = doc["segments"]
            if not isinstance(segs, list) or not all(_valid_segment(s) for s in segs):
                raise SkipSample("bad_json")
            ids, members = self.encoder.document(segs)
            images = [raw.get(m.lower()) for m in members]
            if any(data is None for data in images):
                raise SkipSample("missing_image")
            return ids, [Audio(d) if is_audio_member(m) else d for m, d in zip(members, images)], True
        if doc is not None and "text_list" in doc:
            segs, encoded = _mmc4_segments(doc)
            ids, picked = self.encoder.document(segs)
            return ids, [_b64(encoded[j]) for j in picked], True
        text = None
        if "txt" in raw:
            try:
                text = raw["txt"].decode("utf-8")
            except UnicodeDecodeError:
                raise SkipSample("missing_caption") from None
        elif doc is not None:
            captions = doc.get("captions") or []
            if not isinstance(captions, list):
                raise SkipSample("bad_json")
            text = doc.get("caption") or next(iter(captions), None)
        if not isinstance(text, str) or not text.strip():
            raise SkipSample("missing_caption")
        medium = _caption_medium(raw)
        return self.encoder.caption(text.strip(), audio=isinstance(medium, Audio)), [medium], False

    def filler(self) -> tuple:
        """A row with no image and no labelled token: what a batch holds when all its samples were skipped."""
        return self.encoder.filler(), [], False, True

    def media(self, item) -> np.ndarray:
        """A parsed medium -> uint8 [S, S, 3] (a still) or [F, S, S, 3] (a clip, a frame folder),
        or float32 [n] (an audio clip)."""
        if isinstance(item, Audio):
            a = self.audio
            if a is None:
                raise SkipSample("audio_not_enabled")
            try:
                return decode_audio(item.data, a.sample_rate, max_seconds=a.max_seconds, min_seconds=a.min_seconds,
                                    keep=a.samples)
            except AudioError as e:
                raise SkipSample(e.reason) from None
        if isinstance(item, Clip):
            try:
                return decode_clip(item.data, self.frames, self.image_size, max_pixels=self.max_image_pixels,
                                   max_frames=self.max_video_frames)
            except VideoError as e:
                raise SkipSample(e.reason) from None
        if isinstance(item, FrameFolder):
            n = len(item.frames)
            if n > self.max_video_frames:
                raise SkipSample("video_too_long")
            try:
                picked = uniform_indices(n, self.frames)
            except VideoError as e:
                raise SkipSample(e.reason) from None
            return np.stack([self.image(item.frames[i]) for i in picked])
        return self.image(item)

    def image(self, data: bytes) -> np.ndarray:
        try:
            return decode_image(data, self.image_size, self.max_image_pixels)
        except ImageTooLarge:
            raise SkipSample("image_too_large") from None
        except Exception:  # any PIL failure on bad bytes
            raise SkipSample("bad_image") from None


def _caption_medium(raw: dict):
    """A caption sample's medium: its clip, else its still, else its frame folder, else its audio clip."""
    clip = next((raw[k] for k in VIDEO_EXTS if k in raw), None)
    if clip is not None:
        return Clip(clip)
    img = next((raw[k] for k in IMAGE_EXTS if k in raw), None)
    if img is not None:
        return img
    frames = {}
    for name, data in raw.items():
        m = FRAME_MEMBER.fullmatch(name)
        if m is not None:
            i = int(m[1])
            if i in frames:  # 1.jpg and 1.png, or 1.jpg and 01.jpg: which is frame 1?
                raise SkipSample("bad_video")
            frames[i] = data
    if not frames:
        audio = next((raw[k] for k in AUDIO_EXTS if k in raw), None)
        if audio is not None:
            return Audio(audio)
        raise SkipSample("missing_image")
    return FrameFolder([frames[i] for i in sorted(frames)])


def _mmc4_segments(doc: dict) -> tuple[list[dict], list[str]]:
    """MMC4 -> furnace segments ({"image": j} before sentence matched_text_index) and the base64
    images by j; SkipSample("bad_json") for fields of the wrong types."""
    texts, infos = doc["text_list"], doc.get("image_info") or []
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not isinstance(infos, list):
        raise SkipSample("bad_json")
    before: dict[int, list[int]] = {}
    encoded = []
    for j, info in enumerate(infos):
        at = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at <= len(texts) \
                or not isinstance(info.get("image_base64"), str):
            raise SkipSample("bad_json")
        before.setdefault(at, []).append(j)
        encoded.append(info["image_base64"])
    segs: list[dict] = []
    for i in range(len(texts) + 1):
        segs.extend({"image": j} for j in before.get(i, []))
        if i < len(texts):
            segs.append({"text": texts[i]})
    return segs, encoded


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SkipSample("bad_image") from None


def _valid_segment(seg) -> bool:
    """{"text": str}, {"image": member name of an image, e.g. "0.jpg"} or {"audio": member name
    of an audio clip, e.g. "1.flac"}."""
    if not isinstance(seg, dict):
        return False
    if "image" in seg:
        return isinstance(seg["image"], str) and is_image_member(seg["image"])
    if "audio" in seg:
        return isinstance(seg["audio"], str) and is_audio_member(seg["audio"])
    return True
