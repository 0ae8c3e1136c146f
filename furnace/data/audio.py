"""Audio clips: decoding with PyAV (as `furnace.data.video`), to mono float32 at the tower's rate,
and writing clips (the synthetic set, the shard writer, the tests).

A clip is a WAV, FLAC, MP3 or Ogg file, recognised by its first bytes whatever its member name
says; anything else is refused before FFmpeg sees it (none of FFmpeg's other demuxers, playlists
among them, can be reached from a shard). Its first audio stream must be PCM, FLAC, MP3, Vorbis
or Opus, with at most MAX_CHANNELS channels at most MAX_SAMPLE_RATE Hz; channels are mixed down to mono.

The loader never resamples: a clip whose rate is not the tower's is skipped (wrong_sample_rate;
`furnace-shards audio` resamples when it writes). What one untrusted clip can make a worker do is
bounded: its bytes by the tar reader (`data.max_member_bytes`), its decoding by
`data.max_audio_seconds` (samples are counted as frames decode; past the bound it stops:
audio_too_long), and what it keeps by the tower's window (the first `keep` samples). The decoder
runs on one thread.
"""
from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np

AUDIO_EXTS = ("wav", "flac", "mp3", "ogg")
# container sniffed from the bytes -> the FFmpeg demuxer that reads it
DEMUXERS = {"wav": "wav", "flac": "flac", "mp3": "mp3", "ogg": "ogg"}
CODECS = ("flac", "mp3", "mp3float", "vorbis", "opus")  # and every pcm_* codec
MAX_CHANNELS = 8
MAX_SAMPLE_RATE = 384_000  # a header claiming more is refused: the decoding bound counts samples


class AudioError(ValueError):
    """A clip that is not decoded; `reason` is the skip counter's key (unsupported_audio,
    bad_audio, wrong_sample_rate, audio_too_long, audio_too_short)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class AudioSpec:
    """What the loader makes of clips: mono float32 at `sample_rate`, the first `samples` of each
    (the tower's window), clips outside [min_seconds, max_seconds] skipped."""
    sample_rate: int
    samples: int
    max_seconds: float = 600.0
    min_seconds: float = 0.05


def is_audio_member(ext: str) -> bool:
    """`wav` or an indexed member like `0.wav` (interleaved documents)."""
    return ext.rsplit(".", 1)[-1].lower() in AUDIO_EXTS


def container_of(head: bytes) -> str | None:
    """"wav", "flac", "mp3" or "ogg" from a file's first bytes; None for anything else."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"  # an ID3 tag, or an MPEG audio frame's sync word
    return None


def _av():
    import av  # lazy: only audio needs it

    return av


def _open(data: bytes):
    """(container, audio stream) of a clip, its container, codec and channels checked."""
    kind = container_of(bytes(data[:16]))
    if kind is None:
        raise AudioError("unsupported_audio", f"not WAV, FLAC, MP3 or Ogg (starts {bytes(data[:8])!r})")
    av = _av()
    try:
        container = av.open(io.BytesIO(data), mode="r", format=DEMUXERS[kind])
    except Exception as e:  # FFmpeg raises many types on bad bytes
        raise AudioError("bad_audio", f"{type(e).__name__}: {e}") from None
    try:
        if not container.streams.audio:
            raise AudioError("bad_audio", "no audio stream")
        stream = container.streams.audio[0]
        cc = stream.codec_context
        codec = cc.codec.canonical_name
        if codec not in CODECS and not codec.startswith("pcm_"):
            raise AudioError("unsupported_audio", f"codec {codec} (read: pcm, {', '.join(CODECS)})")
        if not 1 <= cc.channels <= MAX_CHANNELS:
            raise AudioError("unsupported_audio", f"{cc.channels} channels (at most {MAX_CHANNELS})")
        if not 1 <= cc.sample_rate <= MAX_SAMPLE_RATE:
            raise AudioError("unsupported_audio", f"{cc.sample_rate} Hz (at most {MAX_SAMPLE_RATE})")
        cc.thread_count = 1
    except BaseException:
        container.close()
        raise
    return container, stream


def decode_audio(data: bytes, sample_rate: int, *, max_seconds: float = 600.0, min_seconds: float = 0.0,
                 keep: int | None = None, resample: bool = False) -> np.ndarray:
    """Clip bytes -> mono float32 [n] at `sample_rate`: its first `keep` samples (None: all).
    Without `resample` a clip at another rate is refused (wrong_sample_rate); with it, it is
    converted (the shard writer). Raises AudioError: audio_too_long past `max_seconds` of the
    clip (decoding stops there), audio_too_short under `min_seconds`, bad_audio, unsupported_audio."""
    return _decode(data, sample_rate, max_seconds, min_seconds, keep, resample)[0]


def _decode(data: bytes, sample_rate: int | None, max_seconds: float, min_seconds: float, keep: int | None,
            resample: bool) -> tuple[np.ndarray, int, int]:
    """(the kept samples, the clip's samples at its own rate, its rate); `sample_rate` None: its own."""
    av = _av()
    container, stream = _open(data)
    try:
        with container:
            rate = stream.codec_context.sample_rate
            sample_rate = sample_rate or rate
            if not rate or (rate != sample_rate and not resample):
                raise AudioError("wrong_sample_rate", f"{rate} Hz, the tower reads {sample_rate} Hz")
            limit = int(max_seconds * rate)
            mixer = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            parts, kept, seen = [], 0, 0
            want = None if keep is None else int(keep)

            def take(frames):
                nonlocal kept
                for f in frames:
                    x = f.to_ndarray().reshape(-1)
                    if want is not None:
                        x = x[: max(0, want - kept)]
                    if x.size:
                        parts.append(x.astype(np.float32, copy=True))
                        kept += x.size

            packets = (p for p in container.demux(stream) if p.size)  # not the demuxer's empty flush packet
            for packet in itertools.chain(packets, [None]):  # None: the decoder's flush
                for frame in stream.codec_context.decode(packet):
                    if frame.sample_rate != rate:
                        raise AudioError("wrong_sample_rate" if not resample else "bad_audio",
                                         f"the rate changes from {rate} to {frame.sample_rate} Hz mid-clip")
                    seen += frame.samples
                    if seen > limit:
                        raise AudioError("audio_too_long", f"more than {max_seconds:g} s")
                    frame.pts = None  # the resampler keeps its own timing
                    take(mixer.resample(frame))
            take(mixer.resample(None))
    except AudioError:
        raise
    except (av.FFmpegError, ValueError, OSError, MemoryError) as e:
        raise AudioError("bad_audio", f"{type(e).__name__}: {e}") from None
    if seen == 0:
        raise AudioError("bad_audio", "no sample decodes")
    if seen < min_seconds * rate:
        raise AudioError("audio_too_short", f"{seen / rate:.3f} s < {min_seconds:g} s")
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), seen, rate


def probe_audio(data: bytes, *, max_seconds: float = 600.0) -> dict:
    """Decode a whole clip (the shard writer's check): {"container", "codec", "sample_rate",
    "channels", "seconds"}. Raises AudioError."""
    container, stream = _open(data)
    with container:
        cc = stream.codec_context
        info = {"container": container_of(bytes(data[:16])), "codec": cc.codec.canonical_name,
                "sample_rate": cc.sample_rate, "channels": cc.channels}
    _, n, rate = _decode(data, None, max_seconds, 0.0, 0, False)  # counted, none kept
    return info | {"seconds": n / rate}


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str = "flac") -> bytes:
    """Mono float samples in [-1, 1] ([n]) -> a 16-bit FLAC or WAV file's bytes."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"samples must be a non-empty 1-D array; got shape {samples.shape}")
    if fmt not in ("flac", "wav"):
        raise ValueError(f"fmt must be flac or wav; got {fmt!r}")
    av = _av()
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)[None]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream("flac" if fmt == "flac" else "pcm_s16le", rate=sample_rate)
        stream.layout = "mono"
        stream.format = "s16"
        stream.codec_context.thread_count = 1
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()
