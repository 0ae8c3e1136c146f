"""Canonical streams: the training batches are a function of (seed, sources, step), not of the
data-parallel size or the worker count; each rank reads and decodes only its own streams; a
merged state resumes under another data-parallel size."""
from __future__ import annotations

import pytest
import torch

import furnace.data.replay as replay
from furnace.config import ConfigError, Config, validate
from furnace.data.loader import ShardLoader
from furnace.data.streams import merge_states
from furnace.data.samples import SampleDecoder
from furnace.data.sources import Source
from furnace.data.synthetic import demo_tokenizer
from furnace.data.testing import tar_keys, write_caption_shards, write_doc_shards

C = 8


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer()


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    caps = write_caption_shards(str(tmp_path_factory.mktemp("caps")), 160, shards=10)
    docs = write_doc_shards(str(tmp_path_factory.mktemp("docs")), 48, shards=3, images_per_doc=2)
    return [Source(caps, 0.7), Source(docs, 0.3)]


def _loader(srcs, tok, **kw):
    args = dict(batch_size=3, image_size=32, max_length=48, max_images=2, seed=11, shuffle_buffer=5,
                canonical_streams=C)
    args.update(kw)
    return ShardLoader(srcs, tok, **args)


def _global_batches(loaders, n_global):
    """Micro-batches 0..n_global-1 in global order: j = r + D t is rank r's t-th."""
    D = len(loaders)
    its = [iter(ld) for ld in loaders]
    out = []
    for _ in range(n_global // D):
        for ld, it in zip(loaders, its):
            b = next(it)
            out.append((tuple(ld.last_keys), b))
    return out


def _same(a, b) -> bool:
    """The same sample keys in the same micro-batches, and equal tensors."""
    return [k for k, _ in a] == [k for k, _ in b] and all(
        torch.equal(x[k], y[k]) for (_, x), (_, y) in zip(a, b) for k in x)


@pytest.mark.parametrize("dp,workers", [(1, 2), (2, 0), (2, 2), (4, 1), (8, 0)])
def test_same_micro_batches_on_every_layout(srcs, tok, dp, workers):
    ref = _global_batches([_loader(srcs, tok)], 32)          # 32 micro-batches: 4 per stream, epochs cross
    got = _global_batches([_loader(srcs, tok, dp_rank=r, dp_size=dp, num_workers=workers) for r in range(dp)], 32)
    assert _same(ref, got)


def test_rank_reads_and_decodes_only_its_streams(srcs, tok, monkeypatch):
    opened, decoded = {}, {}
    rank = [0]
    read, row = replay.iter_shard_samples, SampleDecoder.row

    def spy_read(url, *a, **k):
        opened.setdefault(rank[0], set()).add(url)
        return read(url, *a, **k)

    def spy_row(self, raw):
        decoded.setdefault(rank[0], []).append(raw["__key__"])
        return row(self, raw)

    monkeypatch.setattr(replay, "iter_shard_samples", spy_read)
    monkeypatch.setattr(SampleDecoder, "row", spy_row)
    caps = srcs[0].shards                                   # 10 shards >= 8 streams: one reader per shard
    for r in range(2):
        rank[0] = r
        ld = _loader(caps, tok, dp_rank=r, dp_size=2, epochs=1)
        for _ in ld:
            pass
    assert not opened[0] & opened[1] and opened[0] | opened[1] == set(caps)
    assert not set(decoded[0]) & set(decoded[1])
    assert sorted(decoded[0] + decoded[1]) == sorted(k for s in caps for k in tar_keys(s))


@pytest.mark.parametrize("before,after", [(2, 4), (4, 1), (1, 2), (2, 8)])
def test_merged_state_resumes_under_another_dp_size(srcs, tok, before, after):
    ref = _global_batches([_loader(srcs, tok)], 40)
    first = [_loader(srcs, tok, dp_rank=r, dp_size=before, num_workers=1) for r in range(before)]
    head = _global_batches(first, 16)
    state = merge_states([ld.state_dict() for ld in first])
    assert sorted(int(c) for c in state["streams"]) == list(range(C))
    second = [_loader(srcs, tok, dp_rank=r, dp_size=after) for r in range(after)]
    for ld in second:
        ld.load_state_dict(state)
    assert _same(ref, head + _global_batches(second, 24))


def test_a_rank_state_alone_cannot_resume_another_layout(srcs, tok):
    a = _loader(srcs, tok, dp_rank=0, dp_size=2)
    next(iter(a))
    b = _loader(srcs, tok, dp_rank=1, dp_size=2)
    with pytest.raises(ValueError, match="lacks streams"):
        b.load_state_dict(a.state_dict())


def test_dp_size_must_divide_the_streams(srcs, tok):
    with pytest.raises(ValueError, match="canonical_streams=8 is not a multiple of the data-parallel size 3"):
        _loader(srcs, tok, dp_size=3)
    cfg = Config()
    cfg.train.global_batch_size = 24
    with pytest.raises(ConfigError, match=r"--set data.canonical_streams=192"):
        validate(cfg, world_size=3, check_paths=False)


def test_workers_lowered_to_a_divisor_of_the_rank_streams(srcs, tok):
    assert _loader(srcs, tok, num_workers=3).num_workers_eff == 2        # 8 streams
    assert _loader(srcs, tok, dp_size=4, num_workers=3).num_workers_eff == 2   # 2 streams
    assert _loader(srcs, tok, dp_size=8, num_workers=2).num_workers == 1
