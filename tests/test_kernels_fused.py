"""Fused ops (RMSNorm, add + RMSNorm, SwiGLU, in-place RoPE, chunked linear cross-entropy):
the Triton path against the PyTorch reference (outputs and every gradient through autograd),
the references against the model's own modules, the linear CE against materialised logits (one
process, and vocab-parallel over 2 gloo processes), and a compile of every kernel for sm_90.
On CPU the Triton code runs in the interpreter (fp32, fp16); bf16 only with CUDA."""
import datetime
import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not torch.cuda.is_available():  # run the Triton kernels on the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import furnace_kernels as fk
import furnace_kernels.linear_ce as lce
from furnace_kernels import backend as kb
from furnace.training.distributed import free_port

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TRITON_OK = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="no CUDA and no TRITON_INTERPRET")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, seed, scale=1.0, grad=True):
    t = (torch.randn(shape, generator=_gen(seed)) * scale).to(DEV, dtype)
    return t.requires_grad_(grad)


def _rel_err(a, b) -> float:
    """max|a - b| / max(max|b|, 1e-3): the difference relative to the tensor's scale."""
    a, b = a.detach().float(), b.detach().float()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    return err / max(b.abs().max().item() if b.numel() else 0.0, 1e-3)


def _close(a, b, tol, what):
    assert _rel_err(a, b) <= tol, f"{what}: relative max diff {_rel_err(a, b)}"


def _run(fn, inputs, seed=123):
    """Outputs of fn(*clones of inputs) and the gradients of every input that requires one, for
    a fixed random cotangent on every output."""
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = _gen(seed)
    cots = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(outs, cots)
    return [o.detach() for o in outs], [x.grad for x in xs]


def _compare(fn_tri, fn_ref, inputs, dtype, what):
    (o1, g1), (o2, g2) = _run(fn_tri, inputs), _run(fn_ref, inputs)
    for i, (a, b) in enumerate(zip(o1, o2)):
        assert a.dtype == b.dtype, f"{what} out{i}: dtype {a.dtype} != {b.dtype}"
        _close(a, b, TOL[dtype], f"{what} out{i}")
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert (a is None) == (b is None), f"{what} grad{i}: one side has no gradient"
        if a is not None:
            assert a.dtype == b.dtype
            _close(a, b, TOL[dtype], f"{what} grad{i}")
    return g1


# ---------------------------------------------------------------------------------------- norms

SHAPES = [(3, 7, 48), (33, 104), (2, 1, 5)]  # 104 = 96 + 8; 33 rows span two row blocks


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm(dtype, shape):
    x = _rand(shape, dtype, 1, scale=3.0)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=_gen(2))).to(DEV, dtype).requires_grad_()
    _compare(lambda x, w: fk.rms_norm(x, w, 1e-5, backend="triton"),
             lambda x, w: fk.rms_norm(x, w, 1e-5, backend="reference"), [x, w], dtype, "rms_norm")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_add_rms_norm(dtype, shape):
    x, r = _rand(shape, dtype, 3), _rand(shape, dtype, 4, scale=2.0)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=_gen(5))).to(DEV, dtype).requires_grad_()
    _compare(lambda x, r, w: fk.add_rms_norm(x, r, w, 1e-6, backend="triton"),
             lambda x, r, w: fk.add_rms_norm(x, r, w, 1e-6, backend="reference"), [x, r, w], dtype, "add_rms_norm")


@needs_triton
def test_norms_frozen_weight_and_mixed_dtype():
    """Frozen weight: no dweight (grad stays None); an fp32 weight over fp16 activations promotes
    the output to fp32, as `weight * x.to(dtype)` does."""
    x = _rand((5, 48), torch.float16, 6)
    w = (1 + 0.2 * torch.randn(48, generator=_gen(7))).to(DEV)  # fp32, frozen
    grads = _compare(lambda x: fk.rms_norm(x, w, 1e-6, backend="triton"),
                     lambda x: fk.rms_norm(x, w, 1e-6, backend="reference"), [x], torch.float16, "rms_norm")
    assert grads[0].dtype == torch.float16 and w.grad is None
    r = _rand((5, 48), torch.float16, 8)
    _compare(lambda x, r: fk.add_rms_norm(x, r, w, backend="triton"),
             lambda x, r: fk.add_rms_norm(x, r, w, backend="reference"), [x, r], torch.float16, "add_rms_norm")
    assert w.grad is None
    # only the residual stream's output used: the norm's branch gets no cotangent
    xx = x.detach().clone().requires_grad_()
    s, _ = fk.add_rms_norm(xx, r, w, backend="triton")
    s.sum().backward()
    assert torch.equal(xx.grad, torch.ones_like(xx))


def test_rms_norm_reference_is_the_model_module():
    from furnace.model.layers import RMSNorm

    m = RMSNorm(104, eps=1e-5).to(DEV, torch.float16)
    with torch.no_grad():
        m.weight.copy_(1 + 0.1 * torch.randn(104, generator=_gen(9)))
    x = _rand((4, 104), torch.float16, 10, grad=False)
    assert torch.equal(m(x), fk.rms_norm_reference(x, m.weight, 1e-5))


# ---------------------------------------------------------------------------------------- swiglu


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 104), (3, 5, 48), (11, 375)], ids=str)  # 4125 elements: 2 blocks
def test_swiglu(dtype, shape):
    g, u = _rand(shape, dtype, 11, scale=3.0), _rand(shape, dtype, 12)
    _compare(lambda g, u: fk.swiglu(g, u, backend="triton"), lambda g, u: fk.swiglu(g, u, backend="reference"),
             [g, u], dtype, "swiglu")


# ---------------------------------------------------------------------------------------- rope


def _cos_sin(b, l, d, dtype, offset=0):
    from furnace.model.llama import rope_cos_sin

    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    pos = (torch.arange(l) + offset)[None].expand(b, l) + torch.arange(b)[:, None]  # rows differ
    cos, sin = rope_cos_sin(inv, pos, dtype)
    return cos.to(DEV), sin.to(DEV)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,l,h,hkv,d,form", [(2, 5, 3, 1, 12, "4d"), (1, 9, 2, 2, 20, "3d"), (2, 4, 4, 2, 16, "2d")])
def test_rope_inplace(dtype, b, l, h, hkv, d, form):
    """q/k as split_heads' transposed views of a projection (GQA: fewer k heads), cos/sin as
    llama.py's rope_cos_sin [B, 1, L, D] (or [B, L, D], or [L, D] shared by the batch)."""
    from furnace.model.layers import split_heads
    from furnace.model.llama import apply_rope

    cos, sin = _cos_sin(b if form != "2d" else 1, l, d, dtype, offset=3)
    c, s = {"4d": (cos, sin), "3d": (cos[:, 0], sin[:, 0]), "2d": (cos[0, 0], sin[0, 0])}[form]
    xq, xk = _rand((b, l, h * d), dtype, 13), _rand((b, l, hkv * d), dtype, 14)

    def run(backend):
        def fn(xq, xk):
            q, k = split_heads(xq * 1, d), split_heads(xk * 1, d)  # non-leaf views, like the model's
            q2, k2 = fk.rope_(q, k, c, s, backend=backend)
            assert q2 is q and k2 is k
            return q2, k2
        return fn

    _compare(run("triton"), run("reference"), [xq, xk], dtype, "rope_")
    # the model's own apply_rope (out of place), same convention
    (q, k), _ = _run(run("triton"), [xq, xk])
    ref_q = apply_rope(split_heads(xq.detach(), d), cos, sin)
    _close(q, ref_q, TOL[dtype], "rope_ vs llama.apply_rope")


@needs_triton
def test_rope_backward_is_rotation_by_minus_sin():
    cos, sin = _cos_sin(1, 6, 8, torch.float32)
    dy = _rand((1, 2, 6, 8), torch.float32, 15, grad=False)
    q = _rand((1, 2, 6, 8), torch.float32, 16)
    k = _rand((1, 1, 6, 8), torch.float32, 17)
    q1, k1 = q * 1, k * 1
    fk.rope_(q1, k1, cos, sin, backend="triton")
    (q1 * dy).sum().backward()
    want = fk.rope_(dy.clone(), dy[:, :1].clone(), cos, -sin, backend="reference")[0]
    assert _rel_err(q.grad, want) <= 1e-6


# ---------------------------------------------------------------------------------------- linear CE

ROW_BACKENDS = (["triton"] if TRITON_OK else []) + ["reference"]


def _ce_inputs(dtype, n=29, d=24, v=(37, 5), seed=20, ignore_every=4, frozen=()):
    h = _rand((n, d), dtype, seed)
    ws = [_rand((rows, d), dtype, seed + 1 + i, scale=0.5, grad=i not in frozen) for i, rows in enumerate(v)]
    labels = torch.randint(0, sum(v), (n,), generator=_gen(seed + 9))
    labels[::ignore_every] = -100
    return h, ws, labels.to(DEV)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocks", [(37,), (37, 5)], ids=["lm", "lm+new"])
def test_linear_ce_matches_dense(backend, dtype, blocks):
    """Chunks of 8 over 29 tokens (a ragged last chunk), ignored rows, one or two weight blocks:
    loss, count, d_hidden and every d_weight equal the materialised cross-entropy's."""
    h, ws, labels = _ce_inputs(dtype, v=blocks)
    labels[3] = sum(blocks) - 1  # the last id of the last block
    labels[5] = 0

    def fused(h, *ws):
        loss, count = fk.linear_cross_entropy(h, list(ws), labels, chunk=8, backend=backend)
        assert count.item() == int((labels != -100).sum())
        return loss

    def dense(h, *ws):
        return fk.linear_cross_entropy_dense(h, list(ws), labels)[0]

    (l1,), g1 = _run(fused, [h, *ws])
    (l2,), g2 = _run(dense, [h, *ws])
    assert l1.dtype == torch.float32
    # half precision: the chunks' fp32 accumulation vs the dense path's rounded partial products
    _close(l1, l2, {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}[dtype], "loss")
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert a.dtype == b.dtype
        _close(a, b, TOL[dtype], f"grad{i}")


def test_linear_ce_is_causal_lm_loss():
    """The caller's mean, sum / count.clamp(min=1), over hidden[:, :-1] and labels[:, 1:] is
    flamingo.causal_lm_loss over the model's logits cat([h W^T, h W_new^T], -1)."""
    from furnace.model.flamingo import causal_lm_loss

    h = _rand((2, 9, 16), torch.float32, 30)
    w, w_new = _rand((23, 16), torch.float32, 31), _rand((3, 16), torch.float32, 32)
    labels = torch.randint(0, 26, (2, 9), generator=_gen(33)).to(DEV)
    labels[0, :4] = -100
    loss, count = fk.linear_cross_entropy(h[:, :-1], [w, w_new], labels[:, 1:], chunk=5)
    want = causal_lm_loss(torch.cat([h @ w.t(), h @ w_new.t()], -1), labels)
    assert count.item() == int((labels[:, 1:] != -100).sum())
    assert _rel_err(loss / count.clamp(min=1), want) <= 1e-6


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_linear_ce_fully_ignored(backend):
    h, ws, labels = _ce_inputs(torch.float32, n=6)
    labels[:] = -100
    loss, count = fk.linear_cross_entropy(h, ws, labels, chunk=4, backend=backend)
    assert count.item() == 0 and loss.item() == 0.0
    (loss / count.clamp(min=1)).backward()
    for t in [h, *ws]:
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_linear_ce_frozen_weights_get_no_gradient_work(backend, monkeypatch):
    """A frozen LM head: its grad stays None and no d_weight product is computed (only the
    d_hidden products run); the trainable new rows still get theirs."""
    h, ws, labels = _ce_inputs(torch.float32, frozen=(0,))
    calls = []
    real = lce._acc_mm
    monkeypatch.setattr(lce, "_acc_mm", lambda out, a, b: (calls.append(tuple(out.shape)), real(out, a, b)))
    (loss,), grads = _run(lambda h, *ws: fk.linear_cross_entropy(h, list(ws), labels, chunk=10, backend=backend)[0],
                          [h, *ws])
    (want,), want_grads = _run(lambda h, *ws: fk.linear_cross_entropy_dense(h, list(ws), labels)[0], [h, *ws])
    _close(loss, want, 1e-5, "loss")
    assert grads[1] is None and want_grads[1] is None
    _close(grads[0], want_grads[0], 1e-5, "d_hidden")
    _close(grads[2], want_grads[2], 1e-5, "d_new")
    chunks = 3
    assert calls.count(tuple(ws[0].shape)) == 0  # never a d_weight product for the frozen head
    assert calls.count(tuple(ws[1].shape)) == chunks and len(calls) == 3 * chunks  # dh: 2 blocks x 3 chunks
    # nothing trainable at all (evaluation): no gradient bookkeeping, same loss
    with torch.no_grad():
        loss_ng, _ = fk.linear_cross_entropy(h, ws, labels, chunk=10, backend=backend)
    _close(loss_ng, want, 1e-5, "no_grad loss")


def test_linear_ce_never_materialises_the_logits(monkeypatch):
    """Every logits product the op makes has at most `chunk` rows."""
    h, ws, labels = _ce_inputs(torch.float32, n=40)
    shapes = []
    real = lce.F.linear

    class Spy:
        @staticmethod
        def linear(x, w):
            out = real(x, w)
            shapes.append(tuple(out.shape))
            return out

    monkeypatch.setattr(lce, "F", Spy)
    loss, _ = fk.linear_cross_entropy(h, ws, labels, chunk=7)
    loss.backward()
    assert shapes and max(s[0] for s in shapes) <= 7
    assert lce.default_chunk(100_000, 128_256) * 128_256 <= 1 << 26


def test_new_ops_are_registered():
    for op in ("rms_norm", "add_rms_norm", "swiglu", "rope", "linear_cross_entropy"):
        assert kb.get_backend(op) == "auto"
        assert kb.use_triton(op, torch.zeros(1)) is False  # a CPU tensor: the reference
        if TRITON_OK:
            assert kb.triton_error(op) is None
            assert kb.use_triton(op, torch.zeros(1), "triton") is True


# ------------------------------------------------------------------------ vocab parallel (2 ranks)

VP_D, VP_V, VP_NEW, VP_N = 16, 41, 4, 13


def _vp_case(seed):
    g = _gen(seed)
    h = torch.randn(VP_N, VP_D, generator=g)
    w = torch.randn(VP_V, VP_D, generator=g) * 0.5
    w_new = torch.randn(VP_NEW, VP_D, generator=g) * 0.5
    labels = torch.randint(0, VP_V + VP_NEW, (VP_N,), generator=g)
    labels[::3] = -100
    labels[1], labels[2] = VP_V - 1, VP_V  # last base id (rank 1's), first new id
    return h, w, w_new, labels


def _vp_checks(rank, world):
    # CPU tensors (gloo): Triton reaches them only through the interpreter
    for backend in ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []):
        for split, with_new, ignore_all in ((21, True, False), (21, False, False), (VP_V, True, False),
                                            (21, True, True)):
            h, w, w_new, labels = _vp_case(seed=split + with_new)
            if ignore_all:
                labels[:] = -100
            if not with_new:
                labels = labels.masked_fill(labels >= VP_V, -100)
            # the unsplit loss in this process
            full = [w, w_new] if with_new else [w]
            ref_in = [t.clone().requires_grad_() for t in [h, *full]]
            want, want_count = fk.linear_cross_entropy_dense(ref_in[0], ref_in[1:], labels)
            want.backward()
            # this rank's contiguous slice (rank 1 holds nothing when split == VP_V)
            lo, hi = (0, split) if rank == 0 else (split, VP_V)
            mine = [t.clone().requires_grad_() for t in [h, w[lo:hi]] + ([w_new] if with_new else [])]
            loss, count = fk.linear_cross_entropy(
                mine[0], mine[1:], labels, chunk=5, group=dist.group.WORLD,
                vocab_start=[lo, VP_V] if with_new else lo, replicated=[False, True] if with_new else None,
                backend=backend)
            loss.backward()
            what = f"{backend} split={split} new={with_new} ignore_all={ignore_all} rank={rank}"
            assert count.item() == want_count.item(), what
            _close(loss, want, 1e-5, f"loss {what}")
            _close(mine[0].grad, ref_in[0].grad, 1e-5, f"d_hidden {what}")
            _close(mine[1].grad, ref_in[1].grad[lo:hi], 1e-5, f"d_weight slice {what}")
            if with_new:
                _close(mine[2].grad, ref_in[2].grad, 1e-5, f"d_new {what}")


def _vp_entry(rank, world, port, errq):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # bounded: a check failing on one rank must not leave the other in a collective forever
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        _vp_checks(rank, world)
    except BaseException:
        errq.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
def test_linear_ce_vocab_parallel_two_ranks():
    """2 gloo processes, each with its slice of a 41-row head (21 + 20, or 41 + 0) and the
    replicated new-token rows: loss and d_hidden equal the one-process values on both ranks,
    d_weight is the rank's rows of the full gradient; also with no new rows and with every
    label ignored."""
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    mp.spawn(_vp_entry, args=(2, free_port(), errq), nprocs=2, join=True)
    errors = []
    while not errq.empty():
        errors.append("rank {} failed:\n{}".format(*errq.get()))
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------------------- benchmark


def test_benchmark_fused_rows(tmp_path):
    """benchmarks/kernels.py --only fused runs (toy sizes under the interpreter on CPU) and
    records every op without an error."""
    import json

    from train_utils import ROOT, env

    out = tmp_path / "fused.json"
    r = subprocess.run([sys.executable, "benchmarks/kernels.py", "--quick", "--only", "fused", "--out", str(out)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["fused"]
    assert [row["op"] for row in rows] == ["rms_norm", "add_rms_norm", "swiglu", "rope_", "linear_cross_entropy"]
    for row in rows:
        for res in row["results"]:
            assert "error" not in res, res
            assert res["ms"]["fwd"] > 0 and res["ms"]["fwd+bwd"] > 0
        assert max(row["furnace_rel_err_vs_fp32"]) < 1e-4, row

