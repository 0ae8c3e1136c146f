"""Video clips: decoding with PyAV, uniform frame sampling, and writing clips (the synthetic set,
the tests).

PyAV (FFmpeg's libraries, bundled in its wheels) rather than torchvision or decord: it is
maintained, needs no system FFmpeg, and does not pull in torchvision, which has no build for the
pinned CPU torch (and, once installed, is imported by transformers).

A clip is an MP4 (ISO BMFF, recognised by its `ftyp` box) or a WebM / Matroska file (its EBML
magic), whatever its member name says; any other container is refused before FFmpeg sees it, so
none of FFmpeg's other demuxers (playlists that open further files, image sequences ...) can be
reached from a shard. Its first video stream must be H.264, HEVC, VP8, VP9, AV1 or MPEG-4 part 2.

What one untrusted clip can make a worker do is bounded: its bytes by the tar reader
(`data.max_member_bytes`), its frames by `max_frames` (the packets are counted, without decoding,
before any frame is decoded), and every frame's size by `max_pixels` (the stream header and every
decoded frame are checked; inside the decoder, FFmpeg's own `max_pixels` option, at twice the
bound as it counts padded buffers, stops a stream that declares larger frames midway).
The decoder runs on one thread. Decoding stops at the last sampled frame.

Sampling: F frames of a clip of N (N >= F) are the frames at the centres of F equal segments,
`uniform_indices(N, F)[i] = floor((2i + 1) N / 2F)`; N < F is refused (too_few_frames).
"""
from __future__ import annotations

import io

import numpy as np

VIDEO_EXTS = ("mp4", "webm")
# container sniffed from the bytes -> the FFmpeg demuxer that reads it
DEMUXERS = {"mp4": "mp4", "webm": "matroska"}
CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4")
MAX_VIDEO_FRAMES = 1024


class VideoError(ValueError):
    """A clip that is not decoded; `reason` is the skip counter's key (unsupported_video,
    bad_video, video_too_large, video_too_long, too_few_frames)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def is_video_member(ext: str) -> bool:
    return ext.lower() in VIDEO_EXTS


def container_of(head: bytes) -> str | None:
    """"mp4" or "webm" from a file's first bytes; None for anything else."""
    if head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"  # EBML: WebM and Matroska
    return None


def uniform_indices(n: int, f: int) -> list[int]:
    """The F frames sampled from N: the centre of each of F equal segments (strictly increasing;
    N == F gives every frame)."""
    if f < 1 or n < f:
        raise VideoError("too_few_frames", f"{n} frames, {f} wanted")
    return [(2 * i + 1) * n // (2 * f) for i in range(f)]


_REFORMATTER = None


def _av():
    import av  # lazy: only clips need it

    return av


def _reformatter():
    """One per process: it keeps its scaler between frames of the same size (a new one per frame
    costs more than the decoding)."""
    global _REFORMATTER
    if _REFORMATTER is None:
        from av.video.reformatter import VideoReformatter

        _REFORMATTER = VideoReformatter()
    return _REFORMATTER


def _open(data: bytes, max_pixels: int):
    """(container, video stream) of a clip, its container, codec and frame size checked."""
    kind = container_of(bytes(data[:16]))
    if kind is None:
        raise VideoError("unsupported_video", f"not MP4 or WebM (starts {bytes(data[:8])!r})")
    av = _av()
    try:
        container = av.open(io.BytesIO(data), mode="r", format=DEMUXERS[kind])
    except Exception as e:  # FFmpeg raises many types on bad bytes
        raise VideoError("bad_video", f"{type(e).__name__}: {e}") from None
    try:
        if not container.streams.video:
            raise VideoError("bad_video", "no video stream")
        stream = container.streams.video[0]
        cc = stream.codec_context
        codec = cc.codec.canonical_name
        if codec not in CODECS:
            raise VideoError("unsupported_video", f"codec {codec} (read: {', '.join(CODECS)})")
        if cc.width * cc.height > max_pixels:
            raise VideoError("video_too_large", f"{cc.width}x{cc.height} pixels > {max_pixels}")
        cc.thread_count = 1
        cc.options = {"max_pixels": str(max(2 * max_pixels, 1 << 16))}
    except BaseException:
        container.close()
        raise
    return container, stream


def _packets(container, stream, max_frames: int) -> list:
    """The stream's packets (compressed, bounded by the clip's bytes), at most `max_frames`."""
    out = []
    for p in container.demux(stream):
        if p.size == 0:  # the demuxer's final flush packet
            continue
        out.append(p)
        if len(out) > max_frames:
            raise VideoError("video_too_long", f"more than {max_frames} frames")
    return out


def _frames(stream, packets, max_pixels: int):
    """Decoded frames in presentation order (the decoder flushed at the end)."""
    for p in [*packets, None]:
        for frame in stream.codec_context.decode(p):
            if frame.width * frame.height > max_pixels:
                raise VideoError("video_too_large", f"a {frame.width}x{frame.height} frame > {max_pixels} pixels")
            yield frame


def _sample(data: bytes, frames: int, image_size: int | None, max_pixels: int, max_frames: int,
            shown: int | None) -> tuple[int, np.ndarray | None]:
    """Sample `frames` of `shown` frames (None: one a packet) -> (frames decoded, the sampled
    frames); (every frame the decoder shows, None) when it shows fewer than were sampled from."""
    container, stream = _open(data, max_pixels)
    with container:
        packets = _packets(container, stream, max_frames)
        want = uniform_indices(len(packets) if shown is None else shown, frames)
        size = {} if image_size is None else {"width": image_size, "height": image_size, "interpolation": "BICUBIC"}
        out, got, n = None, 0, 0
        for frame in _frames(stream, packets, max_pixels):
            k, n = n, n + 1
            if k != want[got]:
                continue
            rgb = _reformatter().reformat(frame, format="rgb24", **size).to_ndarray()
            if out is None:
                out = np.empty((frames, *rgb.shape), dtype=np.uint8)
            elif rgb.shape != out.shape[1:]:  # the frame size changed mid-clip, and no resize
                raise VideoError("bad_video", f"frame {k} is {rgb.shape}, frame {want[0]} {out.shape[1:]}")
            out[got] = rgb
            got += 1
            if got == frames:
                return n, out
        return n, None


def decode_clip(data: bytes, frames: int, image_size: int | None, *, max_pixels: int = 40_000_000,
                max_frames: int = MAX_VIDEO_FRAMES) -> np.ndarray:
    """Clip bytes -> uint8 [frames, S, S, 3], the `uniform_indices` frames resized (bicubic) to
    S = `image_size` (None: kept at the clip's size). Raises VideoError.

    N is the number of packets, counted before decoding, and the sampled indices count the
    frames the decoder shows. Should it show fewer than N (hidden frames, such as VP8's alt-ref
    frames, or damaged ones) and stop before the last sampled index, the clip is decoded a second
    time, sampling the M frames it showed (M < F: too_few_frames)."""
    av = _av()
    try:
        shown, out = _sample(data, frames, image_size, max_pixels, max_frames, None)
        if out is None:
            if shown < frames:
                raise VideoError("too_few_frames" if shown else "bad_video", f"{shown} frames decode, {frames} wanted")
            shown, out = _sample(data, frames, image_size, max_pixels, max_frames, shown)
            if out is None:
                raise VideoError("bad_video", "the frames shown changed between two decodes")
        return out
    except VideoError:
        raise
    except (av.FFmpegError, ValueError, OSError, MemoryError) as e:
        raise VideoError("bad_video", f"{type(e).__name__}: {e}") from None


def probe_clip(data: bytes, *, max_pixels: int = 40_000_000, max_frames: int = MAX_VIDEO_FRAMES) -> dict:
    """Decode every frame of a clip (the shard writer's check): {"container", "codec", "frames"
    (the frames the decoder shows), "width", "height"}. Raises VideoError."""
    av = _av()
    container, stream = _open(data, max_pixels)
    try:
        with container:
            cc = stream.codec_context
            info = {"container": container_of(bytes(data[:16])), "codec": cc.codec.canonical_name,
                    "width": cc.width, "height": cc.height}
            packets = _packets(container, stream, max_frames)
            n = sum(1 for _ in _frames(stream, packets, max_pixels))
    except VideoError:
        raise
    except (av.FFmpegError, ValueError, OSError, MemoryError) as e:
        raise VideoError("bad_video", f"{type(e).__name__}: {e}") from None
    if n == 0:
        raise VideoError("bad_video", "no frame decodes")
    return info | {"frames": n}


def encode_clip(frames: np.ndarray, fmt: str = "mp4", *, fps: int = 8, crf: int = 12,
                bframes: bool = True) -> bytes:
    """uint8 [N, H, W, 3] (H, W even) -> an MP4 (H.264, yuv420p) or WebM (VP8) clip's bytes.
    One encoder thread: the bytes depend only on the frames and the settings."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [N, H, W, 3]; got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame height and width must be even (4:2:0 chroma); got {frames.shape[1:3]}")
    if fmt not in DEMUXERS:
        raise ValueError(f"fmt must be one of {', '.join(DEMUXERS)}; got {fmt!r}")
    av = _av()
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        if fmt == "mp4":
            stream = out.add_stream("libx264", rate=fps)
            stream.options = {"crf": str(crf), "preset": "veryfast", **({} if bframes else {"bf": "0"})}
        else:
            stream = out.add_stream("libvpx", rate=fps)
            stream.options = {"crf": str(max(4, crf)), "b": "2M", "deadline": "good", "cpu-used": "4"}
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
