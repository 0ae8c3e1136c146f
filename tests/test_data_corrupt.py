"""Corrupt data is skipped and counted, never crashes; pickled members are never loaded."""
from __future__ import annotations

import io
import os
import pickle
import tarfile

import pytest
import torch

from furnace.data.loader import ShardLoader
from furnace.data.synthetic import draw_sample, sample_rng
from furnace.data.testing import add_members, write_caption_shards, write_raw_tar
from furnace.data.synthetic import demo_tokenizer


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer()


def _png(i=0):
    img, cap = draw_sample(sample_rng(0, "corrupt", i), 32)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), cap.encode()


def _eval(paths, tok, **kw):
    args = dict(batch_size=4, image_size=32, max_length=32, training=False)
    args.update(kw)
    ld = ShardLoader(paths, tok, **args)
    keys = []
    for b in ld:
        keys += [k for k in ld.last_keys if k is not None]
        assert torch.equal((b["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum(1), b["media_valid"].sum(1))
    return keys, ld.skipped


def _mixed_tar(path):
    """3 good samples and one of each corruption kind."""
    png, cap = _png()
    members = [
        ("good0.png", png), ("good0.txt", cap),
        ("badimg.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg"), ("badimg.txt", cap),
        ("nocap.png", png),
        ("emptycap.png", png), ("emptycap.txt", b"   "),
        ("noimg.txt", cap),
        ("long.png", png), ("long.txt", (b"a red circle " * 40)),
        ("good1.png", png), ("good1.txt", cap), ("good1.pyd", b"not read"),
        ("badjson.json", b"{not json"), ("badjson.png", png),
        ("baddoc.json", b'{"segments": [{"image": "0.png"}, {"text": "a red circle"}]}'),
        ("good2.png", png), ("good2.txt", cap),
        ("extra.npy", b"not read"),
    ]
    write_raw_tar(path, members)


def test_each_corruption_kind_counted(tmp_path, tok):
    p = str(tmp_path / "mixed.tar")
    _mixed_tar(p)
    keys, skipped = _eval([p], tok)
    assert keys == ["good0", "good1", "good2"]
    assert skipped == {"bad_image": 1, "missing_caption": 2, "missing_image": 2, "too_long": 1, "bad_json": 1,
                       "ignored_member": 2}


def test_truncated_garbage_and_missing_shards(tmp_path, tok):
    good = write_caption_shards(str(tmp_path), 20, shards=2)
    data = open(good[0], "rb").read()
    trunc = str(tmp_path / "trunc.tar")
    with open(trunc, "wb") as f:
        f.write(data[: len(data) // 2 + 100])   # cut inside a member
    garbage = str(tmp_path / "garbage.tar")
    with open(garbage, "wb") as f:
        f.write(os.urandom(3000))
    missing = str(tmp_path / "does-not-exist.tar")
    keys, skipped = _eval([trunc, garbage, missing, good[1]], tok)
    n_full = len(set(keys) & set(f"{i:09d}" for i in range(10, 20)))
    assert n_full == 10                                 # the good shard is read whole
    assert 1 <= len(keys) - 10 < 10                     # samples before the cut survive
    assert skipped["bad_shard"] == 2 and skipped["unreadable_shard"] == 1


def test_truncated_shard_in_training_with_workers(tmp_path, tok):
    good = write_caption_shards(str(tmp_path), 40, shards=4)
    data = open(good[0], "rb").read()
    with tarfile.open(good[0]) as tf:
        members = tf.getmembers()
    # cut inside a member's data: a cut on a member boundary reads as a shorter, valid tar
    with open(good[0], "wb") as f:
        f.write(data[: members[len(members) // 3].offset_data + 5])
    ld = ShardLoader(good, tok, batch_size=4, image_size=32, max_length=32, num_workers=2, dp_size=2, dp_rank=0)
    it = iter(ld)
    for _ in range(15):
        next(it)
    assert ld.skipped.get("bad_shard", 0) >= 1


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_never_unpickled(tmp_path, tok):
    # control: the payload really creates a file when unpickled
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(str(control))))
    assert control.exists()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)))
    shards = write_caption_shards(str(tmp_path / "s"), 6, shards=1)
    add_members(shards[0], {"000000002.pyd": payload, "000000099.pickle": payload,
                            "000000100.pth": payload, "000000101.pyd": payload})
    for training in (False, True):
        ld = ShardLoader(shards, tok, batch_size=3, image_size=32, max_length=32, training=training,
                         epochs=1 if training else None, num_workers=1 if training else 0)
        n = sum(b["input_ids"].shape[0] for b in ld)
        assert n == 6
        assert ld.skipped == {"ignored_member": 4}
    assert not marker.exists()


@pytest.mark.parametrize("workers,cuts", [(0, (1, 2, 4, 6, 9)), (2, (3, 9))])
def test_skip_counts_survive_resume(tmp_path, tok, workers, cuts):
    p = str(tmp_path / "mixed.tar")
    _mixed_tar(p)
    good = write_caption_shards(str(tmp_path), 30, shards=3)
    kw = dict(batch_size=3, image_size=32, max_length=32, num_workers=workers, shuffle_buffer=8, seed=3,
              canonical_streams=4)
    full = ShardLoader(good + [p], tok, **kw)
    it = iter(full)
    ref = [next(it) for _ in range(25)]
    for cut in cuts:
        a = ShardLoader(good + [p], tok, **kw)
        it = iter(a)
        [next(it) for _ in range(cut)]
        b = ShardLoader(good + [p], tok, **kw)
        b.load_state_dict(a.state_dict())
        it = iter(b)
        rest = [next(it) for _ in range(25 - cut)]
        assert all(torch.equal(x[k], y[k]) for x, y in zip(ref[cut:], rest) for k in x)
        assert full.skipped == b.skipped, cut
    assert full.skipped["too_long"] >= 1 and full.skipped["ignored_member"] >= 2


def test_all_corrupt_slot_raises_instead_of_hanging(tmp_path, tok):
    p = str(tmp_path / "bad.tar")
    png, cap = _png()
    write_raw_tar(p, [("a.jpg", b"junk"), ("a.txt", cap), ("b.png", png)])
    it = iter(ShardLoader([p], tok, batch_size=2, image_size=32, max_length=32))
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(it)
