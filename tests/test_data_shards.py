"""Shard writer: inputs (jsonl / COCO / interleaved), rotation, resize, stats, CLI errors."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from furnace.data.shards import main, read_stats
from furnace.data.testing import tar_keys


def _img(path, size=(40, 30), colour=(200, 10, 10), fmt=None):
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _members(tar):
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
        assert not any(m.pax_headers for m in members)  # plain ustar headers: one block per member
        return {m.name: tf.extractfile(m).read() for m in members}


@pytest.fixture
def pairs(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    lines = []
    for i in range(7):
        _img(imgs / f"{i}.{'jpg' if i % 2 else 'png'}")
        lines.append(json.dumps({"image": f"imgs/{i}.{'jpg' if i % 2 else 'png'}", "caption": f"a red square {i}"}))
    (imgs / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    lines.insert(2, json.dumps({"image": "imgs/bad.jpg", "caption": "x"}))
    lines.insert(4, json.dumps({"image": "imgs/nope.jpg", "caption": "x"}))
    lines.insert(5, json.dumps({"image": "imgs/0.png", "caption": "  "}))
    lines.insert(6, "{this is not json")
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_writer_stats_match_shards(pairs, tmp_path):
    out = tmp_path / "out"
    assert main(["jsonl", "--input", str(pairs), "--out", str(out), "--maxcount", "3", "--no-progress"]) == 0
    st = read_stats(str(out), "train")
    assert st["samples"] == 7 and st["inputs"] == 11
    assert st["skipped"] == {"bad_json_line": 1, "corrupt_image": 1, "missing_caption": 1, "missing_image": 1}
    assert [s["samples"] for s in st["shards"]] == [3, 3, 1]
    caps = []
    for s in st["shards"]:
        path = out / s["name"]
        assert len(tar_keys(str(path))) == s["samples"] and os.path.getsize(path) == s["bytes"]
        for name, data in _members(str(path)).items():
            if name.endswith(".txt"):
                caps.append(data.decode())
            else:
                Image.open(io.BytesIO(data)).load()
    assert sorted(caps) == sorted(f"a red square {i}" for i in range(7))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_maxsize_rotation_and_resize(pairs, tmp_path):
    out = tmp_path / "out"
    assert main(["jsonl", "-i", str(pairs), "-o", str(out), "--maxsize", "1", "--resize", "20",
                 "--format", "jpg", "--prefix", "small", "--no-progress"]) == 0
    st = read_stats(str(out), "small")
    assert len(st["shards"]) == 7 and all(s["samples"] == 1 for s in st["shards"])
    m = _members(str(out / "small-000000.tar"))
    (img,) = [v for k, v in m.items() if k.endswith(".jpg")]
    assert Image.open(io.BytesIO(img)).size == (20, 15)


def test_coco_input(tmp_path):
    (tmp_path / "im").mkdir()
    _img(tmp_path / "im" / "a.jpg")
    _img(tmp_path / "im" / "b.jpg", colour=(0, 0, 255))
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"},
                       {"id": 3, "file_name": "missing.jpg"}, {"id": 4, "file_name": "a.jpg"}],
            "annotations": [{"image_id": 1, "caption": "red one"}, {"image_id": 1, "caption": "red two"},
                            {"image_id": 2, "caption": "blue"}, {"image_id": 3, "caption": "gone"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    out = tmp_path / "o"
    assert main(["coco", "-i", str(tmp_path / "c.json"), "--images", str(tmp_path / "im"), "-o", str(out),
                 "--no-progress"]) == 0
    st = read_stats(str(out), "train")
    assert st["samples"] == 2 and st["skipped"] == {"missing_caption": 1, "missing_image": 1}
    m = _members(str(out / "train-000000.tar"))
    assert json.loads(m["000000000.json"]) == {"captions": ["red one", "red two"]}
    out2 = tmp_path / "o2"
    assert main(["coco", "-i", str(tmp_path / "c.json"), "--images", str(tmp_path / "im"), "-o", str(out2),
                 "--all-captions", "--no-progress"]) == 0
    assert read_stats(str(out2), "train")["samples"] == 3


def test_interleaved_input_both_formats(tmp_path):
    for i in range(3):
        _img(tmp_path / f"{i}.png", fmt="PNG")
    docs = [
        {"segments": [{"text": "intro"}, {"image": "0.png"}, {"text": "a red square"}, {"image": "1.png"},
                      {"text": "another"}]},
        {"text_list": ["first", "second"], "image_info": [{"image_name": "2.png", "matched_text_index": 1}]},
        {"segments": [{"text": "t"}, {"image": "missing.png"}]},
        {"segments": [{"text": "only text"}]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    out = tmp_path / "o"
    assert main(["interleaved", "-i", str(tmp_path / "d.jsonl"), "-o", str(out), "--prefix", "docs",
                 "--no-progress"]) == 0
    st = read_stats(str(out), "docs")
    assert st["samples"] == 2 and st["skipped"] == {"missing_image": 1, "no_images": 1}
    m = _members(str(out / "docs-000000.tar"))
    assert json.loads(m["000000000.json"])["segments"] == [
        {"text": "intro"}, {"image": "0.png"}, {"text": "a red square"}, {"image": "1.png"}, {"text": "another"}]
    assert json.loads(m["000000001.json"])["segments"] == [{"text": "first"}, {"image": "0.png"}, {"text": "second"}]
    assert {"000000000.0.png", "000000000.1.png", "000000001.0.png"} <= set(m)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["jsonl", "-i", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    (tmp_path / "bad.json").write_text("{oops")
    assert main(["coco", "-i", str(tmp_path / "bad.json"), "-o", str(tmp_path / "o")]) == 2
    assert "cannot read COCO" in capsys.readouterr().err


def test_module_entry_point(pairs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "furnace.data.shards", "jsonl", "-i", str(pairs), "-o",
                        str(tmp_path / "m")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["samples"] == 7
