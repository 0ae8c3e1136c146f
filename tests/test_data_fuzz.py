"""Fuzzed shards: hundreds of malformed samples from a seeded generator, mixed with good ones.
Whatever a shard holds, the loader never raises; in eval mode every good sample is yielded
exactly once and every bad one is counted under a reason."""
import bz2
import gzip
import io
import json
import random
import struct
import tarfile
import zlib
from collections import Counter

import pytest

from furnace.data.loader import ShardLoader
from furnace.data.synthetic import demo_tokenizer, draw_sample, sample_rng
from furnace.data.tar import ReadLimits

SAMPLE_REASONS = {"bad_json", "bad_sample", "bad_image", "image_too_large", "missing_image", "missing_caption",
                  "too_long", "no_images", "member_too_large", "too_many_members"}
LIMITS = ReadLimits(max_member_bytes=256 * 1024, max_members_per_sample=16, max_shard_bytes=8 * 2**20)


def png(rng, size=32) -> bytes:
    img, _ = draw_sample(sample_rng(0, "fuzz", rng.randrange(10**6)), size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (the pixel data is a stub)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def good_caption(rng):
    return [("png", png(rng)), ("txt", rng.choice(["a red circle", "a blue square left of a green triangle"]).encode())]


def good_document(rng):
    segs = [{"text": "a"}, {"image": "0.png"}, {"text": "a red circle"}, {"image": "1.png"}, {"text": "a blue square"}]
    return [("json", json.dumps({"segments": segs}).encode()), ("0.png", png(rng)), ("1.png", png(rng))]


def bad_kinds(rng):
    """(reason family, members) of one malformed sample each; every one has an allowed member."""
    img = png(rng)
    deep = b"[" * 200_000 + b"]" * 200_000
    return [
        ("captions 5", [("png", img), ("json", b'{"captions": 5}')]),
        ("captions dict", [("png", img), ("json", b'{"captions": {"a": 1}}')]),
        ("caption int", [("png", img), ("json", b'{"caption": 5}')]),
        ("captions [null]", [("png", img), ("json", b'{"captions": [null]}')]),
        ("json list", [("png", img), ("json", b"[1, 2, 3]")]),
        ("json null", [("png", img), ("json", b"null")]),
        ("json number", [("png", img), ("json", b"12")]),
        ("json garbage", [("png", img), ("json", bytes(rng.randrange(256) for _ in range(64)))]),
        ("deep nesting", [("png", img), ("json", deep[: LIMITS.max_member_bytes - 1])]),
        ("segments 5", [("json", b'{"segments": 5}'), ("0.png", img)]),
        ("segments [5]", [("json", b'{"segments": [5, "x"]}'), ("0.png", img)]),
        ("segment image 5", [("json", b'{"segments": [{"image": 5}, {"text": "a"}]}'), ("0.png", img)]),
        ("segment image list", [("json", b'{"segments": [{"image": ["0.png"]}, {"text": "a"}]}'), ("0.png", img)]),
        ("segment image not an image", [("json", b'{"segments": [{"image": "0.txt"}, {"text": "a"}]}'),
                                        ("0.png", img)]),
        ("segment image __key__", [("json", b'{"segments": [{"image": "__key__"}, {"text": "a"}]}')]),
        ("segment text dict", [("json", b'{"segments": [{"text": {"a": 1}}, {"image": "0.png"}]}')]),
        ("no images", [("json", b'{"segments": [{"text": "a red circle"}]}')]),
        ("doc image missing", [("json", b'{"segments": [{"image": "3.png"}, {"text": "a"}]}'), ("0.png", img)]),
        ("invalid utf-8 txt", [("png", img), ("txt", b"\xff\xfe\xfa a red")]),
        ("invalid utf-8 json", [("png", img), ("json", b'{"caption": "\xff\xfe"}')]),
        ("empty caption", [("png", img), ("txt", b"   ")]),
        ("too long", [("png", img), ("txt", b"a " * 200)]),
        ("no image", [("txt", b"a red circle")]),
        ("random image bytes", [("png", bytes(rng.randrange(256) for _ in range(300))), ("txt", b"a red circle")]),
        ("truncated png", [("png", img[: len(img) // 2]), ("txt", b"a red circle")]),
        ("jpg holding a gif", [("jpg", b"GIF89a" + bytes(40)), ("txt", b"a red circle")]),
        ("huge declared image", [("png", png_declaring(100_000, 100_000)), ("txt", b"a red circle")]),
        ("large declared image", [("png", png_declaring(8_000, 8_000)), ("txt", b"a red circle")]),
        ("member too large", [("png", img), ("txt", b"a" * (LIMITS.max_member_bytes + 1))]),
        ("many images under one key", [(f"{i}.png", img) for i in range(LIMITS.max_members_per_sample + 5)]
         + [("txt", b"a red circle")]),
        ("traversal name", [("txt", b"a red circle")]),  # key ../../etc/passwd: a caption without image
    ]


def tar_bytes(samples, extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members:
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        for ti, data in extra:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def odd_members():
    """Members that form no sample: directories, links, names without an extension or with one
    that is never read (a pickle). Each counts as at most an ignored member."""
    out = []
    for name, kind in (("somedir", tarfile.DIRTYPE), ("link.txt", tarfile.SYMTYPE), ("noext", tarfile.REGTYPE),
                       ("evil.pyd", tarfile.REGTYPE), ("x.pickle", tarfile.REGTYPE), (".hidden", tarfile.REGTYPE)):
        ti = tarfile.TarInfo(name)
        ti.type = kind
        if kind == tarfile.SYMTYPE:
            ti.linkname = "/etc/passwd"
        data = b"\x80\x04K\x01." if kind == tarfile.REGTYPE else None
        ti.size = len(data) if data else 0
        out.append((ti, data))
    return out


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    rng = random.Random(1234)
    out = tmp_path_factory.mktemp("fuzz")
    good, bad, shards = [], [], []
    n = 0

    def key(prefix):
        nonlocal n
        n += 1
        return f"{prefix}{n:06d}"

    for s in range(6):
        samples = []
        for _ in range(60):
            if rng.random() < 0.4:
                k = key("good")
                samples.append((k, good_caption(rng) if rng.random() < 0.7 else good_document(rng)))
                good.append(k)
            else:
                family, members = rng.choice(bad_kinds(rng))
                k = key("bad") if family != "traversal name" else f"../../etc/passwd{key('')}"
                samples.append((k, members))
                bad.append(k)
        raw = tar_bytes(samples, odd_members())
        raw = {0: raw, 1: gzip.compress(raw), 2: bz2.compress(raw)}.get(s % 4, raw)  # a .tar that is compressed
        path = out / f"fuzz-{s:02d}.tar"
        path.write_bytes(raw)
        shards.append(str(path))
    # shard-level damage: a gzip bomb, a zstd-compressed shard, a shard cut inside a member
    bomb = tar_bytes([(key("bomb"), [("txt", b"\0" * (64 * 2**20))])])
    (out / "bomb.tar.gz").write_bytes(gzip.compress(bomb, compresslevel=9))
    (out / "zstd.tar").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(200))
    k = key("cut")
    cut = tar_bytes([(k, good_caption(rng))])
    (out / "cut.tar").write_bytes(cut[: 700])
    extra = {"bomb": str(out / "bomb.tar.gz"), "zstd": str(out / "zstd.tar"), "cut": str(out / "cut.tar")}
    return {"shards": shards, "good": good, "bad": bad, "extra": extra}


def loader(shards, training, **kw):
    return ShardLoader(shards, demo_tokenizer(), batch_size=8, image_size=32, max_length=24, max_images=2,
                       training=training, limits=LIMITS, **kw)


def test_eval_yields_every_good_sample_once_and_counts_every_bad_one(fuzzed):
    ld = loader(fuzzed["shards"], training=False)
    seen = Counter()
    for _ in ld:
        seen.update(k for k in ld.last_keys if k is not None)
    assert set(seen) == set(fuzzed["good"]) and max(seen.values()) == 1
    skipped = ld.skipped
    assert set(skipped) - {"ignored_member"} <= SAMPLE_REASONS, skipped
    assert sum(v for r, v in skipped.items() if r in SAMPLE_REASONS) == len(fuzzed["bad"])
    assert skipped["ignored_member"] >= 6 * 4  # the odd members that are files (dirs and links: not counted)
    assert skipped["image_too_large"] >= 1 and skipped["too_many_members"] >= 1 and skipped["member_too_large"] >= 1


def test_shard_level_damage_is_counted_per_shard(fuzzed):
    e = fuzzed["extra"]
    ld = loader([e["bomb"], e["zstd"], e["cut"], fuzzed["shards"][0]], training=False)
    list(ld)
    s = ld.skipped
    assert s["shard_too_large"] == 1 and s["unsupported_compression"] == 1 and s["bad_shard"] == 1, s


def test_training_mode_never_raises_on_fuzzed_shards(fuzzed):
    e = fuzzed["extra"]
    ld = loader([*fuzzed["shards"], e["bomb"], e["zstd"], e["cut"]], training=True, shuffle_buffer=16,
                canonical_streams=2)
    it = iter(ld)
    rows = 0
    for _ in range(60):  # > two epochs of the good samples
        batch = next(it)
        assert batch["input_ids"].shape[1] == 24
        rows += batch["input_ids"].shape[0]
    assert rows == 60 * 8
    assert sum(v for r, v in ld.skipped.items() if r in SAMPLE_REASONS) >= len(fuzzed["bad"])


def test_special_tokens_in_captions_are_text():
    from furnace.data.text import TextEncoder

    tok = demo_tokenizer()
    enc = TextEncoder(tok, 32, 1)
    ids = enc.caption("a red circle </s> <pad> <s> <unk>")
    body = ids[ids.index(enc.image_id) + 1: -2]  # between <image> and <|endofchunk|> eos
    assert not {tok.eos_token_id, tok.pad_token_id, tok.bos_token_id} & set(body)
    assert tok("a </s>", add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id  # the tokenizer itself is unchanged
