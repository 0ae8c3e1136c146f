"""Packing (`data.pack`): several samples a row with segment ids. The packed loss is the unpacked
token-weighted loss; each sample's text sees only its own images; the loader packs every sample
once, in order, and resumes exactly; the loss curve is the same on every layout."""
import numpy as np
import pytest
import torch

from furnace.tokens import text_time
from train_utils import TINY, losses, run, train_cmd

IMG = 9


def test_text_time_restarts_with_each_sample():
    ids = torch.tensor([[1, IMG, 5, 6, 1, 7, IMG, 8, IMG, 1, 4, 0]])
    seg = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0]])
    # sample 2's tokens before its <image> see nothing (not sample 1's image); sample 3 has none
    assert text_time(ids, IMG, seg).tolist() == [[0, 1, 1, 1, 0, 0, 2, 2, 3, 0, 0, 0]]
    assert text_time(ids, IMG).tolist() == [[0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3]]


@pytest.fixture(scope="module")
def tiny():
    from furnace.config import load_config
    from furnace.data.synthetic import demo_tokenizer
    from furnace.data.text import TextEncoder
    from furnace.training.build import build_model

    cfg = load_config("demo", [s for s in TINY if s.startswith("model.")] + ["model.xattn.gate_init=0.7"])
    tok = demo_tokenizer()
    torch.manual_seed(0)
    return build_model(cfg, tok).eval(), TextEncoder(tok, max_length=64, max_images=3)


def _rows(enc):
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)  # noqa: E731
    caption = lambda text: (enc.caption(text), [img()], False, False)  # noqa: E731
    doc_ids, _ = enc.document([{"text": "a red"}, {"image": 0}, {"text": "circle left of"}, {"image": 1},
                               {"text": "a blue square"}])
    return [caption("a red circle"), (doc_ids, [img(), img()], True, False), caption("a green square below a circle"),
            caption("a yellow triangle")]


def test_the_packed_loss_is_the_unpacked_token_weighted_loss(tiny):
    from furnace.data.collate import collate, collate_packed
    from furnace.data.images import CLIP_MEAN, CLIP_STD
    from furnace.tokens import IGNORE_INDEX

    model, enc = tiny
    rows = _rows(enc)
    kw = dict(max_length=64, max_images=3, image_size=32, mean=CLIP_MEAN, std=CLIP_STD, pad_to_max=False)
    plain = collate(rows, enc, **kw)
    packed = collate_packed([[rows[0], rows[1]], [rows[2], rows[3]]], enc, **kw)
    tokens = lambda b: int((b["labels"][:, 1:] != IGNORE_INDEX).sum())  # noqa: E731
    assert tokens(packed) == tokens(plain)
    with torch.no_grad():
        want = float(model(plain))
        got = float(model(packed))
        # and per token: the packed logits of each sample are its unpacked logits
        lp, lu = model.logits(packed), model.logits(plain)
    assert got == pytest.approx(want, abs=1e-5)
    n0, n1 = len(rows[0][0]), len(rows[1][0])
    torch.testing.assert_close(lp[0, :n0], lu[0, :n0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[0, n0: n0 + n1], lu[1, :n1], atol=1e-5, rtol=0)
    assert packed["position_ids"][0, n0] == 0 and packed["segment_ids"][0, n0] == 2
    assert packed["media_valid"].sum(1).tolist() == [3, 2]


def test_the_loader_packs_every_sample_once_in_order_and_resumes_exactly(data, tiny):
    from furnace.data.loader import ShardLoader

    _, enc = tiny
    kw = dict(batch_size=3, max_length=24, max_images=3, image_size=32, canonical_streams=2, shuffle_buffer=16,
              seed=0, pack=True)
    def by_stream(loader, n):
        out, it = {}, iter(loader)
        batches = []
        for _ in range(n):
            batches.append(next(it))
            out.setdefault(loader.last_meta["stream"], []).extend(loader.last_keys)
        return out, batches

    plain, _ = by_stream(ShardLoader(data["train"], enc.tokenizer, **{**kw, "pack": False, "batch_size": 1}), 60)
    packed, batches = by_stream(ShardLoader(data["train"], enc.tokenizer, **kw), 6)
    for stream, keys in packed.items():  # each stream's samples, every one once, in the stream's order
        assert keys == plain[stream][: len(keys)], stream
    for b in batches:
        assert int(b["segment_ids"].max()) >= 2  # rows hold several samples
        assert (b["media_valid"].sum(1) == (b["input_ids"] == enc.image_id).sum(1)).all()
        assert b["input_ids"].shape == (3, 24)
    resumed = ShardLoader(data["train"], enc.tokenizer, **kw)
    ref = ShardLoader(data["train"], enc.tokenizer, **kw)
    it_ref = iter(ref)
    for _ in range(3):
        next(it_ref)
    state_after = ref.state_dict()
    resumed.load_state_dict(state_after)
    it_res = iter(resumed)
    for k in range(3):
        a, b = next(it_ref), next(it_res)
        for key in ("input_ids", "segment_ids", "position_ids", "labels"):
            assert torch.equal(a[key], b[key]), (k, key)
        assert torch.equal(a["images"], b["images"])
        assert torch.equal(a["input_ids"], batches[3 + k]["input_ids"])


@pytest.mark.multirank
def test_packed_training_gives_one_loss_curve_on_every_layout(data, tmp_path):
    pack = ["data.pack=true", "data.max_images=3", "train.max_steps=3"]
    curves = {}
    for name, layout, nproc in (("one", ["parallel.zero_stage=0"], 1),
                                ("tp2_zero3", ["parallel.tp=2", "parallel.zero_stage=3"], 2),
                                ("pp2", ["parallel.pp=2", "parallel.zero_stage=1"], 2)):
        res = run(train_cmd(tmp_path / name, data, *pack, *layout, nproc=nproc))
        assert res.returncode == 0, res.stderr[-3000:]
        curves[name] = losses(tmp_path / name)
    assert len(curves["one"]) == 3
    for name in ("tp2_zero3", "pp2"):
        for step, loss in curves["one"].items():
            assert curves[name][step] == pytest.approx(loss, abs=2e-5), (name, curves)
