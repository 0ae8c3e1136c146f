"""One raw tar sample -> one row (token ids, decoded images), or a SkipSample with its reason.

A row is (ids, [uint8 HxWx3 per image], interleaved, filler): `interleaved` marks documents
(their labels skip the text outside image chunks), `filler` the loader's padding rows.
Whatever one sample's bytes hold, `row` either returns a row or raises SkipSample: an error
no check below anticipates is counted as `bad_sample`, never raised.
"""
from __future__ import annotations

import json

import numpy as np

from furnace.data.images import IMAGE_EXTS, ImageTooLarge, decode_image, is_image_member
from furnace.data.text import SkipSample, TextEncoder


class SampleDecoder:
    def __init__(self, encoder: TextEncoder, image_size: int, max_image_pixels: int = 40_000_000):
        self.encoder, self.image_size, self.max_image_pixels = encoder, image_size, max_image_pixels

    def row(self, raw: dict) -> tuple:
        """raw tar sample -> (ids, images, interleaved, filler=False); raises SkipSample."""
        if "__skip__" in raw:  # past a read bound (furnace/data/tar.py)
            raise SkipSample(raw["__skip__"])
        try:
            return self._row(raw)
        except SkipSample:
            raise
        except RecursionError:  # JSON nested deeper than the parser goes
            raise SkipSample("bad_json") from None
        except Exception:
            raise SkipSample("bad_sample") from None

    def _row(self, raw: dict) -> tuple:
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
            arrays = []
            for m in members:
                data = raw.get(m.lower())
                if data is None:
                    raise SkipSample("missing_image")
                arrays.append(self.image(data))
            return ids, arrays, True, False
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
        img = next((raw[k] for k in IMAGE_EXTS if k in raw), None)
        if img is None:
            raise SkipSample("missing_image")
        ids = self.encoder.caption(text.strip())
        return ids, [self.image(img)], False, False

    def filler(self) -> tuple:
        """A row with no image and no labelled token: what a batch holds when all its samples were skipped."""
        return self.encoder.filler(), [], False, True

    def image(self, data: bytes) -> np.ndarray:
        try:
            return decode_image(data, self.image_size, self.max_image_pixels)
        except ImageTooLarge:
            raise SkipSample("image_too_large") from None
        except Exception:  # any PIL failure on bad bytes
            raise SkipSample("bad_image") from None


def _valid_segment(seg) -> bool:
    """{"text": str} or {"image": member name of an image, e.g. "0.jpg"}."""
    if not isinstance(seg, dict):
        return False
    if "image" in seg:
        return isinstance(seg["image"], str) and is_image_member(seg["image"])
    return True
