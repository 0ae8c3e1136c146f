"""Reading one webdataset tar shard into raw samples, never raising on bad data.

Only whitelisted members are read (text: .txt/.json; images: `IMAGE_EXTS`, also indexed as in
`0.jpg` for interleaved documents); any other member (.pyd, .pickle, .pth, ...) is never
decoded and is counted as `ignored_member`.
"""
from __future__ import annotations

import tarfile
from collections import Counter
from typing import Iterator

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from furnace.data.images import is_image_member

TEXT_EXTS = ("txt", "json")


def member_allowed(ext: str) -> bool:
    ext = ext.lower()
    return ext in TEXT_EXTS or is_image_member(ext)


def iter_shard_samples(url: str, counter: Counter) -> Iterator[dict]:
    """Raw samples {"__key__", "__url__", ext: bytes} of one tar, grouped by key. Problems are
    counted in `counter` (unreadable_shard, bad_shard, ignored_member, duplicate_member); a
    sample cut short by a damaged tar is marked `__truncated__`."""
    try:
        f = open(url, "rb")
    except OSError:
        counter["unreadable_shard"] += 1
        return
    errors: list[Exception] = []

    def handler(exn):
        errors.append(exn)
        return False

    def select(fname):
        _, ext = base_plus_ext(fname)
        if ext is None or not member_allowed(ext):
            counter["ignored_member"] += 1
            return False
        return True

    current: dict | None = None
    with f:
        try:
            for member in tar_file_iterator(f, handler=handler, select_files=select):
                key, ext = base_plus_ext(member["fname"])
                ext = ext.lower()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if ext in current:
                    counter["duplicate_member"] += 1
                    continue
                current[ext] = member["data"]
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            errors.append(e)
        if errors:
            counter["bad_shard"] += 1
            if current is not None:
                current["__truncated__"] = True
    if current is not None:
        yield current
