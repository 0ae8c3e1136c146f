"""Reading one webdataset tar shard into raw samples, never raising on bad data.

Only whitelisted members are read (text: .txt/.json; images: `IMAGE_EXTS`, also indexed as in
`0.jpg` for interleaved documents and frame folders; clips: .mp4/.webm; audio: .wav/.flac/.mp3/.ogg,
also indexed); any other member (.pyd, .pickle, .pth, ...) is never
decoded and is counted as `ignored_member`. What an untrusted shard can make a worker read is
bounded (`ReadLimits`): a member's bytes, the members of one sample, and, for a compressed
shard (gzip, bzip2, xz: recognised by its first bytes whatever its name), the bytes it expands
to. Everything past a bound is skipped and counted, never read into memory.
"""
from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from webdataset.tariterators import base_plus_ext

from furnace.data.audio import is_audio_member
from furnace.data.images import is_image_member
from furnace.data.video import is_video_member

TEXT_EXTS = ("txt", "json")
# Counted per shard or per member, not per sample (a sample's own skip reasons are the others).
SHARD_REASONS = ("unreadable_shard", "bad_shard", "shard_too_large", "unsupported_compression")
MEMBER_REASONS = ("ignored_member", "duplicate_member")
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members
# Magic bytes (a tar starts with a member name, which none of these can be mistaken for).
COMPRESSED = {b"\x1f\x8b\x08": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), re.compile(rb"BZh[1-9]1AY&SY"): bz2.BZ2File,
              b"\xfd7zXZ\x00": lzma.LZMAFile}
UNSUPPORTED = {b"\x28\xb5\x2f\xfd": "zstd", b"\x04\x22\x4d\x18": "lz4"}
log = logging.getLogger("furnace")


@dataclass(frozen=True)
class ReadLimits:
    max_member_bytes: int = 32 * 2**20
    max_members_per_sample: int = 256
    max_shard_bytes: int = 4 * 2**30     # expanded bytes of a compressed shard

    @classmethod
    def from_config(cls, data_cfg) -> "ReadLimits":
        return cls(data_cfg.max_member_bytes, data_cfg.max_members_per_sample, data_cfg.max_shard_bytes)


class ShardTooLarge(Exception):
    pass


class _Capped:
    """A read-only stream that raises ShardTooLarge once more than `cap` bytes came through."""

    def __init__(self, raw, cap: int):
        self.raw, self.cap, self.seen = raw, cap, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.seen += len(data)
        if self.seen > self.cap:
            raise ShardTooLarge
        return data


def member_allowed(ext: str) -> bool:
    ext = ext.lower()
    return ext in TEXT_EXTS or is_image_member(ext) or is_video_member(ext) or is_audio_member(ext)


def _open_stream(f, url: str, limits: ReadLimits, counter: Counter):
    """The stream of tar bytes in `f`: decompressed (under the expansion cap) when it starts
    with a compressor's magic, None (counted, logged) for a compression that is not read."""
    head = f.peek(16)[:16]
    for magic, name in UNSUPPORTED.items():
        if head.startswith(magic):
            counter["unsupported_compression"] += 1
            log.warning(f"shard {url}: {name}-compressed shards are not read; decompress it or write plain .tar")
            return None
    for magic, opener in COMPRESSED.items():
        if magic.match(head) if isinstance(magic, re.Pattern) else head.startswith(magic):
            return _Capped(opener(f), limits.max_shard_bytes)
    return f


def iter_shard_samples(url: str, counter: Counter, limits: ReadLimits = ReadLimits()) -> Iterator[dict]:
    """Raw samples {"__key__", "__url__", ext: bytes} of one tar, grouped by key. Shard and
    member problems are counted in `counter`: unreadable_shard, bad_shard, shard_too_large,
    unsupported_compression (per shard); ignored_member, duplicate_member (per member). A sample
    past a bound (a member over max_member_bytes, more members than max_members_per_sample)
    comes with `__skip__` set to the reason and without the data past the bound: the caller
    counts it as one skipped sample. A sample cut short by a damaged tar is marked `__truncated__`."""
    try:
        f = open(url, "rb")
    except OSError:
        counter["unreadable_shard"] += 1
        return
    current: dict | None = None
    members = 0
    with f:
        try:
            stream = _open_stream(f, url, limits, counter)
            if stream is None:
                return
            tf = tarfile.open(fileobj=stream, mode="r|")  # plain stream: decompression is ours, capped
            for info in tf:
                tf.members = []  # stream mode keeps every TarInfo otherwise
                if not info.isreg() or META_MEMBER.match(info.name):
                    continue
                key, ext = base_plus_ext(info.name)
                if ext is None or not member_allowed(ext):
                    counter["ignored_member"] += 1
                    continue
                ext = ext.lower()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current, members = {"__key__": key, "__url__": url}, 0
                members += 1
                if "__skip__" in current:
                    continue
                if members > limits.max_members_per_sample:
                    current = {"__key__": key, "__url__": url, "__skip__": "too_many_members"}
                elif ext in current:
                    counter["duplicate_member"] += 1
                elif info.size > limits.max_member_bytes:
                    current = {"__key__": key, "__url__": url, "__skip__": "member_too_large"}
                else:
                    current[ext] = tf.extractfile(info).read()
        except ShardTooLarge:
            counter["shard_too_large"] += 1
            log.warning(f"shard {url}: expands to more than data.max_shard_bytes={limits.max_shard_bytes}; "
                        "the rest of it is skipped")
            current = _truncated(current)
        except Exception as e:  # tarfile, gzip, bz2, lzma and zlib raise many types on damaged bytes
            counter["bad_shard"] += 1
            if not isinstance(e, (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)):
                log.warning(f"shard {url}: unreadable past this point ({type(e).__name__}: {e})")
            current = _truncated(current)
    if current is not None:
        yield current


def _truncated(sample: dict | None) -> dict | None:
    if sample is not None:
        sample["__truncated__"] = True
    return sample
