"""Loader: batch contract, coverage per epoch, lockstep, mixing, exact resume."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from furnace.data.images import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
from furnace.data.loader import ShardLoader
from furnace.data.sources import Source
from furnace.data.testing import tar_keys, write_caption_shards, write_doc_shards
from furnace.data.text import TextEncoder
from furnace.data.synthetic import demo_tokenizer
from furnace.tokens import IGNORE_INDEX, build_labels


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer()


@pytest.fixture(scope="module")
def caps(tmp_path_factory):
    d = tmp_path_factory.mktemp("caps")
    return write_caption_shards(str(d), 240, shards=6)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    return write_doc_shards(str(d), 40, shards=2, images_per_doc=3)


def _loader(src, tok, **kw):
    args = dict(batch_size=4, image_size=32, max_length=32, max_images=1, seed=7, shuffle_buffer=16,
                canonical_streams=8)
    args.update(kw)
    return ShardLoader(src, tok, **args)


def _check_invariants(batch, tok, T):
    enc = TextEncoder(tok, 32, T)
    ids, lab, att = batch["input_ids"], batch["labels"], batch["attention_mask"]
    B, L = ids.shape
    assert ids.dtype == lab.dtype == att.dtype == torch.long
    assert batch["images"].dtype == torch.float32 and batch["media_valid"].dtype == torch.bool
    assert batch["images"].shape[:3] == (B, T, 1) and batch["media_valid"].shape == (B, T)
    n_img = (ids == enc.image_id).sum(1)
    assert torch.equal(n_img, batch["media_valid"].sum(1))
    mv = batch["media_valid"].long()
    assert torch.equal(mv, torch.sort(mv, dim=1, descending=True).values)  # valid images first
    assert (batch["images"][~batch["media_valid"]] == 0).all()              # zeros for missing
    lengths = att.sum(1)
    assert torch.equal(att, (torch.arange(L)[None] < lengths[:, None]).long())  # right padding
    assert (ids[att == 0] == enc.pad_id).all()
    assert (lab[att == 0] == IGNORE_INDEX).all() and (lab[ids == enc.image_id] == IGNORE_INDEX).all()


def test_batch_contract_caption_layout(caps, tok):
    b = next(iter(_loader(caps, tok)))
    _check_invariants(b, tok, 1)
    enc = TextEncoder(tok, 32, 1)
    row = b["input_ids"][0][b["attention_mask"][0] == 1].tolist()
    # [bos] <image> caption <|endofchunk|> eos
    assert row[0] == enc.bos_id and row[1] == enc.image_id and row[-2:] == [enc.eoc_id, enc.eos_id]
    exp = build_labels(b["input_ids"], b["attention_mask"], image_token_id=enc.image_id,
                       eoc_token_id=enc.eoc_id, interleaved=False)
    assert torch.equal(b["labels"], exp)
    assert b["images"].shape == (4, 1, 1, 3, 32, 32)


def test_normalisation_matches_vision_tower(caps, tok):
    from PIL import Image
    import io
    import tarfile

    with tarfile.open(caps[0]) as tf:
        first = tf.getmembers()[0]
        img = Image.open(io.BytesIO(tf.extractfile(first).read())).convert("RGB").resize((48, 48), Image.BICUBIC)
    import numpy as np
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255
    for mean, std in ((CLIP_MEAN, CLIP_STD), (SIGLIP_MEAN, SIGLIP_STD)):
        ld = ShardLoader(caps[0], tok, batch_size=1, image_size=48, max_length=32, training=False,
                         mean=mean, std=std)
        b = next(iter(ld))
        exp = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        torch.testing.assert_close(b["images"][0, 0, 0], exp, atol=1e-5, rtol=0)


def _drain_keys(loader):
    keys = []
    for _ in loader:
        keys.extend(k for k in loader.last_keys if k is not None)
    return keys


@pytest.mark.parametrize("dp_size,workers,n_shards", [(2, 2, 6), (3, 1, 6), (2, 2, 3)])
def test_every_sample_once_per_epoch(caps, tok, tmp_path, dp_size, workers, n_shards):
    shards = caps if n_shards == 6 else write_caption_shards(str(tmp_path), 30, shards=n_shards)
    everything = sorted(k for s in shards for k in tar_keys(s))
    seen = []
    for r in range(dp_size):
        seen += _drain_keys(_loader(shards, tok, dp_rank=r, dp_size=dp_size, num_workers=workers, epochs=1,
                                    canonical_streams=6 if dp_size == 3 else 8))
    assert sorted(seen) == everything  # n_shards=3 < 8 streams: the per-sample split covers it too


def test_epoch_order_changes_with_epoch_and_seed(caps, tok):
    a = _drain_keys(_loader(caps, tok, epochs=2))
    one = _drain_keys(_loader(caps, tok, epochs=1))
    assert len(a) == 480 and set(Counter(a).values()) == {2} and a != one + one  # epoch 2 reshuffles
    b = _drain_keys(_loader(caps, tok, epochs=1, seed=8))
    assert sorted(b) == sorted(one) and b != one and _drain_keys(_loader(caps, tok, epochs=1)) == one


def test_dp_rank_not_global_rank_and_infinite_lockstep(caps, tok, tmp_path):
    # tp/pp peers pass the same dp_rank -> identical batches
    b1 = next(iter(_loader(caps, tok, dp_rank=1, dp_size=2)))
    b2 = next(iter(_loader(caps, tok, dp_rank=1, dp_size=2)))
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    # very uneven shards (1 and 9 samples in shards, 2 ranks): both ranks keep yielding
    uneven = write_caption_shards(str(tmp_path), 10, shards=2)
    from furnace.data.testing import write_raw_tar
    small = str(tmp_path / "small.tar")
    import tarfile
    with tarfile.open(uneven[0]) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()[:2]]
    write_raw_tar(small, members)
    for r in range(2):
        it = iter(_loader([small, uneven[1]], tok, dp_rank=r, dp_size=2, batch_size=2, canonical_streams=2))
        for _ in range(12):
            assert next(it)["input_ids"].shape == (2, 32)


def test_eval_mode_equal_batches_and_coverage(caps, tok):
    everything = sorted(k for s in caps for k in tar_keys(s))
    seen, counts = [], []
    for r in range(3):
        ld = _loader(caps, tok, dp_rank=r, dp_size=3, num_workers=2, batch_size=7, training=False)
        n = 0
        for b in ld:
            n += 1
            seen.extend(k for k in ld.last_keys if k is not None)
        counts.append(n)
    assert len(set(counts)) == 1 and counts[0] == -(-80 // 7)
    assert sorted(seen) == everything


def test_mixing_ratio(caps, docs, tok):
    ld = _loader([Source(caps, 0.75), Source(docs, 0.25)], tok, max_images=3, batch_size=20, max_length=64)
    c = Counter()
    it = iter(ld)
    for _ in range(40):
        b = next(it)
        _check_invariants(b, tok, 3)
        c.update(ld.last_sources)
    frac = c[1] / (c[0] + c[1])
    assert abs(frac - 0.25) < 0.04, frac  # 800 draws: 2.6 sigma


def test_interleaved_layout_and_truncation(docs, tok):
    enc = TextEncoder(tok, 24, 2)
    for max_len, T in ((64, 3), (64, 2), (16, 3)):
        ld = _loader(docs, tok, max_images=T, max_length=max_len, batch_size=8, training=False)
        b = next(iter(ld))
        _check_invariants(b, tok, T)
        row = b["input_ids"][0][b["attention_mask"][0] == 1].tolist()
        assert row[0] == enc.bos_id and enc.image_id in row
        nimg = row.count(enc.image_id)
        assert nimg <= T and row.count(enc.eoc_id) >= nimg - 1
        if max_len == 64 and T == 3:
            assert b["media_valid"].all()       # 3 images fit
            assert row[-1] == enc.eos_id and row[-2] == enc.eoc_id
        exp = build_labels(b["input_ids"], b["attention_mask"], image_token_id=enc.image_id,
                           eoc_token_id=enc.eoc_id, interleaved=True)
        assert torch.equal(b["labels"], exp)


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("dp_size,workers", [(2, 2), (1, 0)])
def test_exact_resume(caps, docs, tok, dp_size, workers):
    srcs = [Source(caps, 0.7), Source(docs, 0.3)]
    kw = dict(dp_size=dp_size, num_workers=workers, max_images=3, max_length=48, batch_size=5)
    for r in range(dp_size):
        full = _take(iter(_loader(srcs, tok, dp_rank=r, **kw)), 34)   # crosses epoch boundaries
        a = _loader(srcs, tok, dp_rank=r, **kw)
        part = _take(iter(a), 13)
        state = a.state_dict()
        b = _loader(srcs, tok, dp_rank=r, **kw)
        b.load_state_dict(state)
        rest = _take(iter(b), 20)
        for x, y in zip(full, part + rest):
            assert all(torch.equal(x[k], y[k]) for k in x)
        assert b.batches_yielded == 33
        # a second resume from the resumed loader's state
        c = _loader(srcs, tok, dp_rank=r, **kw)
        c.load_state_dict(b.state_dict())
        nxt = next(iter(c))
        assert all(torch.equal(nxt[k], full[33][k]) for k in nxt)


def test_resume_rejects_changed_setup(caps, tok):
    a = _loader(caps, tok, dp_size=2)
    next(iter(a))
    b = _loader(caps, tok, dp_size=2, batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        b.load_state_dict(a.state_dict())


def test_loader_from_config(caps, tok):
    from furnace.config import DataConfig

    d = os.path.dirname(caps[0])
    cfg = DataConfig(train_shards=os.path.join(d, "train-{000000..000005}.tar"), val_shards=caps[0],
                     max_length=32, num_workers=0)
    tr = ShardLoader.from_config(cfg, tok, split="train", batch_size=4, image_size=32, dp_rank=0, dp_size=1)
    assert tr.training and len(tr.sources[0]["urls"]) == 6
    va = ShardLoader.from_config(cfg, tok, split="val", batch_size=50, image_size=32)
    assert sum(b["input_ids"].shape[0] for b in va) == 40
