"""Synthetic set, demo data bootstrap, demo tokenizer, caption accuracy."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import tarfile

import numpy as np
import pytest

from furnace.data import synthetic
from furnace.data.demo import ensure_demo_data
from furnace.data.synthetic import demo_tokenizer, draw_sample, generate, sample_rng
from furnace.data.text import TextEncoder
from furnace.data.tokenizer import build_word_tokenizer, load_tokenizer
from furnace.training.evaluate import caption_accuracy

OBJ = r"(red|green|blue|yellow) (circle|square|triangle)"
ONE = re.compile(rf"^a (small|large) {OBJ}$")
TWO = re.compile(rf"^a {OBJ} (left of|right of|above|below) a {OBJ}$")


def test_deterministic_and_disjoint_streams():
    a = [(np.asarray(i), c) for i, c in generate(20, seed=1)]
    b = [(np.asarray(i), c) for i, c in generate(20, seed=1)]
    assert all((x[0] == y[0]).all() and x[1] == y[1] for x, y in zip(a, b))
    c = [np.asarray(i) for i, _ in generate(20, seed=2)]
    v = [np.asarray(i) for i, _ in generate(20, seed=1, split="val")]
    assert not any((x[0] == y).all() for x, y in zip(a, c))
    assert not any((x[0] == y).all() for x, y in zip(a, v))
    pooled = [(np.asarray(i), c) for i, c in generate(1200, seed=1, workers=2)][:20]
    assert all((x[0] == y[0]).all() and x[1] == y[1] for x, y in zip(a, pooled))
    assert a[0][0].shape == (32, 32, 3) and np.asarray(draw_sample(sample_rng(0, "x", 0), 48)[0]).shape == (48, 48, 3)


def test_caption_grammar_and_coverage():
    caps = [c for _, c in generate(400, seed=0)]
    assert all(ONE.match(c) or TWO.match(c) for c in caps)
    n_one = sum(bool(ONE.match(c)) for c in caps)
    assert 0.2 < n_one / len(caps) < 0.45
    for word in ("left of", "right of", "above", "below", "small", "large", "circle", "square", "triangle",
                 "red", "green", "blue", "yellow"):
        assert any(word in c for c in caps), word
    assert max(len(c.split()) for c in caps) <= 10


def two_object_masks(n: int, seed: int):
    """(caption match, pixel mask of the first-named object, of the second) for the two-object
    images of distinct colours among the first n, drawn at 64 px."""
    from furnace.data.synthetic import COLOURS

    for img, cap in generate(n, seed=seed, image_size=64):
        m = TWO.match(cap)
        if m and m.group(1) != m.group(4):
            px = np.asarray(img).astype(int)
            yield m, *[np.abs(px - np.array(COLOURS[c])).sum(-1) < 60 for c in (m.group(1), m.group(4))]


def test_larger_object_is_named_first():
    """Two-object images: the named-first colour covers more pixels than the second."""
    checked = 0
    for m, first, second in two_object_masks(150, seed=5):
        assert first.sum() > second.sum(), m.group(0)
        checked += 1
    assert checked > 40


def test_relation_is_unambiguous():
    """The centroid offset along the named axis has the named sign and dominates the offset
    across it (no "left of" that could be "below")."""
    checked = 0
    for m, first, second in two_object_masks(200, seed=7):
        (y1, x1), (y2, x2) = np.argwhere(first).mean(0), np.argwhere(second).mean(0)
        along, across = {"left of": (x2 - x1, y2 - y1), "right of": (x1 - x2, y2 - y1),
                         "above": (y2 - y1, x2 - x1), "below": (y1 - y2, x2 - x1)}[m.group(3)]
        # centres: 0.44-0.56 of the side apart along, <= 0.12 across; a triangle's centroid sits
        # 1/6 of its height below its box centre
        assert along > 0.35 * 64 and abs(across) < 0.22 * 64 and along > 1.5 * abs(across), (m.group(0), along, across)
        checked += 1
    assert checked > 60


def test_cli_writes_layout_and_tokenizer(tmp_path):
    out = tmp_path / "syn"
    assert synthetic.main(["--out", str(out), "--n", "40", "--seed", "3", "--shards", "4", "--no-progress"]) == 0
    names = sorted(os.listdir(out))
    assert names == [".complete", "stats.json", "tokenizer", "train-000000.tar", "train-000001.tar",
                     "train-000002.tar", "train-000003.tar", "val-000000.tar"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"]["samples"] == 40 and [s["samples"] for s in stats["train"]["shards"]] == [10] * 4
    assert stats["val"]["samples"] == 200 and stats["train"]["skipped"] == {}
    tok = load_tokenizer(str(out / "tokenizer"))
    assert tok.get_vocab() == demo_tokenizer().get_vocab()
    with tarfile.open(out / "train-000000.tar") as tf:
        txt = [tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")]
    assert txt[0] == next(generate(1, seed=3))[1]
    assert all(tok.unk_token_id not in tok(t, add_special_tokens=False)["input_ids"] for t in txt)


def _ensure(cfg, q):
    try:
        ensure_demo_data(cfg)
        q.put("ok")
    except Exception as e:  # pragma: no cover - reported through the queue
        q.put(repr(e))


def test_ensure_demo_data_concurrent_ranks(tmp_path):
    from furnace.config import DataConfig

    d = str(tmp_path / "demo")
    cfg = DataConfig(train_shards=f"{d}/train-{{000000..000015}}.tar", val_shards=f"{d}/val-000000.tar",
                     synthetic_dir=d, synthetic_n=32)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_ensure, args=(cfg, q)) for _ in range(2)]
    for p in ps:
        p.start()
    res = [q.get(timeout=60) for _ in ps]
    for p in ps:
        p.join(timeout=60)
    assert res == ["ok", "ok"], res
    assert os.path.isfile(os.path.join(d, "tokenizer", "tokenizer.json"))
    assert len([f for f in os.listdir(d) if f.startswith("train-")]) == 16
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    meta = json.loads(open(os.path.join(d, synthetic.COMPLETE_MARKER)).read())
    assert meta["train_pattern"] == cfg.train_shards and meta["val_pattern"] == cfg.val_shards
    before = os.path.getmtime(os.path.join(d, synthetic.COMPLETE_MARKER))
    ensure_demo_data(cfg)   # present: no rebuild
    assert os.path.getmtime(os.path.join(d, synthetic.COMPLETE_MARKER)) == before
    bad = DataConfig(train_shards=f"{d}/train-{{000000..000031}}.tar", val_shards=cfg.val_shards,
                     synthetic_dir=d, synthetic_n=32)
    with pytest.raises(FileNotFoundError, match="does not hold"):
        ensure_demo_data(bad)


def test_ensure_demo_data_rebuilds_a_set_from_another_generator_version(tmp_path):
    from furnace.config import DataConfig

    d = str(tmp_path / "demo")
    cfg = DataConfig(train_shards=f"{d}/train-{{000000..000015}}.tar", val_shards=f"{d}/val-000000.tar",
                     synthetic_dir=d, synthetic_n=16)
    ensure_demo_data(cfg)
    marker = os.path.join(d, synthetic.COMPLETE_MARKER)
    meta = json.loads(open(marker).read())
    assert meta["version"] == synthetic.GENERATOR_VERSION
    del meta["version"]  # what a version-1 set wrote
    open(marker, "w").write(json.dumps(meta))
    shard = os.path.join(d, "train-000000.tar")
    open(shard, "wb").write(b"old drawing")
    ensure_demo_data(cfg)
    assert json.loads(open(marker).read())["version"] == synthetic.GENERATOR_VERSION
    assert tarfile.is_tarfile(shard)


def test_caption_accuracy():
    assert caption_accuracy(["A red  circle ", "a blue square."], ["a red circle", "a blue square"]) == 1.0
    assert caption_accuracy(["a red circle", "a red square"], ["a red circle", "a blue square"]) == 0.5
    with pytest.raises(ValueError):
        caption_accuracy(["x"], [])


def test_tokenizer_specials_and_generation_helpers(tmp_path):
    tok = demo_tokenizer()
    enc = TextEncoder(tok, 32, 1)
    ids = enc.caption("a red circle left of a blue square")
    assert tok.decode(ids[2:-2]) == "a red circle left of a blue square"
    assert enc.reference_caption(ids) == "a red circle left of a blue square"
    assert enc.decode([*ids[2:5], enc.eoc_id, *ids[5:]]) == "a red circle"
    assert enc.caption_prompt() == ids[:2]
    # a few-shot prompt written as text gets the control tokens a training row has
    shot = enc.prompt("<image>a red circle left of a blue square<|endofchunk|><image>")
    assert shot == ids[:-1] + [enc.image_id]
    # a local tokenizer without Flamingo tokens or pad gets them added
    plain = build_word_tokenizer(["hello", "world"])
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "hello": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>").save_pretrained(tmp_path / "t")
    t = load_tokenizer(str(tmp_path / "t"))
    for s in ("<image>", "<|endofchunk|>"):
        assert t.convert_tokens_to_ids(s) not in (None, t.unk_token_id)
    assert t.pad_token is not None and t.eos_token == "</s>" and t.bos_token is None
    e2 = TextEncoder(t, 16, 1)
    assert e2.caption("hello")[0] == e2.image_id          # no bos
    assert plain.convert_tokens_to_ids("hello") != plain.unk_token_id
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))
