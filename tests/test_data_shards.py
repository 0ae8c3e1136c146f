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

from furnace.data.shard_writer import read_stats
from furnace.data.shards import main
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


# ---------------------------------------------------------------------------- malformed inputs

def _png_header(w, h):
    """A PNG whose IHDR claims w x h pixels and that holds no pixel data (a cheap bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture
def zoo(tmp_path):
    """An image folder with one good image and one file of each kind the writer must refuse."""
    d = tmp_path / "zoo"
    d.mkdir()
    _img(d / "good.jpg")
    _img(d / "good.png", fmt="PNG")
    _img(d / "pic.gif", fmt="GIF")
    _img(d / "pic.bmp", fmt="BMP")
    _img(d / "pic.tif", fmt="TIFF")
    (d / "pic.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    (d / "notes.txt").write_text("not an image")
    (d / "empty.jpg").write_bytes(b"")
    (d / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    (d / "big.png").write_bytes(_png_header(8000, 8000))
    (d / "subdir").mkdir()
    os.symlink("/dev/zero", d / "zero.jpg")
    return d


def _run(argv, capsys):
    code = main(argv + ["--no-progress"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    return code, err


def _no_tmp(out):
    return not [f for f in os.listdir(out) if ".tmp" in f]


GOOD_PAIR = {"image": "zoo/good.jpg", "caption": "a red square"}
_PAIR_CASES = {
    "image_int": ({"image": 5, "caption": "x"}, "bad_image_path"),
    "image_list": ({"image": ["zoo/good.jpg"], "caption": "x"}, "bad_image_path"),
    "image_dict": ({"path": {"a": 1}, "caption": "x"}, "bad_image_path"),
    "image_nul": ({"image": "zoo/good.jpg\u0000x", "caption": "x"}, "bad_image_path"),
    "image_surrogate": ('{"image": "zoo/\\ud800.jpg", "caption": "x"}', "bad_image_path"),
    "no_image": ({"caption": "x"}, "missing_image"),
    "caption_list": ({"image": "zoo/good.jpg", "caption": ["x"]}, "bad_caption"),
    "caption_int": ({"image": "zoo/good.jpg", "caption": 5}, "bad_caption"),
    "caption_surrogate": ('{"image": "zoo/good.jpg", "caption": "\\udc80"}', "bad_caption"),
    "json_list": ([1, 2], "bad_json_line"),
    "json_string": ("abc", "bad_json_line"),
    "json_deep": ("[" * 100_000 + "]" * 100_000, "bad_json_line"),
    "not_utf8": (b'{"image": "zoo/good.jpg", "caption": "caf\xe9"}', "bad_utf8_line"),
    "directory": ({"image": "zoo/subdir", "caption": "x"}, "not_a_regular_file"),
    "dev_zero_symlink": ({"image": "zoo/zero.jpg", "caption": "x"}, "not_a_regular_file"),
    "dev_null": ({"image": "/dev/null", "caption": "x"}, "not_a_regular_file"),
    "missing_file": ({"image": "zoo/nope.jpg", "caption": "x"}, "missing_image"),
    "file_as_folder": ({"image": "zoo/good.jpg/x.jpg", "caption": "x"}, "unreadable_image"),
    "empty_file": ({"image": "zoo/empty.jpg", "caption": "x"}, "corrupt_image"),
    "gif": ({"image": "zoo/pic.gif", "caption": "x"}, "unsupported_image_format"),
    "bmp": ({"image": "zoo/pic.bmp", "caption": "x"}, "unsupported_image_format"),
    "tiff": ({"image": "zoo/pic.tif", "caption": "x"}, "unsupported_image_format"),
    "eps": ({"image": "zoo/pic.eps", "caption": "x"}, "unsupported_image_format"),
    "text_file": ({"image": "zoo/notes.txt", "caption": "x"}, "unsupported_image_format"),
    "pixel_bomb": ({"image": "zoo/bomb.png", "caption": "x"}, "image_too_large"),
    "too_many_pixels": ({"image": "zoo/big.png", "caption": "x"}, "image_too_large"),
}
_DOC_CASES = {
    "segments_string": ({"segments": "abc"}, "bad_document"),
    "segment_not_dict": ({"segments": ["abc", {"image": "zoo/good.png"}]}, "bad_document"),
    "segment_text_int": ({"segments": [{"text": 5}, {"image": "zoo/good.png"}]}, "bad_document"),
    "segment_image_int": ({"segments": [{"text": "t"}, {"image": 5}]}, "bad_image_path"),
    "segment_image_dir": ({"segments": [{"text": "t"}, {"image": "zoo/subdir"}]}, "not_a_regular_file"),
    "text_list_string": ({"text_list": "abc", "image_info": []}, "bad_document"),
    "text_list_int": ({"text_list": 5}, "bad_document"),
    "image_info_dict": ({"text_list": ["t"], "image_info": {"image_name": "zoo/good.png"}}, "bad_document"),
    "image_info_entry_str": ({"text_list": ["t"], "image_info": ["zoo/good.png"]}, "bad_document"),
    "index_str": ({"text_list": ["t"], "image_info": [{"image_name": "zoo/good.png", "matched_text_index": "0"}]},
                  "bad_document"),
    "index_float": ({"text_list": ["t"], "image_info": [{"image_name": "zoo/good.png", "matched_text_index": 0.5}]},
                    "bad_document"),
    "index_bool": ({"text_list": ["t"], "image_info": [{"image_name": "zoo/good.png", "matched_text_index": True}]},
                   "bad_document"),
    "index_negative": ({"text_list": ["t"], "image_info": [{"image_name": "zoo/good.png",
                                                            "matched_text_index": -1}]}, "bad_document"),
    "index_huge": ('{"text_list": ["t"], "image_info": [{"image_name": "zoo/good.png", '
                   '"matched_text_index": 1e400}]}', "bad_document"),
    "index_huge_int": ({"text_list": ["t"], "image_info": [{"image_name": "zoo/good.png",
                                                            "matched_text_index": 10 ** 30}]}, "bad_document"),
    "info_path_list": ({"text_list": ["t"], "image_info": [{"image_name": ["a"]}]}, "bad_image_path"),
    "neither": ({"text": "t"}, "bad_document"),
    "eps_image": ({"segments": [{"text": "t"}, {"image": "zoo/pic.eps"}]}, "unsupported_image_format"),
}
GOOD_DOC = {"text_list": ["intro", "after"], "image_info": [{"image_name": "zoo/good.png", "matched_text_index": 1},
                                                            {"image_name": "zoo/good.jpg", "matched_text_index": 2}]}


def _line(rec):
    if isinstance(rec, bytes):
        return rec
    return (rec if isinstance(rec, str) else json.dumps(rec)).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("kind,case", [("jsonl", c) for c in _PAIR_CASES] + [("interleaved", c) for c in _DOC_CASES])
def test_malformed_record_is_skipped_and_counted(kind, case, zoo, tmp_path, capsys):
    rec, reason = (_PAIR_CASES if kind == "jsonl" else _DOC_CASES)[case]
    good = GOOD_PAIR if kind == "jsonl" else GOOD_DOC
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join([_line(good), _line(rec), _line(good)]) + b"\n")
    out = tmp_path / "out"
    code, _ = _run([kind, "-i", str(inp), "-o", str(out), "--max-image-pixels", "1000000"], capsys)
    assert code == 0
    st = read_stats(str(out), "train")
    assert st["samples"] == 2 and st["skipped"] == {reason: 1} and st["inputs"] == 3 and st["complete"]
    assert _no_tmp(out)


def test_good_document_layout_and_index_at_end(zoo, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD_DOC) + "\n")
    assert main(["interleaved", "-i", str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "o"), "--no-progress"]) == 0
    m = _members(str(tmp_path / "o" / "train-000000.tar"))
    assert json.loads(m["000000000.json"])["segments"] == [
        {"text": "intro"}, {"image": "0.png"}, {"text": "after"}, {"image": "1.jpg"}]


_COCO_CASES = {
    "image_str": ({"images": ["good.jpg"]}, "bad_coco_image"),
    "image_int": ({"images": [5]}, "bad_coco_image"),
    "image_null": ({"images": [None]}, "bad_coco_image"),
    "image_id_list": ({"images": [{"id": [1], "file_name": "good.jpg"}]}, "bad_coco_image"),
    "image_no_id": ({"images": [{"file_name": "good.jpg"}]}, "bad_coco_image"),
    "file_name_int": ({"images": [{"id": 2, "file_name": 5}], "annotations": [{"image_id": 2, "caption": "c"}]},
                      "bad_image_path"),
    "file_name_nul": ({"images": [{"id": 2, "file_name": "good.jpg\u0000"}],
                       "annotations": [{"image_id": 2, "caption": "c"}]}, "bad_image_path"),
    "file_name_gif": ({"images": [{"id": 2, "file_name": "pic.gif"}], "annotations": [{"image_id": 2, "caption": "c"}]},
                      "unsupported_image_format"),
    "ann_str": ({"annotations": ["x"]}, "bad_coco_annotation"),
    "ann_null": ({"annotations": [None]}, "bad_coco_annotation"),
    "ann_image_id_list": ({"annotations": [{"image_id": [1], "caption": "x"}]}, "bad_coco_annotation"),
    "ann_image_id_dict": ({"annotations": [{"image_id": {"a": 1}, "caption": "x"}]}, "bad_coco_annotation"),
    "ann_caption_int": ({"annotations": [{"image_id": 1, "caption": 5}]}, "bad_coco_annotation"),
    "ann_caption_list": ({"annotations": [{"image_id": 1, "caption": ["x"]}]}, "bad_coco_annotation"),
}


@pytest.mark.parametrize("case", list(_COCO_CASES))
def test_malformed_coco_entry_is_skipped_and_counted(case, zoo, tmp_path, capsys):
    extra, reason = _COCO_CASES[case]
    coco = {"images": [{"id": 1, "file_name": "good.jpg"}] + extra.get("images", []),
            "annotations": [{"image_id": 1, "caption": "red"}] + extra.get("annotations", [])}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    out = tmp_path / "o"
    code, _ = _run(["coco", "-i", str(tmp_path / "c.json"), "--images", str(zoo), "-o", str(out)], capsys)
    assert code == 0
    st = read_stats(str(out), "train")
    assert st["samples"] == 1 and st["skipped"] == {reason: 1}
    assert _no_tmp(out)


@pytest.mark.parametrize("kind,content", [
    ("coco", b"[]"), ("coco", b'{"images": {}}'), ("coco", b'{"images": [], "annotations": 5}'),
    ("coco", b"[" * 100_000), ("coco", '{"images": []}'.encode("utf-16")), ("coco", b"\xff\xfe\x00garbage"),
    ("jsonl", json.dumps(GOOD_PAIR).encode("utf-16")), ("interleaved", b'{"segments": []}\n\x00\x00\x00'),
])
def test_whole_input_problems_exit_2_without_writing(kind, content, tmp_path, capsys):
    (tmp_path / "in").write_bytes(content)
    out = tmp_path / "o"
    code, err = _run([kind, "-i", str(tmp_path / "in"), "-o", str(out)], capsys)
    assert code == 2 and err.startswith("furnace-shards: error: cannot read")
    assert not out.exists()


def test_input_not_a_regular_file(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    for bad in (tmp_path, tmp_path / "fifo", "/dev/zero"):
        code, err = _run(["jsonl", "-i", str(bad), "-o", str(tmp_path / "o")], capsys)
        assert code == 2 and "not a regular file" in err


def test_bad_options_exit_2(pairs, tmp_path, capsys):
    for opt in (["--prefix", "../up"], ["--prefix", "a/b"], ["--max-image-bytes", "0"], ["--max-image-pixels", "-1"],
                ["--quality", "500"]):
        code, err = _run(["jsonl", "-i", str(pairs), "-o", str(tmp_path / "o")] + opt, capsys)
        assert code == 2 and err.startswith("furnace-shards: error:"), opt
    (tmp_path / "file").write_text("")
    code, err = _run(["jsonl", "-i", str(pairs), "-o", str(tmp_path / "file")], capsys)
    assert code == 2 and "cannot create output folder" in err


def test_nothing_written_exits_1(zoo, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in [{"image": "zoo/pic.gif", "caption": "x"}, {"caption": "x"}, 7]))
    out = tmp_path / "o"
    code, err = _run(["jsonl", "-i", str(inp), "-o", str(out)], capsys)
    assert code == 1 and "no samples written" in err and "unsupported_image_format=1" in err and "stats.json" in err
    st = read_stats(str(out), "train")
    assert st["samples"] == 0 and st["shards"] == [] and sum(st["skipped"].values()) == 3
    assert sorted(os.listdir(out)) == ["stats.json"]
    (tmp_path / "empty.jsonl").write_text("\n\n")
    code, err = _run(["jsonl", "-i", str(tmp_path / "empty.jsonl"), "-o", str(out)], capsys)
    assert code == 1 and "no records" in err


def test_size_limits(zoo, tmp_path, capsys):
    Image.effect_noise((64, 64), 100).save(zoo / "noise.png")
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps({"image": f"zoo/{n}", "caption": "x"})
                             for n in ("good.jpg", "noise.png", "bomb.png", "big.png")))
    out = tmp_path / "o"
    code, _ = _run(["jsonl", "-i", str(inp), "-o", str(out), "--max-image-bytes", "2000"], capsys)
    assert code == 0
    # noise.png is over 2000 bytes; bomb.png is refused by PIL's own check (DecompressionBombError);
    # big.png (64 Mpx) by the default --max-image-pixels
    assert read_stats(str(out), "train")["skipped"] == {"image_too_large": 3}


def test_pil_bomb_error_and_warning_never_escape(zoo, tmp_path, capsys):
    (zoo / "warn.png").write_bytes(_png_header(10_000, 10_000))  # 100 Mpx: PIL's bomb *warning* zone
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps({"image": f"zoo/{n}", "caption": "x"}) for n in ("good.jpg", "bomb.png",
                                                                                         "warn.png")))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under python -W error
        code, _ = _run(["jsonl", "-i", str(inp), "-o", str(tmp_path / "o"), "--max-image-pixels", str(10 ** 12)],
                       capsys)
    assert code == 0
    # with the cap raised, bomb.png still hits PIL's DecompressionBombError; warn.png decodes as truncated
    assert read_stats(str(tmp_path / "o"), "train")["skipped"] == {"corrupt_image": 1, "image_too_large": 1}


def test_fifo_and_dev_zero_refused_without_hanging(zoo, tmp_path):
    os.mkfifo(zoo / "fifo.jpg")
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps({"image": p, "caption": "x"})
                             for p in ("zoo/good.jpg", "zoo/fifo.jpg", "/dev/zero", "zoo/zero.jpg")))
    r = subprocess.run([sys.executable, "-m", "furnace.data.shards", "jsonl", "-i", str(inp), "-o",
                        str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    st = read_stats(str(tmp_path / "o"), "train")
    assert st["samples"] == 1 and st["skipped"] == {"not_a_regular_file": 3}


def test_confine(zoo, tmp_path, capsys):
    outside = _img(tmp_path / "outside.jpg")
    os.symlink(outside, zoo / "link.jpg")
    os.symlink(zoo / "good.jpg", zoo / "inner_link.jpg")
    recs = [{"image": p, "caption": "x"} for p in ("good.jpg", "inner_link.jpg", "link.jpg", "../outside.jpg",
                                                    str(outside), "subdir/../good.jpg")]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(map(json.dumps, recs)))
    base = ["jsonl", "-i", str(inp), "--images", str(zoo)]
    assert _run(base + ["-o", str(tmp_path / "free")], capsys)[0] == 0
    assert read_stats(str(tmp_path / "free"), "train")["samples"] == 6
    assert _run(base + ["-o", str(tmp_path / "conf"), "--confine"], capsys)[0] == 0
    st = read_stats(str(tmp_path / "conf"), "train")
    assert st["samples"] == 3 and st["skipped"] == {"outside_images_root": 3}
    # without --images the input's folder is the root: zoo/... is inside, the symlinks still point out
    (zoo / "in.jsonl").write_text("\n".join(map(json.dumps, recs)))
    assert _run(["jsonl", "-i", str(zoo / "in.jsonl"), "-o", str(tmp_path / "c2"), "--confine"], capsys)[0] == 0
    assert read_stats(str(tmp_path / "c2"), "train")["skipped"] == {"outside_images_root": 3}


def _crash_on_sample(monkeypatch, n, exc):
    """Make the writer fail right after writing sample `n` (mid-shard with --maxcount 2)."""
    from furnace.data.shard_writer import ShardWriter
    orig = ShardWriter.write_raw

    def write_raw(self, members):
        key = orig(self, members)
        if self._index == n:
            if exc == "sigterm":
                import signal
                os.kill(os.getpid(), signal.SIGTERM)
            raise exc
        return key
    monkeypatch.setattr(ShardWriter, "write_raw", write_raw)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), "sigterm"], ids=str)
def test_crash_mid_shard_leaves_no_tmp(exc, pairs, tmp_path, capsys, monkeypatch):
    import signal
    before = signal.getsignal(signal.SIGTERM)
    _crash_on_sample(monkeypatch, 3, exc)
    out = tmp_path / "o"
    argv = ["jsonl", "-i", str(pairs), "-o", str(out), "--maxcount", "2", "--no-progress"]
    if isinstance(exc, KeyboardInterrupt):
        assert main(argv) == 130
        err = capsys.readouterr().err
        assert "interrupted" in err and len(err.strip().splitlines()) == 1
    else:
        with pytest.raises(SystemExit if exc == "sigterm" else RuntimeError) as e:
            main(argv)
        if exc == "sigterm":
            assert e.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    assert sorted(os.listdir(out)) == ["stats.json", "train-000000.tar"]
    st = read_stats(str(out), "train")
    assert st["complete"] is False and [s["samples"] for s in st["shards"]] == [2]
    assert len(tar_keys(str(out / "train-000000.tar"))) == 2


def test_shard_writer_context_manager_cleans_up(tmp_path):
    from furnace.data.shard_writer import ShardWriter
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError):
        with ShardWriter(str(tmp_path), maxcount=2, image_format="png") as w:
            for i in range(3):
                assert w.add_caption(img, f"c{i}")
            assert os.path.exists(tmp_path / "train-000001.tar.tmp")
            raise ValueError("caller bug")
    assert sorted(os.listdir(tmp_path)) == ["stats.json", "train-000000.tar"]
    with ShardWriter(str(tmp_path), prefix="ok", maxcount=2, image_format="png") as w:
        w.add_caption(img, "c")
    assert read_stats(str(tmp_path), "ok")["complete"] is True and _no_tmp(tmp_path)


def test_api_refuses_non_path_images(tmp_path):
    """An int is not a file descriptor to read from, nor bytes of another format an image."""
    from furnace.data.shard_writer import ShardWriter
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    with ShardWriter(str(tmp_path)) as w:
        assert not w.add_caption(0, "x") and not w.add_caption(buf.getvalue(), "x")
    assert read_stats(str(tmp_path), "train")["skipped"] == {"bad_image_path": 1, "unsupported_image_format": 1}
