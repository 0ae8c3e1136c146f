"""The Flamingo cross-attention kernel (media_attention_triton.py) against
attention_reference(q_segment=text_time, kv_segment=media_segment) in float64, on the layouts
the model builds (furnace.tokens.text_time, furnace.model.flamingo.media_segments) and on
shuffled / arbitrary ids that its loop ranges must still cover.

Layout tests run twice: with the two-kernel backward and with `span=n_lat` (the one-pass
backward for keys in aligned spans), which must agree with the reference equally well.

On CPU the kernels run under TRITON_INTERPRET=1 (fp32/fp16, one config, 16 x 16 tiles); bf16
runs only with CUDA.
"""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import furnace_kernels
import furnace_kernels.media_attention_triton as ma
from furnace.model.flamingo import media_segments
from furnace.tokens import text_time

CUDA = torch.cuda.is_available()
if not CUDA and not ma.INTERPRET:  # imported earlier without the interpreter: re-decorate the kernels
    os.environ["TRITON_INTERPRET"] = "1"
    importlib.reload(importlib.import_module("furnace_kernels.flash_attention"))
    ma = importlib.reload(ma)
DEV = "cuda" if CUDA else "cpu"
IMG, EOS = 7, 9
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}


def layout(rows, n_lat, t_img, segment_ids=None, reset_id=None):
    """(text_time, media_segment) as the model computes them for token rows (lists of ids; IMG
    marks an image) with `t_img` media slots per row, the slots past a row's images padding."""
    ids = torch.tensor(rows)
    valid = torch.arange(t_img)[None, :] < (ids == IMG).sum(1, keepdim=True)
    return text_time(ids, IMG, segment_ids, reset_id), media_segments(valid, n_lat)


def row(length, image_at, eos_at=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(10, 50, (length,), generator=g).tolist()
    for i in image_at:
        r[i] = IMG
    for i in eos_at:
        r[i] = EOS
    return r


def run(tt, ms, *, h=2, hkv=2, d=32, dtype=torch.float32, seed=0, scale=None, kv_noncontiguous=False, span=None):
    """(output, q/k/v gradients, mismatches) of the kernel against the float64 reference: each
    mismatch names a tensor of the wrong dtype / shape, not finite, or not close at TOL[dtype].
    `span`: passed to the kernel (the one-pass backward)."""
    tt, ms = tt.to(DEV), ms.to(DEV)
    (b, lq), lk = tt.shape, ms.shape[1]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g).to(DEV, dtype).requires_grad_()
    if kv_noncontiguous:  # [B, Lk, Hkv, D] storage, as the projections produce
        k = torch.randn(b, lk, hkv, d, generator=g).to(DEV, dtype).transpose(1, 2).requires_grad_()
        v = torch.randn(b, lk, hkv, d, generator=g).to(DEV, dtype).transpose(1, 2).requires_grad_()
    else:
        k = torch.randn(b, hkv, lk, d, generator=g).to(DEV, dtype).requires_grad_()
        v = torch.randn(b, hkv, lk, d, generator=g).to(DEV, dtype).requires_grad_()
    do = torch.randn(b, h, lq, d, generator=g).to(DEV, dtype)
    out = ma.media_attention_triton(q, k, v, tt, ms, scale=scale, span=span)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = furnace_kernels.attention_reference(*ref_in, q_segment=tt, kv_segment=ms, scale=scale)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    atol, rtol = TOL[dtype]
    bad = []
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        if got.dtype != dtype or got.shape != want.shape or not torch.isfinite(got).all():
            bad.append(f"{name}: {got.dtype} {tuple(got.shape)}, finite {bool(torch.isfinite(got).all())}")
        elif not torch.allclose(got.double(), want, atol=atol, rtol=rtol):
            bad.append(f"{name}: max abs error {(got.double() - want).abs().max().item():.3g}")
    return out, grads, bad


def blind(tt, ms):
    """[B, Lq] queries that see no key, [B, Lk] keys that no query sees."""
    eq = tt[:, :, None] == ms[:, None, :]
    return ~eq.any(2), ~eq.any(1)


def assert_blind_exact_zeros(tt, ms, out, grads):
    bq, bk = blind(tt.to(DEV), ms.to(DEV))
    assert bq.any() or bk.any()  # the case has some
    assert (out.transpose(1, 2)[bq] == 0).all() and (grads[0].transpose(1, 2)[bq] == 0).all()
    assert (grads[1].transpose(1, 2)[bk] == 0).all() and (grads[2].transpose(1, 2)[bk] == 0).all()


one_pass = pytest.mark.parametrize("one_pass", [False, True], ids=["two-kernel", "span"])


@one_pass
@pytest.mark.parametrize("n_lat", [8, 16])
def test_flamingo_rows_gqa_blind_text_and_padding_media(n_lat, one_pass):
    # three images in row 0, two in row 1 (its third slot is padding media, -1); text before the
    # first image sees nothing; 45 tokens, Lk = 3 * n_lat: neither a multiple of the 16-tile
    rows = [row(45, (6, 19, 33), seed=1), row(45, (3, 40), seed=2)]
    tt, ms = layout(rows, n_lat, 3)
    out, grads, bad = run(tt, ms, h=4, hkv=2, seed=n_lat, span=n_lat if one_pass else None)
    assert not bad, bad
    assert_blind_exact_zeros(tt, ms, out, grads)


@one_pass
def test_fp16_and_noncontiguous_kv_and_scale(one_pass):
    tt, ms = layout([row(37, (0, 11, 30), seed=3)], 8, 4)
    _, _, bad = run(tt, ms, h=2, hkv=1, d=80, dtype=torch.float16, seed=4, scale=0.2, kv_noncontiguous=True,
        span=8 if one_pass else None)
    assert not bad, bad


@one_pass
def test_idefics_resets_give_runs_of_zero_between_images(one_pass):
    r = row(48, (2, 20, 36), eos_at=(12, 30), seed=5)
    tt, ms = layout([r], 8, 3, reset_id=EOS)
    assert (tt[0, 14:20] == 0).all() and (tt[0, 32:36] == 0).all()  # the runs after each EOS
    out, grads, bad = run(tt, ms, seed=6, span=8 if one_pass else None)
    assert not bad, bad
    assert_blind_exact_zeros(tt, ms, out, grads)


@one_pass
def test_packed_rows_see_only_their_own_images(one_pass):
    # two samples per row: the second's tokens before its first image get 0 (global count otherwise)
    r = row(50, (1, 14, 33, 44), seed=7)
    segment_ids = torch.tensor([[0] * 25 + [1] * 25])
    tt, ms = layout([r], 8, 4, segment_ids=segment_ids)
    assert (tt[0, 25:33] == 0).all() and tt[0, 33] == 3
    out, grads, bad = run(tt, ms, h=4, hkv=1, seed=8, span=8 if one_pass else None)
    assert not bad, bad
    assert_blind_exact_zeros(tt, ms, out, grads)


@one_pass
def test_decode_one_query(one_pass):
    for t in (0, 1, 2):  # before any image, and after one / two
        tt = torch.tensor([[t]])
        ms = torch.tensor([[1] * 8 + [2] * 8 + [-1] * 8])
        out, grads, bad = run(tt, ms, h=4, hkv=2, seed=t, span=8 if one_pass else None)
        assert not bad, bad
        if t == 0:
            assert (out == 0).all() and all((gr == 0).all() for gr in grads)


@one_pass
def test_row_without_images_is_all_zeros(one_pass):
    tt, ms = layout([row(20, (), seed=9), row(20, (4,), seed=10)], 8, 2)
    out, grads, bad = run(tt, ms, seed=11, span=8 if one_pass else None)
    assert not bad, bad
    assert (out[0] == 0).all() and all((gr[0] == 0).all() for gr in grads)


def test_shuffled_ids_are_covered():
    """Neither side monotone nor contiguous: the per-block spans must still reach every match."""
    g = torch.Generator().manual_seed(12)
    tt, ms = layout([row(45, (5, 17, 30), seed=13), row(45, (2, 9, 20), seed=14)], 8, 4)
    tt = tt[:, torch.randperm(45, generator=g)]
    ms = ms[:, torch.randperm(32, generator=g)]
    _, _, bad = run(tt, ms, h=4, hkv=2, seed=15)
    assert not bad, bad


def test_span_shuffled_text_and_unordered_spans():
    """The span promise is about the keys only: text in any order (each span's query range then
    covers most of the row, other ids masked), and spans in any order of ids."""
    g = torch.Generator().manual_seed(21)
    tt, ms = layout([row(45, (5, 17, 30), seed=22), row(45, (2, 9), seed=23)], 8, 4)
    tt = tt[:, torch.randperm(45, generator=g)]
    order = torch.randperm(4, generator=g)
    ms = ms.view(2, 4, 8)[:, order].reshape(2, 32)
    out, grads, bad = run(tt, ms, h=4, hkv=2, seed=24, span=8)
    assert not bad, bad
    assert_blind_exact_zeros(tt, ms, out, grads)


def test_span_backward_is_deterministic():
    tt, ms = layout([row(45, (6, 19, 33), seed=25), row(45, (3,), seed=26)], 16, 3)
    first = run(tt, ms, h=4, hkv=1, seed=27, span=16)
    assert not first[2], first[2]
    second = run(tt, ms, h=4, hkv=1, seed=27, span=16)
    assert not second[2], second[2]
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


def test_span_promise_is_checked():
    tt, ms = layout([row(30, (4, 15), seed=28)], 8, 3)
    q = torch.randn(1, 2, 30, 32, device=DEV, requires_grad=True)
    k = torch.randn(1, 2, 24, 32, device=DEV, requires_grad=True)

    def backward(ms, span):
        ma.media_attention_triton(q, k, k, tt.to(DEV), ms.to(DEV), span=span).sum().backward()

    with pytest.raises(ValueError, match="span=5"):  # 24 keys are not runs of 5
        backward(ms, 5)
    if CUDA:
        return  # a failed device assert would end the process's CUDA context
    shifted = torch.roll(ms, 3, dims=1)  # runs of 8 one id each, but not aligned to multiples of 8
    with pytest.raises(RuntimeError, match="span=8 promised"):
        backward(shifted, 8)
    twice = ms.clone()
    twice[0, 16:] = 2  # image 2's id on two spans, and text carries it
    with pytest.raises(RuntimeError, match="span=8 promised"):
        backward(twice, 8)
    # an id on two spans that no text carries (as padding media's -1 is): kept, and exact
    _, _, bad = run(tt, torch.tensor([[7] * 8 + [2] * 8 + [7] * 8]), seed=31, span=8)
    assert not bad, bad


def test_spans_longer_than_one_tile_fall_back():
    assert ma.span_tile(8, 32) == 16 and ma.span_tile(12, 80) == 16 and ma.span_tile(64, 128) == 64
    assert ma.span_tile(128, 64) == 128 and ma.span_tile(128, 128) is None and ma.span_tile(64, 256) is None
    tt, ms = layout([row(20, (2, 9), seed=29)], 128, 2)
    _, _, bad = run(tt, ms, h=2, hkv=1, d=80, seed=30, span=128)  # 128 x 128 tile: the two-kernel backward
    assert not bad, bad


def test_arbitrary_integer_ids_compare_exactly():
    """int64 ids that collide under int32 truncation, negatives, ids on one side only."""
    big = 1 << 33
    tt = torch.tensor([[5, big + 5, -3, big + 5, 7, 5, -3, 0, 5, big + 5] * 3])
    ms = torch.tensor([[big + 5] * 6 + [5] * 5 + [-3] * 4 + [11] * 3 + [-1] * 2])
    out, grads, bad = run(tt, ms, seed=16)
    assert not bad, bad
    assert_blind_exact_zeros(tt, ms, out, grads)


def test_tokens_outside_the_spans_are_never_loaded():
    """NaN-poisoned K/V of an image whose text is absent (its first keys share a tile with the
    last image in use: the forward / dQ spans must stop at that image's last key, not at a tile
    edge), and NaN-poisoned Q of the text before the first image (the dK/dV spans must start
    after it). Any load of them would leak NaN (0 x NaN) into the results that are compared."""
    b, h, lq, d, n_lat = 1, 2, 40, 32, 12
    tt, ms = layout([row(lq, (8, 20), seed=17)], n_lat, 3)
    ms[0, 2 * n_lat:] = 3  # a third image that no query reaches
    tt, ms = tt.to(DEV), ms.to(DEV)
    for span in (None, n_lat):  # two-kernel backward; one-pass (12 keys: a span off the tile)
        _poisoned_run(tt, ms, b, h, lq, d, n_lat, span)


def _poisoned_run(tt, ms, b, h, lq, d, n_lat, span):
    g = torch.Generator().manual_seed(18)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(DEV) for n in (lq, 3 * n_lat, 3 * n_lat))
    ref_in = [q.clone(), k[:, :, :2 * n_lat].clone(), v[:, :, :2 * n_lat].clone()]
    ref_in[0][:, :, :8] = 0.0  # blind rows: any value gives out = 0, dq = 0
    q[:, :, :8] = float("nan")
    k[:, :, 2 * n_lat:] = float("nan")
    v[:, :, 2 * n_lat:] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref_in = [t.double().requires_grad_() for t in ref_in]
    out = ma.media_attention_triton(q, k, v, tt, ms, span=span)
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    ref = furnace_kernels.attention_reference(*ref_in, q_segment=tt, kv_segment=ms[:, :2 * n_lat])
    want = (ref, *torch.autograd.grad(ref, ref_in, do.double()))
    got = (out, dq, dk[:, :, :2 * n_lat], dv[:, :, :2 * n_lat])
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), w, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_range_tables():
    tt = torch.tensor([[0, 2, 2, 1, 2]])
    ms = torch.tensor([[1, 1, -1, 2, 2, 3]])
    t = {**ma.key_ranges(tt, ms), **ma.query_ranges(tt, ms)}
    # the kernels compare qid with kid: equal iff the ids are
    assert torch.equal(t["qid"][:, :, None] == t["kid"][:, None, :], tt[:, :, None] == ms[:, None, :])
    assert t["qid"][0, 0] == -1  # id 0: no key carries it
    kperm, qperm = t["kperm"][0], t["qperm"][0]
    q2 = 1  # query 1 (id 2): keys 3..4
    assert (kperm[t["qid"][0, q2]], kperm[t["q_hi"][0, q2] - 1]) == (3, 4)
    k2 = 3  # key 3 (id 2): queries 1..4
    assert (qperm[t["k_lo"][0, k2]], qperm[t["k_hi"][0, k2] - 1]) == (1, 4)
    assert t["k_hi"][0, 5] == t["k_lo"][0, 5]  # id 3: no query


def test_dispatch_and_errors():
    tt, ms = layout([row(17, (2,), seed=19)], 8, 1)
    q = torch.randn(1, 2, 17, 32, device=DEV)
    k = torch.randn(1, 1, 8, 32, device=DEV)
    prev = furnace_kernels.get_backend("media_attention")
    try:
        outs = {}
        for name in ("triton", "reference"):
            furnace_kernels.set_backend("media_attention", name)
            outs[name] = furnace_kernels.media_attention(q, k, k, tt.to(DEV), ms.to(DEV))
    finally:
        furnace_kernels.set_backend("media_attention", prev)
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError):  # text_time of the wrong length
        ma.media_attention_triton(q, k, k, tt[:, :5].to(DEV), ms.to(DEV))
    with pytest.raises(TypeError):
        ma.media_attention_triton(q, k, k, tt.float().to(DEV), ms.to(DEV))


def test_flamingo_model_loss_and_grads_match_reference_backend(monkeypatch):
    """With model.xattn.kernel=media the xattn blocks pass span=num_latents: the triton run's
    backward is the one-pass kernel."""
    from test_model_flamingo import make_batch, make_model, set_gates
    from test_model_flamingo import IMG as MODEL_IMG

    spans = []
    one_pass = ma._backward_span
    monkeypatch.setattr(ma, "_backward_span", lambda *a: spans.append(a[-2]) or one_pass(*a))
    torch.manual_seed(20)
    model = make_model(freeze_lm=False, **{"xattn.kernel": "media"}).to(DEV)
    set_gates(model, 0.5)
    batch = make_batch([[1, MODEL_IMG, 2, 3, 4, MODEL_IMG, 5, 6, 7, 8], [3, 4, MODEL_IMG, 6, 7, 1, 1, 2, 2, 3]], t_img=2)
    batch = {k: t.to(DEV) for k, t in batch.items()}
    prev = furnace_kernels.get_backend("media_attention")
    results = {}
    try:
        for name in ("triton", "reference"):
            furnace_kernels.set_backend("media_attention", name)
            model.zero_grad(set_to_none=True)
            loss = model(batch)
            loss.backward()
            results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        furnace_kernels.set_backend("media_attention", prev)
    assert spans and set(spans) == {model.num_latents} and len(spans) == len(model.xattn)
    (lt, gt), (lr, gr) = results["triton"], results["reference"]
    torch.testing.assert_close(lt, lr, atol=1e-5, rtol=1e-5)
    assert gt.keys() == gr.keys() and any("xattn" in n for n in gt)
    for n in gt:
        torch.testing.assert_close(gt[n], gr[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------- CUDA


needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def gpu_layout(seed, n_lat, length=1000):
    """Two rows of `length` tokens, five images at random places, an EOS (IDEFICS reset) near
    the end, six media slots (the last one padding)."""
    g = torch.Generator().manual_seed(seed)
    rows = [row(length, sorted(torch.randperm(length - 10, generator=g)[:5].tolist()), eos_at=(length - 5,), seed=s)
            for s in range(2)]
    return layout(rows, n_lat, 6, reset_id=EOS)


@needs_cuda
@pytest.mark.parametrize("dtype,n_lat,d", [(torch.bfloat16, 64, 128), (torch.bfloat16, 8, 80),
                                           (torch.float16, 64, 64)], ids=["bf16-64-128", "bf16-8-80", "fp16-64-64"])
@one_pass
def test_gpu_flamingo_shapes(dtype, n_lat, d, one_pass):
    tt, ms = gpu_layout(d, n_lat)
    span = n_lat if one_pass else None
    _, _, bad = run(tt, ms, h=8, hkv=2, d=d, dtype=dtype, seed=d, span=span)
    assert not bad, bad
    g = torch.Generator().manual_seed(d)
    _, _, bad = run(tt[:, torch.randperm(tt.shape[1], generator=g)], ms, h=8, hkv=2, d=d, dtype=dtype, seed=d + 1, span=span)
    assert not bad, bad


@needs_cuda
def test_gpu_span_backward_is_deterministic():
    tt, ms = gpu_layout(7, 64)
    first = run(tt, ms, h=8, hkv=2, d=128, dtype=torch.bfloat16, seed=7, span=64)
    assert not first[2], first[2]
    second = run(tt, ms, h=8, hkv=2, d=128, dtype=torch.bfloat16, seed=7, span=64)
    assert not second[2], second[2]
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("i", range(6))
def test_gpu_every_config(i):
    """Each config the autotuner may pick (the general kernel's lists), forced; head dim 96 pads to 128."""
    from furnace_kernels.flash_attention import _BWD_CONFIGS, _FWD_CONFIGS, forced_configs

    tt, ms = gpu_layout(i, 64, length=300)
    with forced_configs(fwd=_FWD_CONFIGS[i % len(_FWD_CONFIGS)], bwd=_BWD_CONFIGS[i]):
        _, _, bad = run(tt, ms, h=4, hkv=2, d=96, dtype=torch.bfloat16, seed=i)
        assert not bad, bad


@needs_cuda
@pytest.mark.parametrize("i", range(len(ma._SPAN_CONFIGS)))
def test_gpu_every_span_config(i):
    """Each config of the one-pass backward, forced, at its largest tiles: 64 latents at head dim
    128 (96 padded), 128 latents at head dim 64."""
    from furnace_kernels.flash_attention import forced_configs

    with forced_configs(span=ma._SPAN_CONFIGS[i]):
        for n_lat, d in ((64, 96), (128, 64)):
            tt, ms = gpu_layout(i, n_lat, length=300)
            _, _, bad = run(tt, ms, h=4, hkv=2, d=d, dtype=torch.bfloat16, seed=i, span=n_lat)
            assert not bad, bad
