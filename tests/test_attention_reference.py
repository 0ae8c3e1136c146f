"""The reference attention path (CPU) against an independent per-query loop in float64."""
import math

import pytest
import torch

from furnace_kernels import attention, attention_reference, set_backend


def loop_reference(q, k, v, causal, qs, ks):
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    out = torch.zeros(b, h, lq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // hk)
            for i in range(lq):
                vis = [j for j in range(lk) if (not causal or j <= i + lk - lq)
                       and (qs is None or qs[bi, i] == ks[bi, j])]
                if not vis:
                    continue
                s = torch.stack([q[bi, hi, i].double() @ k[bi, kv, j].double() for j in vis]) / math.sqrt(d)
                p = torch.softmax(s, 0)
                out[bi, hi, i] = sum(p[n] * v[bi, kv, j].double() for n, j in enumerate(vis))
    return out


@pytest.mark.parametrize("causal,lq,lk,segments,hk", [
    (True, 7, 7, False, 2), (True, 3, 9, False, 1), (False, 5, 6, True, 2), (True, 8, 8, True, 4),
])
def test_reference_matches_loop(causal, lq, lk, segments, hk):
    q = torch.randn(2, 4, lq, 8, dtype=torch.float64)
    k = torch.randn(2, hk, lk, 8, dtype=torch.float64)
    v = torch.randn(2, hk, lk, 8, dtype=torch.float64)
    qs = ks = None
    if segments:
        qs = torch.randint(0, 3, (2, lq))
        ks = torch.randint(1, 3, (2, lk))
    out = attention_reference(q, k, v, causal=causal, q_segment=qs, kv_segment=ks)
    assert torch.allclose(out, loop_reference(q, k, v, causal, qs, ks), atol=1e-10)


def test_rows_that_see_nothing_are_exact_zero_with_zero_grad():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    k = torch.randn(1, 2, 3, 8, requires_grad=True)
    v = torch.randn(1, 2, 3, 8, requires_grad=True)
    qs = torch.tensor([[0, 1, 0, 2]])  # queries 0 and 2 match no key
    ks = torch.tensor([[1, 1, 2]])
    out = attention(q, k, v, q_segment=qs, kv_segment=ks)
    assert torch.all(out[:, :, [0, 2]] == 0)
    out.square().sum().backward()
    assert torch.all(q.grad[:, :, [0, 2]] == 0)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_bad_shapes_and_backend_names_are_refused():
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="must divide"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="both q_segment and kv_segment"):
        attention(q, q, q, q_segment=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="backend"):
        set_backend("attention", "cuda-magic")
    from furnace_kernels.backend import get_backend, use_triton

    for call in (lambda: set_backend("atention", "auto"), lambda: get_backend("atention"),
                 lambda: use_triton("atention", q)):
        with pytest.raises(ValueError, match="unknown kernel op 'atention'; ops: attention, loss_scale"):
            call()


def test_triton_backend_refused_with_the_import_error_when_triton_is_unusable(monkeypatch):
    import furnace_kernels.backend as backend

    monkeypatch.setattr(backend, "triton_error", lambda op: "ImportError: No module named 'triton'")
    with pytest.raises(RuntimeError, match="attention backend 'triton' needs Triton.*No module named 'triton'"):
        set_backend("attention", "triton")
    assert backend.get_backend("attention") == "auto"  # nothing changed
    # auto never needs Triton off CUDA; on CUDA it warns and runs the reference
    q = torch.randn(1, 2, 5, 8)
    assert not backend.use_triton("attention", q)
    cuda_like = type("T", (), {"is_cuda": True})()
    with pytest.warns(UserWarning, match="runs the PyTorch reference"):
        assert not backend.use_triton("attention", cuda_like)
