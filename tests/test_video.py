"""Video clips: PyAV decoding, uniform frame sampling, frame folders, bad clips skipped and counted,
`furnace-shards video`, clip batches [B, T, F, C, H, W], the synthetic moving-shapes set, and a
2-rank training smoke run of the demo-video preset."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from furnace.data.collate import collate
from furnace.data.images import CLIP_MEAN, CLIP_STD, decode_image
from furnace.data.loader import ShardLoader
from furnace.data.samples import SampleDecoder
from furnace.data.shard_writer import read_stats
from furnace.data.synthetic_video import DIRECTIONS, build, demo_tokenizer, draw_clip, sample_rng
from furnace.data.testing import write_raw_tar
from furnace.data.text import SkipSample, TextEncoder
from furnace.data.video import VideoError, decode_clip, encode_clip, probe_clip, uniform_indices

from train_utils import env, train_preset_briefly


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer()


def frames_of(n: int, size: int = 32) -> np.ndarray:
    """n frames each unlike the others: a grey level per frame and a red block moving right."""
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = 20 + (200 * i) // max(1, n - 1)
        x = (i * (size - 8)) // max(1, n - 1)
        out[i, 8:16, x:x + 8] = (220, 40, 40)
    return out


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- sampling and decoding

def test_uniform_indices_are_the_segment_centres():
    assert uniform_indices(16, 4) == [2, 6, 10, 14]
    assert uniform_indices(13, 4) == [1, 4, 8, 11]
    assert uniform_indices(4, 4) == [0, 1, 2, 3]
    assert uniform_indices(9, 1) == [4]
    for n in range(1, 40):
        for f in range(1, n + 1):
            idx = uniform_indices(n, f)
            assert len(idx) == f and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < n
            # frame k (the time [k, k + 1)) holds the centre of segment i, (i + 1/2) n / f
            assert all(2 * f * k <= (2 * i + 1) * n < 2 * f * (k + 1) for i, k in enumerate(idx))
    with pytest.raises(VideoError, match="too_few_frames"):
        uniform_indices(3, 4)


@pytest.mark.parametrize("fmt,bframes", [("mp4", True), ("mp4", False), ("webm", False)])
def test_a_written_clip_decodes_to_its_frames(fmt, bframes):
    """H.264 with B-frames (decode order != presentation order) and VP8: every frame within codec
    tolerance, and the sampled frames are exactly those at uniform_indices (each decoded frame is
    nearest its own source frame)."""
    src = frames_of(13)
    data = encode_clip(src, fmt, bframes=bframes)
    info = probe_clip(data)
    assert (info["container"], info["frames"], info["width"], info["height"]) == (fmt, 13, 32, 32)
    everything = decode_clip(data, 13, None).astype(int)
    assert everything.shape == (13, 32, 32, 3)
    assert np.abs(everything - src).mean() < 4
    for f in (1, 4, 7):
        got = decode_clip(data, f, None).astype(int)
        nearest = [int(np.argmin([np.abs(g - s).mean() for s in src.astype(int)])) for g in got]
        assert nearest == uniform_indices(13, f)
        assert np.abs(got - src[uniform_indices(13, f)]).mean() < 4
    small = decode_clip(data, 4, 16)
    assert small.shape == (4, 16, 16, 3) and small.dtype == np.uint8


def test_a_clip_showing_fewer_frames_than_packets_is_sampled_over_the_frames_shown(monkeypatch):
    """Hidden frames (VP8 alt-ref) or damaged ones: the decoder shows fewer frames than the
    packets counted. When that leaves the last sampled index unreached, the F frames are sampled
    again, from the frames it shows."""
    from furnace.data import video

    src = frames_of(13)
    data = encode_clip(src, "mp4")
    frames = video._frames

    def hide_5_and_6(*a):
        return (f for k, f in enumerate(frames(*a)) if k not in (5, 6))

    monkeypatch.setattr(video, "_frames", hide_5_and_6)
    shown = np.delete(src, [5, 6], axis=0).astype(int)
    got = decode_clip(data, 4, None).astype(int)            # frame 11 of 13 is never shown
    nearest = [int(np.argmin([np.abs(g - s).mean() for s in shown])) for g in got]
    assert nearest == uniform_indices(11, 4)
    with pytest.raises(VideoError, match="too_few_frames"):
        decode_clip(data, 12, None)


def test_frame_folder_samples_are_sampled_in_number_order(tok):
    """key.0.png ... key.11.png: the F frames at uniform_indices, ordered by number (10 after 9),
    decoded exactly (PNG); fewer than F frames is a counted skip."""
    src = frames_of(12)
    raw = {"__key__": "k", "txt": b"a red square moves right"}
    raw |= {f"{i}.png": png(src[i]) for i in range(12)}
    dec = SampleDecoder(TextEncoder(tok, 16, 1), image_size=32, frames=4)
    ids, media, interleaved, filler = dec.row(raw)
    assert media[0].shape == (4, 32, 32, 3) and not interleaved and not filler
    assert np.array_equal(media[0], src[uniform_indices(12, 4)])
    short = {k: v for k, v in raw.items() if not k[0].isdigit() or int(k.split(".")[0]) < 3}
    with pytest.raises(SkipSample, match="too_few_frames"):
        dec.row(short)
    with pytest.raises(SkipSample, match="bad_video"):  # two members claim frame 1
        dec.row(raw | {"01.png": png(src[1])})


def test_stills_fill_every_frame_of_a_clip_batch(tok):
    """A clip row and a still-image row in one batch: images [B, T, F, C, H, W]; the still repeated."""
    enc = TextEncoder(tok, 16, 2)
    clip = decode_clip(encode_clip(frames_of(8), "mp4"), 4, 32)
    still = decode_image(png(frames_of(1)[0]), 32)
    rows = [(enc.caption("a red square moves right"), [clip], False, False),
            (enc.caption("a red square"), [still], False, False)]
    b = collate(rows, enc, max_length=16, max_images=2, image_size=32, mean=CLIP_MEAN, std=CLIP_STD,
                pad_to_max=True, frames=4)
    assert b["images"].shape == (2, 2, 4, 3, 32, 32)
    assert b["media_valid"].tolist() == [[True, False], [True, False]]
    assert all(torch.equal(b["images"][1, 0, 0], b["images"][1, 0, k]) for k in range(4))
    assert not torch.equal(b["images"][0, 0, 0], b["images"][0, 0, 3])
    assert torch.count_nonzero(b["images"][:, 1]) == 0


# ---------------------------------------------------------------------------- bad clips

def test_bad_clips_are_skipped_and_counted(tmp_path, tok):
    good = encode_clip(frames_of(8), "mp4")
    big = encode_clip(np.zeros((6, 64, 64, 3), np.uint8), "mp4")
    cap = b"a red square moves right"
    members = [
        ("good0.mp4", good), ("good0.txt", cap),
        ("cut.mp4", good[: len(good) // 2]), ("cut.txt", cap),              # truncated
        ("junk.mp4", b"\x00\x00\x00\x18ftypisom" + b"\x07" * 300), ("junk.txt", cap),  # undecodable
        ("avi.mp4", b"RIFF\x00\x10\x00\x00AVI LIST" + b"\x00" * 64), ("avi.txt", cap),  # not MP4/WebM
        ("short.mp4", encode_clip(frames_of(3), "mp4")), ("short.txt", cap),  # 3 frames < F
        ("long.webm", encode_clip(frames_of(40), "webm")), ("long.txt", cap),  # > max_video_frames
        ("big.mp4", big), ("big.txt", cap),                                  # > max_image_pixels
        ("folder.0.png", png(frames_of(2)[0])), ("folder.1.png", png(frames_of(2)[1])), ("folder.txt", cap),
        ("badframe.0.png", b"\x89PNG\r\n\x1a\n broken"), ("badframe.1.png", png(frames_of(1)[0])),
        ("badframe.2.png", png(frames_of(1)[0])), ("badframe.3.png", png(frames_of(1)[0])), ("badframe.txt", cap),
        ("good1.webm", encode_clip(frames_of(5), "webm")), ("good1.txt", cap),
    ]
    write_raw_tar(str(tmp_path / "bad.tar"), members)
    ld = ShardLoader(str(tmp_path / "bad.tar"), tok, batch_size=4, image_size=32, max_length=16, training=False,
                     frames=4, max_video_frames=32, max_image_pixels=40 * 40)
    keys, shapes = [], set()
    for b in ld:
        keys += [k for k in ld.last_keys if k is not None]
        shapes.add(tuple(b["images"].shape[2:]))
    assert keys == ["good0", "good1"]
    assert shapes == {(4, 3, 32, 32)}
    assert ld.skipped == {"bad_video": 2, "unsupported_video": 1, "too_few_frames": 2, "video_too_long": 1,
                          "video_too_large": 1, "bad_image": 1}
    assert ld.skipped_samples == 8


# ---------------------------------------------------------------------------- furnace-shards video

def test_furnace_shards_video_round_trip(tmp_path, tok):
    """The README's command on an MP4, a WebM, a frame list, a frame folder and bad inputs; the
    loader reads the clips back at F = 4 as they were written."""
    clips = tmp_path / "clips"
    (clips / "folder").mkdir(parents=True)
    src = {name: frames_of(n) for name, n in (("a", 9), ("b", 6), ("c", 5), ("d", 11), ("short", 3))}
    (clips / "a.mp4").write_bytes(encode_clip(src["a"], "mp4"))
    (clips / "b.webm").write_bytes(encode_clip(src["b"], "webm"))
    (clips / "short.mp4").write_bytes(encode_clip(src["short"], "mp4"))
    (clips / "broken.mp4").write_bytes(encode_clip(src["a"], "mp4")[:300])
    for i, arr in enumerate(src["c"]):
        (clips / f"c{i}.png").write_bytes(png(arr))
    for i, arr in enumerate(src["d"]):  # frame9.png, frame10.png: natural order
        (clips / "folder" / f"frame{i}.png").write_bytes(png(arr))
    lines = [{"video": "clips/a.mp4", "caption": "clip a"}, {"video": "clips/b.webm", "caption": "clip b"},
             {"frames": [f"clips/c{i}.png" for i in range(5)], "caption": "clip c"},
             {"frames": "clips/folder", "caption": "clip d"},
             {"video": "clips/short.mp4", "caption": "too short"}, {"video": "clips/broken.mp4", "caption": "x"},
             {"video": "clips/missing.mp4", "caption": "x"}, {"video": "clips/a.mp4"}, {"caption": "no clip"}]
    (tmp_path / "clips.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    command = "furnace-shards video --input clips.jsonl --out data/clips --min-frames 4"
    argv = [str(Path(sys.executable).parent / "furnace-shards"), *command.split()[1:], "--no-progress"]
    res = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env())
    assert res.returncode == 0, res.stderr
    stats = read_stats(str(tmp_path / "data" / "clips"), "train")
    assert stats["samples"] == 4 and stats["inputs"] == 9
    assert stats["skipped"] == {"too_few_frames": 1, "bad_video": 1, "missing_video": 2, "missing_caption": 1}
    shard = tmp_path / "data" / "clips" / "train-000000.tar"
    with tarfile.open(shard) as tf:
        names = tf.getnames()
    assert {"000000000.mp4", "000000001.webm", "000000002.4.png", "000000003.10.png"} <= set(names)
    assert not any(n.endswith(".json") for n in names)
    ld = ShardLoader(str(shard), tok, batch_size=4, image_size=32, max_length=16, training=False, frames=4)
    batch = next(iter(ld))
    assert ld.last_keys == ["000000000", "000000001", "000000002", "000000003"]
    assert batch["images"].shape == (4, 1, 4, 3, 32, 32)
    for row, name in enumerate("abcd"):
        want = torch.from_numpy(src[name][uniform_indices(len(src[name]), 4)]).permute(0, 3, 1, 2).float()
        got = batch["images"][row, 0] * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
        assert (got * 255 - want).abs().mean() < 5, name


# ---------------------------------------------------------------------------- the synthetic set

def test_synthetic_clips_move_as_their_captions_say():
    """The shape's centre moves along the caption's direction from frame to frame; the positions a
    clip visits, as a set, do not reveal the direction (start and end drawn symmetrically)."""
    for i in range(24):
        frames, caption = draw_clip(sample_rng(0, "train", i), 32)
        words = caption.split()
        assert len(words) == 5 and words[3] == "moves" and words[4] in DIRECTIONS
        assert 8 <= len(frames) <= 16
        diff = np.abs(frames.astype(int) - frames[:, :1, :1].astype(int)).sum(-1) > 60
        ys, xs = np.nonzero(diff[0])[0].mean(), np.nonzero(diff[0])[1].mean()
        ye, xe = np.nonzero(diff[-1])[0].mean(), np.nonzero(diff[-1])[1].mean()
        dx, dy = xe - xs, ye - ys
        want = {"left": (dx < -8 and abs(dy) < 1), "right": (dx > 8 and abs(dy) < 1),
                "up": (dy < -8 and abs(dx) < 1), "down": (dy > 8 and abs(dx) < 1)}
        assert want[words[4]], (caption, dx, dy)
    again, _ = draw_clip(sample_rng(0, "train", 3), 32)
    assert np.array_equal(again, draw_clip(sample_rng(0, "train", 3), 32)[0])


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("video") / "set"
    meta = build(str(out), n=96, seed=0, image_size=32, shards=2, n_val=16)
    return {"dir": str(out), "train": meta["train_pattern"], "val": meta["val_pattern"]}


def test_the_loader_yields_clip_batches(video_set):
    """Training batches of the synthetic set: images [B, 1, F, 3, S, S] with the frames in clip order."""
    from furnace.data.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(video_set["dir"]) / "tokenizer")
    ld = ShardLoader(video_set["train"], tok, batch_size=8, image_size=32, max_length=10, frames=4,
                     canonical_streams=2, seed=1)
    it = iter(ld)
    seen = Counter()
    for _ in range(3):
        b = next(it)
        assert b["images"].shape == (8, 1, 4, 3, 32, 32) and b["media_valid"].all()
        for row in range(8):
            direction = tok.decode(b["input_ids"][row], skip_special_tokens=True).split()[-1]
            img = b["images"][row, 0]
            mask = (img - img[:, :, :1, :1]).abs().sum(1) > 0.5       # [F, H, W]: the shape
            ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
            cx = (mask * xs).sum((1, 2)) / mask.sum((1, 2))
            cy = (mask * ys).sum((1, 2)) / mask.sum((1, 2))
            step = {"left": -cx, "right": cx, "up": -cy, "down": cy}[direction]
            assert bool((step[1:] > step[:-1]).all()), (direction, cx, cy)
            seen[direction] += 1
    assert ld.skipped == {} and len(seen) == 4


# ---------------------------------------------------------------------------- training

@pytest.mark.multirank
def test_demo_video_trains_on_two_ranks(video_set, tmp_path):
    """The demo-video preset on 2 gloo ranks, on a tiny set, a few steps: the loss falls; the
    held-out evaluation runs on clips."""
    run_dir = tmp_path / "run"
    report = train_preset_briefly("demo-video", video_set, run_dir)
    # the held-out evaluation captioned clips of the moving-shapes set
    assert report["samples"] and all(s["reference"].split()[-2] == "moves" for s in report["samples"])
