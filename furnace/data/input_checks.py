"""What the shard writer accepts from untrusted inputs: image and clip files read only when they
are regular files within a size bound (optionally confined under a folder), images decoded only
as JPEG/PNG/WEBP within a pixel bound, clips only as MP4/WebM whose every frame decodes within the
pixel and frame bounds (`furnace.data.video`), audio clips only as WAV/FLAC/MP3/Ogg that decode
whole within a length bound (`furnace.data.audio`; resampled to the run's rate when needed), and
captions that are UTF-8-encodable text.
Anything else raises `InputError` with the reason the writer counts the skip under."""
from __future__ import annotations

import io
import os
import stat
import warnings

from PIL import Image

from furnace.data.audio import AudioError, decode_audio, encode_audio as write_audio, probe_audio
from furnace.data.images import PIL_FORMATS
from furnace.data.video import MAX_VIDEO_FRAMES, VideoError, probe_clip

_PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 40_000_000


class InputError(Exception):
    """A skipped input; `reason` is the stats key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def short(value, n: int = 80) -> str:
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


def _image_path(src, kind: str = "image") -> str:
    """`src` as a usable path string; paths come from untrusted JSON (ints, lists, NUL bytes ...).
    `kind`: image | video, the word in the skip reasons."""
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if src is None or src == "":
        raise InputError(f"missing_{kind}", f"no {kind} path")
    if not isinstance(src, str):
        raise InputError(f"bad_{kind}_path", f"{type(src).__name__} {short(src)}")
    try:
        if "\x00" in src:
            raise ValueError("NUL byte in path")
        os.fsencode(src)  # lone surrogates from JSON "\ud800" cannot name a file
    except ValueError as e:
        raise InputError(f"bad_{kind}_path", f"{short(src, 300)}: {e}") from None
    return src


def _is_under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # different drives (Windows)
        return False


def read_image_file(path: str, *, max_bytes: int = MAX_IMAGE_BYTES, confine: str | None = None,
                    kind: str = "image") -> bytes:
    """Bytes of the regular file `path` (at most `max_bytes`, else InputError image_too_large).

    Devices, FIFOs, sockets and directories are refused from their stat, never opened or read
    (/dev/zero never ends, a FIFO blocks). `confine`: the file, symlinks resolved, must lie under
    this folder (outside_images_root otherwise). `kind`: image | video | audio, the word in the
    reasons (missing_video, video_too_large, unreadable_video ...).
    """
    flag = f"--max-{kind}-bytes"
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
            raise InputError(f"{kind}_too_large", f"{path}: {st.st_size} bytes > {flag} {max_bytes}")
        # O_NONBLOCK: should the path become a FIFO after the stat, the open still cannot block.
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)),
                  "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InputError("not_a_regular_file", path)
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise InputError(f"missing_{kind}", path) from None
    except (OSError, ValueError) as e:
        raise InputError(f"unreadable_{kind}", f"{path}: {e}") from None
    if len(raw) > max_bytes:  # grew after the stat
        raise InputError(f"{kind}_too_large", f"{path}: more than {flag} {max_bytes}")
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


def encode_video(src, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                 max_frames: int = MAX_VIDEO_FRAMES, min_frames: int = 1, confine: str | None = None
                 ) -> tuple[bytes, str]:
    """Validate a clip (a path or its bytes) by decoding every frame; returns (its bytes
    unchanged, "mp4" | "webm" as its content says). InputError reasons: missing_video,
    bad_video_path, video_too_large (bytes or pixels), unsupported_video (container or codec),
    bad_video (undecodable), video_too_long (more than `max_frames`), too_few_frames (fewer than
    `min_frames`), and read_image_file's not_a_regular_file / outside_images_root / unreadable_video."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        raw, name = bytes(src), "<bytes>"
        if len(raw) > max_bytes:
            raise InputError("video_too_large", f"<bytes>: {len(raw)} bytes > {max_bytes}")
    else:
        name = _image_path(src, "video")
        raw = read_image_file(name, max_bytes=max_bytes, confine=confine, kind="video")
    if not raw:
        raise InputError("bad_video", f"{name}: empty file")
    try:
        info = probe_clip(raw, max_pixels=max_pixels, max_frames=max_frames)
    except VideoError as e:
        raise InputError(e.reason, f"{name}: {e.detail}") from None
    if info["frames"] < min_frames:
        raise InputError("too_few_frames", f"{name}: {info['frames']} frames < --min-frames {min_frames}")
    return raw, info["container"]


def encode_audio(src, sample_rate: int, *, max_bytes: int = MAX_IMAGE_BYTES, max_seconds: float = 600.0,
                 min_seconds: float = 0.0, confine: str | None = None) -> tuple[bytes, str]:
    """Validate an audio clip (a path or its bytes) by decoding all of it; returns (bytes, ext):
    the file's bytes unchanged ("wav" | "flac" | "mp3" | "ogg" as its content says) when it is at
    `sample_rate`, else the clip resampled to it (mono) as FLAC. InputError reasons: missing_audio,
    bad_audio_path, audio_too_large (bytes), unsupported_audio (container, codec, channels),
    bad_audio (undecodable), audio_too_long (past `max_seconds`), audio_too_short (under
    `min_seconds`), and read_image_file's not_a_regular_file / outside_images_root / unreadable_audio."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        raw, name = bytes(src), "<bytes>"
        if len(raw) > max_bytes:
            raise InputError("audio_too_large", f"<bytes>: {len(raw)} bytes > {max_bytes}")
    else:
        name = _image_path(src, "audio")
        raw = read_image_file(name, max_bytes=max_bytes, confine=confine, kind="audio")
    if not raw:
        raise InputError("bad_audio", f"{name}: empty file")
    try:
        info = probe_audio(raw, max_seconds=max_seconds)
        if info["seconds"] < min_seconds:
            raise AudioError("audio_too_short", f"{info['seconds']:.3f} s < {min_seconds:g} s")
        if info["sample_rate"] == sample_rate:
            return raw, info["container"]
        samples = decode_audio(raw, sample_rate, max_seconds=max_seconds, resample=True)
        return write_audio(samples, sample_rate, "flac"), "flac"
    except AudioError as e:
        raise InputError(e.reason, f"{name}: {e.detail}") from None


def caption_text(value, what: str) -> str:
    """A caption: None/blank -> missing_caption, not a UTF-8-encodable string -> bad_caption."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError("missing_caption", what)
    if not isinstance(value, str):
        raise InputError("bad_caption", f"{what}: caption is {type(value).__name__} {short(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates, e.g. JSON "\ud800"
        raise InputError("bad_caption", f"{what}: {e}") from None
    return value
