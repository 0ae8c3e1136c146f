"""Triton flash attention vs a float64 dense reference written here (not kernels/reference.py).

On CPU the kernels run under TRITON_INTERPRET=1 (fp32/fp16, one autotune config, block 16);
the bf16 / large-shape / head-dim sweep runs only with CUDA.
"""
import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels on the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import furnace_kernels
import furnace_kernels.flash_attention as fa

CUDA = torch.cuda.is_available()
if not CUDA and not fa.INTERPRET:  # imported earlier without the interpreter: re-decorate the kernels
    os.environ["TRITON_INTERPRET"] = "1"
    fa = importlib.reload(fa)
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def dense_attention(q, k, v, *, causal=False, q_segment=None, kv_segment=None, scale=None):
    """float64 dense attention with the furnace mask: bottom-right causal, segment equality,
    rows that see nothing give 0."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    k = k[:, torch.arange(h) // (h // hkv)]
    v = v[:, torch.arange(h) // (h // hkv)]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    mask = torch.ones(b, 1, lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        mask = mask & (j <= i + (lk - lq))
    if q_segment is not None:
        mask = mask & (q_segment[:, None, :, None] == kv_segment[:, None, None, :])
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    out = torch.einsum("bhij,bhjd->bhid", p, v) / torch.where(den > 0, den, torch.ones_like(den))
    return out


def flamingo_segments(b, lq, n_img, n_lat, pad_imgs=0, gen=None, device=DEV):
    """q_segment = text_time (non-decreasing, 0 before the first image); kv_segment = image+1
    per latent, -1 for padded media."""
    qs = torch.zeros(b, lq, dtype=torch.long)
    for r in range(b):
        cuts = torch.sort(torch.randint(0, lq, (n_img,), generator=gen)).values
        for c in cuts:
            qs[r, c:] += 1
    ks = torch.arange(1, n_img + 1).repeat_interleave(n_lat)
    ks = torch.cat([ks, torch.full((pad_imgs * n_lat,), -1)]).expand(b, -1).contiguous()
    return qs.to(device), ks.to(device)


def packed_segments(b, length, n_docs, gen=None, device=DEV):
    seg = torch.zeros(b, length, dtype=torch.int32)
    for r in range(b):
        cuts = torch.sort(torch.randint(1, length, (n_docs - 1,), generator=gen)).values
        for c in cuts:
            seg[r, c:] += 1
    return seg.to(device), seg.clone().to(device)


def _check(b, h, hkv, lq, lk, d, dtype, *, causal=False, segs=None, scale=None, seed=0, tol=None, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(b, hkv, lk, d, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(b, hkv, lk, d, generator=gen).to(device, dtype).requires_grad_()
    do = torch.randn(b, h, lq, d, generator=gen).to(device, dtype)
    qs, ks = segs if segs is not None else (None, None)

    out = fa.attention_triton(q, k, v, causal=causal, q_segment=qs, kv_segment=ks, scale=scale)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense_attention(q64, k64, v64, causal=causal, q_segment=qs, kv_segment=ks, scale=scale)
    rdq, rdk, rdv = torch.autograd.grad(ref, (q64, k64, v64), do.double())

    atol, rtol = tol or {torch.float32: (2e-4, 1e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}[dtype]
    for name, got, want in (("out", out, ref), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return out, (dq, dk, dv), (qs, ks)


# ---------------------------------------------------------------------------------------------
# CPU (interpreter) set: small shapes, fp32 and fp16

CASES = [
    # id,              b, h, hkv, lq, lk, d,  dtype,          causal, seg
    ("dense",          1, 2, 2, 37, 37, 32, torch.float32, False, None),
    ("causal-gqa",     1, 4, 2, 45, 45, 32, torch.float32, True, None),
    ("causal-lq<lk",   1, 2, 1, 23, 50, 80, torch.float32, True, None),
    ("causal-lq>lk",   2, 2, 1, 50, 23, 32, torch.float32, True, None),  # first 27 queries see nothing
    ("flamingo-gqa",   2, 4, 2, 70, 40, 80, torch.float32, False, "flamingo"),
    ("packed-causal",  2, 2, 2, 61, 61, 32, torch.float32, True, "packed"),
    ("flamingo-fp16",  1, 2, 1, 53, 24, 32, torch.float16, False, "flamingo"),
    ("causal-fp16",    1, 4, 2, 40, 40, 80, torch.float16, True, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention_matches_dense(case):
    _, b, h, hkv, lq, lk, d, dtype, causal, seg = case
    gen = torch.Generator().manual_seed(hash(case[0]) % 1000)
    segs = None
    if seg == "flamingo":
        n_img = 3
        n_lat = (lk - 8) // n_img
        segs = flamingo_segments(b, lq, n_img, n_lat, gen=gen)
        segs = (segs[0], torch.cat([segs[1], torch.full((b, lk - n_img * n_lat), -1, device=DEV)], 1))
    elif seg == "packed":
        segs = packed_segments(b, lq, 3, gen=gen)
    _check(b, h, hkv, lq, lk, d, dtype, causal=causal, segs=segs, seed=lq * 7 + d)


def test_rows_that_see_nothing_are_exact_zeros():
    b, h, lq, lk, d = 1, 2, 33, 20, 32
    qs = torch.zeros(b, lq, dtype=torch.long, device=DEV)
    qs[:, 20:] = 1  # queries 0..19 have text_time 0: no image before them
    ks = torch.ones(b, lk, dtype=torch.long, device=DEV)
    ks[:, 16:] = -1  # padded media
    out, grads, _ = _check(b, h, h, lq, lk, d, torch.float32, segs=(qs, ks), seed=3)
    assert (out[:, :, :20] == 0).all()
    assert (grads[0][:, :, :20] == 0).all()  # dq of the blind queries
    assert (grads[1][:, :, 16:] == 0).all() and (grads[2][:, :, 16:] == 0).all()  # padded latents


def test_all_blind_gives_zero_and_no_nan():
    b, h, lq, lk, d = 1, 2, 20, 18, 32
    q = torch.randn(b, h, lq, d, device=DEV, requires_grad=True)
    k = torch.randn(b, h, lk, d, device=DEV, requires_grad=True)
    v = torch.randn(b, h, lk, d, device=DEV, requires_grad=True)
    qs = torch.zeros(b, lq, dtype=torch.int32, device=DEV)
    ks = torch.full((b, lk), -1, dtype=torch.int32, device=DEV)
    out = fa.attention_triton(q, k, v, q_segment=qs, kv_segment=ks)
    out.sum().backward()
    assert (out == 0).all()
    for t in (q, k, v):
        assert (t.grad == 0).all()


def test_skipped_key_blocks_are_never_loaded():
    """NaN-poison K/V of a whole image that no query can see; if any such block were loaded
    (even fully masked), NaN would leak into the output (0 * NaN) or the gradients."""
    b, h, lq, d, n_lat = 1, 2, 40, 32, 128  # 128 latents: aligned to every block size used
    lk = 3 * n_lat
    gen = torch.Generator().manual_seed(11)
    qs = torch.zeros(b, lq, dtype=torch.long)
    qs[:, 10:25] = 1
    qs[:, 25:] = 2  # no query reaches image 3
    ks = torch.arange(1, 4).repeat_interleave(n_lat)[None]
    q = torch.randn(b, h, lq, d, generator=gen)
    k = torch.randn(b, h, lk, d, generator=gen)
    v = torch.randn(b, h, lk, d, generator=gen)
    k[:, :, 2 * n_lat:] = float("nan")
    v[:, :, 2 * n_lat:] = float("nan")
    q, k, v = (t.to(DEV).requires_grad_() for t in (q, k, v))
    qs, ks = qs.to(DEV), ks.to(DEV)
    out = fa.attention_triton(q, k, v, q_segment=qs, kv_segment=ks)
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (dk[:, :, 2 * n_lat:] == 0).all() and (dv[:, :, 2 * n_lat:] == 0).all()
    kc, vc = k.detach()[:, :, : 2 * n_lat], v.detach()[:, :, : 2 * n_lat]
    ref = dense_attention(q.detach(), kc, vc, q_segment=qs, kv_segment=ks[:, : 2 * n_lat])
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=1e-3)


def test_noncontiguous_inputs_and_scale():
    b, h, l, d = 1, 2, 29, 32
    gen = torch.Generator().manual_seed(5)
    # [B, L, H, D] storage viewed as [B, H, L, D], as a model's projection produces
    q = torch.randn(b, l, h, d, generator=gen).to(DEV).transpose(1, 2).requires_grad_()
    k = torch.randn(b, l, h, d, generator=gen).to(DEV).transpose(1, 2).requires_grad_()
    v = torch.randn(b, l, h, d, generator=gen).to(DEV).transpose(1, 2).requires_grad_()
    out = fa.attention_triton(q, k, v, causal=True, scale=0.3)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense_attention(q64, k64, v64, causal=True, scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=1e-3)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-4, rtol=1e-3)


def test_public_dispatch_and_errors():
    q = torch.randn(1, 2, 17, 32, device=DEV)
    k = torch.randn(1, 1, 19, 32, device=DEV)
    v = torch.randn(1, 1, 19, 32, device=DEV)
    prev = furnace_kernels.get_backend("attention")
    try:
        furnace_kernels.set_backend("attention", "triton")
        out_t = furnace_kernels.attention(q, k, v, causal=True)
        furnace_kernels.set_backend("attention", "reference")
        out_r = furnace_kernels.attention(q, k, v, causal=True)
    finally:
        furnace_kernels.set_backend("attention", prev)
    torch.testing.assert_close(out_t, out_r, atol=2e-4, rtol=1e-3)
    with pytest.raises(ValueError):
        fa.attention_triton(q, k, v, q_segment=torch.zeros(1, 17, dtype=torch.long, device=DEV))
    with pytest.raises(TypeError):
        fa.attention_triton(q, k, v, q_segment=torch.zeros(1, 17, device=DEV), kv_segment=torch.zeros(1, 19, device=DEV))


# ---------------------------------------------------------------------------------------------
# CUDA set: all dtypes, the head dims the model uses, larger and odd shapes

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_head_dims(dtype, d, causal):
    _check(2, 4, 2, 301, 301, d, dtype, causal=causal, seed=d)


@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("lq,lk", [(1000, 1000), (777, 1501), (1501, 777), (1, 513), (129, 1)])
def test_gpu_causal_odd_lengths(dtype, lq, lk):
    _check(1, 4, 1, lq, lk, 64, dtype, causal=True, seed=lq + lk)


@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_flamingo(dtype, d):
    gen = torch.Generator().manual_seed(d)
    segs = flamingo_segments(2, 1030, 5, 64, pad_imgs=1, gen=gen)
    _check(2, 8, 2, 1030, 6 * 64, d, dtype, segs=segs, seed=d)


@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
def test_gpu_packed_causal(dtype):
    segs = packed_segments(2, 1500, 5, gen=torch.Generator().manual_seed(1))
    _check(2, 4, 4, 1500, 1500, 96, dtype, causal=True, segs=segs, seed=2)


# ---------------------------------------------------------------------------------------------
# Every config the autotuner may pick, launched directly (the other CUDA tests run with
# FURNACE_ATTN_AUTOTUNE=0, one config per kernel). On CPU two small tiles check the mechanism.

if CUDA:
    FWD_CFGS, BWD_CFGS, CFG_DTYPES, CFG_D = fa._FWD_CONFIGS, fa._BWD_CONFIGS, GPU_DTYPES, 96
else:
    FWD_CFGS = BWD_CFGS = [fa._cfg(16, 16, 4, 1), fa._cfg(32, 16, 4, 1)]
    CFG_DTYPES, CFG_D = [torch.float32], 32
N_CFG = max(len(FWD_CFGS), len(BWD_CFGS))


def _cfg_id(i):
    f, b = FWD_CFGS[i % len(FWD_CFGS)], BWD_CFGS[i % len(BWD_CFGS)]
    return (f"fwd{f.kwargs['BLOCK_M']}x{f.kwargs['BLOCK_N']}w{f.num_warps}s{f.num_stages}-"
            f"bwd{b.kwargs['BLOCK_M']}x{b.kwargs['BLOCK_N']}w{b.num_warps}s{b.num_stages}")


@pytest.mark.parametrize("dtype", CFG_DTYPES, ids=[str(t).split(".")[1] for t in CFG_DTYPES])
@pytest.mark.parametrize("i", range(N_CFG), ids=[_cfg_id(i) for i in range(N_CFG)])
@pytest.mark.parametrize("mask", ["flamingo", "packed-causal"])
def test_every_config(mask, i, dtype):
    gen = torch.Generator().manual_seed(i)
    lq = 300 if CUDA else 45
    if mask == "flamingo":
        n_lat = 64 if CUDA else 8
        segs = flamingo_segments(2, lq, 4, n_lat, pad_imgs=1, gen=gen)
        lk, causal = 5 * n_lat, False
    else:
        segs = packed_segments(2, lq, 4, gen=gen)
        lk, causal = lq, True
    with fa.forced_configs(fwd=FWD_CFGS[i % len(FWD_CFGS)], bwd=BWD_CFGS[i % len(BWD_CFGS)]):
        _check(2, 4, 2, lq, lk, CFG_D, dtype, causal=causal, segs=segs, seed=i)


def test_autotune_prunes_tiles_longer_than_the_sequence():
    """A short sequence compiles only the smallest tiles; a long one keeps the whole list."""
    q = torch.empty(1, dtype=torch.float16)
    short = fa._prune(fa._FWD_CONFIGS, {"Q": q, "Q_BUCKET": 16, "K_BUCKET": 8}, BLOCK_D=32)
    assert short and all(c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] == 32 for c in short)
    assert len(fa._prune(fa._FWD_CONFIGS, {"Q": q, "Q_BUCKET": 2048, "K_BUCKET": 2048}, BLOCK_D=64)) == len(fa._FWD_CONFIGS)
    bwd = fa._prune(fa._BWD_CONFIGS, {"Q": q, "Q_BUCKET": 16, "K_BUCKET": 16}, BLOCK_D=32)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in bwd} == {(32, 32)}
    # fp32 at head dim 256 leaves at least one config, however short the sequence
    assert fa._prune(fa._BWD_CONFIGS, {"Q": torch.empty(1), "Q_BUCKET": 8, "K_BUCKET": 8}, BLOCK_D=256)


def test_a_tuned_shape_launches_without_the_autotuner(monkeypatch):
    """The first launch of a shape goes through the autotuner and caches its pick; later launches
    of that key (another length in the same power-of-two bucket included) go straight to the
    kernel with the picked config, with the same result; a new key is tuned again."""
    from triton.runtime.autotuner import Autotuner

    calls = []
    run = Autotuner.run

    def counting(self, *args, **kw):
        calls.append(self.base_fn.__name__)
        return run(self, *args, **kw)

    monkeypatch.setattr(Autotuner, "run", counting)
    monkeypatch.setattr(fa, "_picked", {})
    gen = torch.Generator().manual_seed(3)

    def step(lq, d):
        q = torch.randn(1, 2, lq, d, generator=gen).to(DEV).requires_grad_()
        k = torch.randn(1, 1, lq, d, generator=gen).to(DEV).requires_grad_()
        v = torch.randn(1, 1, lq, d, generator=gen).to(DEV).requires_grad_()
        out = fa.attention_triton(q, k, v, causal=True)
        out.backward(torch.ones_like(out))
        torch.testing.assert_close(out.double(), dense_attention(q.detach(), k.detach(), v.detach(), causal=True),
                                   atol=2e-4, rtol=1e-3)
        return out

    step(20, 32)
    assert sorted(calls) == ["_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_fwd"]
    assert {name for name, _ in fa.picked_configs()} == set(calls)
    calls.clear()
    step(20, 32)
    step(30, 32)  # same bucket (32)
    assert calls == []
    step(20, 64)  # another head dim: another key
    assert sorted(calls) == ["_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_fwd"]


def test_pinned_configs_from_the_tuner_launch_without_the_autotuner(monkeypatch, tmp_path):
    """benchmarks/tune_attention.py writes a table for this device; with FURNACE_ATTN_CONFIGS
    naming it, the tuned kernels launch with the pinned config (the autotuner never runs, nothing
    cached before), with dense attention's result; a mask the table lacks is tuned as before; an
    unreadable table is one error naming the variable."""
    import subprocess
    import sys
    import json
    from pathlib import Path

    from triton.runtime.autotuner import Autotuner

    root = Path(__file__).resolve().parent.parent
    table = tmp_path / "pinned.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"} if not CUDA else dict(os.environ)
    args = [] if not CUDA else ["--head-dims", "32", "--lengths", "256", "--repeats", "2"]
    subprocess.run([sys.executable, str(root / "benchmarks" / "tune_attention.py"), "--out", str(table), *args],
                   check=True, env=env, cwd=root, capture_output=True)
    entries = json.loads(table.read_text())["configs"][fa._device_name(torch.empty(1, device=DEV))]
    assert {e["kernel"] for e in entries} == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}
    assert {(e["causal"], e["segments"]) for e in entries} == {(True, False), (False, True)}

    calls = []
    run = Autotuner.run

    def counting(self, *a, **kw):
        calls.append(self.base_fn.__name__)
        return run(self, *a, **kw)

    monkeypatch.setattr(Autotuner, "run", counting)
    monkeypatch.setattr(fa, "_picked", {})
    monkeypatch.setenv("FURNACE_ATTN_CONFIGS", str(table))
    fa._pinned_table.cache_clear()
    gen = torch.Generator().manual_seed(5)
    d = 32
    q, k, v = (torch.randn(1, 2, 24, d, generator=gen).to(DEV).requires_grad_() for _ in range(3))
    out = fa.attention_triton(q, k, v, causal=True)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out.double(), dense_attention(q.detach(), k.detach(), v.detach(), causal=True),
                               atol=2e-4, rtol=1e-3)
    assert calls == [] and fa.picked_configs() == {}
    fa.attention_triton(q, k, v)  # no mask: not in the table
    assert calls == ["_attn_fwd"]

    table.write_text("{not json")
    fa._pinned_table.cache_clear()
    with pytest.raises(ValueError, match="FURNACE_ATTN_CONFIGS"):
        fa.attention_triton(q, k, v, causal=True)
    fa._pinned_table.cache_clear()
