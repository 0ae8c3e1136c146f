"""Fused loss scaling: grad_stats / apply_ against torch, DynamicLossScaler against DeepSpeed's,
and the ZeRO-3 hook against DeepSpeed's built-in path on a real 1-rank (gloo, CPU) engine."""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels on the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import furnace_kernels.loss_scale as ls
from furnace_kernels import DynamicLossScaler, apply_, grad_stats
from furnace.parallel.zero3 import install_fused_loss_scaling

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TRITON_OK = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = (["triton"] if TRITON_OK else []) + ["reference"]


def _tensors(dtype_mix, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 7, 1023, 1025, 4099, 3, 2500]
    out = []
    for i, n in enumerate(sizes):
        dt = dtype_mix[i % len(dtype_mix)]
        out.append((torch.randn(n, generator=g) * 3).to(DEV, dt))
    # a view at an odd offset inside a bigger buffer (ZeRO partitions are such views)
    buf = torch.randn(5000, generator=g).to(DEV, dtype_mix[0])
    out.append(buf[3:3003])
    return out, buf


def _ref(tensors, inv_scale):
    sumsq = sum(((t.double() * inv_scale) ** 2).sum() for t in tensors)
    nonfinite = any(bool((~torch.isfinite(t)).any()) for t in tensors)
    return float(sumsq), nonfinite


MIXES = {"fp32": [torch.float32], "fp16": [torch.float16], "mixed": [torch.float16, torch.float32]}
if CUDA:
    MIXES["bf16-mixed"] = [torch.bfloat16, torch.float32, torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", list(MIXES))
def test_grad_stats_clean(backend, mix):
    ts, _ = _tensors(MIXES[mix], seed=len(mix))
    inv = 1.0 / 1024.0
    sumsq, nf = grad_stats(ts, inv, backend=backend)
    want, want_nf = _ref(ts, inv)
    assert sumsq.dtype == torch.float32 and sumsq.dim() == 0
    assert nf.dtype == torch.bool and nf.dim() == 0
    assert not bool(nf) and not want_nf
    assert abs(float(sumsq) - want) <= 1e-5 * want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plant", ["inf", "-inf", "nan", "huge"])
def test_grad_stats_planted(backend, plant):
    ts, _ = _tensors([torch.float16, torch.float32], seed=7)
    rng = random.Random(plant)
    which = rng.randrange(len(ts))
    where = rng.randrange(ts[which].numel())
    if plant == "huge":
        which = 3  # an fp32 tensor: finite, but its square overflows fp32
        assert ts[which].dtype == torch.float32
        ts[which][where % ts[which].numel()] = 1e30
    else:
        ts[which][where] = float(plant)
    sumsq, nf = grad_stats(ts, 0.5, backend=backend)
    want, want_nf = _ref(ts, 0.5)
    assert bool(nf) == want_nf == (plant != "huge")
    # torch's own norm over the same tensors agrees on finiteness
    torch_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float() * 0.5) for t in ts]))
    assert bool(torch.isfinite(sumsq)) == bool(torch.isfinite(torch_norm)) == False  # noqa: E712
    if plant == "nan":
        assert torch.isnan(sumsq)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_stats_empty_and_none(backend):
    ts = [torch.zeros(0, device=DEV), None, torch.ones(5, device=DEV)]
    sumsq, nf = grad_stats(ts, 2.0, backend=backend)
    assert float(sumsq) == 20.0 and not bool(nf)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factor_kind", ["float", "tensor"])
def test_apply_scales_in_place_once(backend, factor_kind):
    ts, buf = _tensors([torch.float32, torch.float16], seed=3)
    before_buf = buf.clone()
    before = [t.clone() for t in ts]
    f = 0.37
    apply_(ts, f if factor_kind == "float" else torch.tensor(f, device=DEV), backend=backend)
    for a, b in zip(before, ts):
        want = (a.float() * f).to(a.dtype)
        torch.testing.assert_close(b, want, atol=1e-3 if a.dtype == torch.float16 else 1e-6, rtol=1e-3)
    # the view covers buf[3:3003]; the rest of the buffer is untouched
    assert torch.equal(buf[:3], before_buf[:3]) and torch.equal(buf[3003:], before_buf[3003:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_clip_matches_torch(backend):
    ts, _ = _tensors([torch.float32], seed=9)
    scale, max_norm = 256.0, 5.0
    ref = [t.clone() for t in ts]
    params = [torch.nn.Parameter(torch.empty_like(t)) for t in ref]
    for p, t in zip(params, ref):
        p.grad = t / scale
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler = DynamicLossScaler(scale, hysteresis=1)
    skip, norm = ls.unscale_clip_(ts, scaler, max_norm, backend=backend)
    assert not skip and abs(norm - float(total)) <= 1e-4 * float(total)
    for p, t in zip(params, ts):
        torch.testing.assert_close(t, p.grad, atol=1e-6, rtol=1e-4)  # torch adds 1e-6 like DeepSpeed
    ts[2][0] = float("inf")
    before = [t.clone() for t in ts]
    skip, norm = ls.unscale_clip_(ts, scaler, max_norm, backend=backend)
    assert skip and norm == float("inf") and scaler.cur_scale == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, ts) if torch.isfinite(a).all())


# ---------------------------------------------------------------------------------------------
# DynamicLossScaler vs deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler


class _Rank0:
    @staticmethod
    def get_rank():
        return 0


SCALER_CONFIGS = [
    dict(hysteresis=1, window=3, consecutive=False),
    dict(hysteresis=2, window=3, consecutive=False),
    dict(hysteresis=3, window=2, consecutive=True),
    dict(hysteresis=2, window=1, consecutive=False),
]


@pytest.mark.parametrize("cfg", SCALER_CONFIGS, ids=lambda c: "h{hysteresis}-w{window}-c{consecutive:d}".format(**c))
def test_scaler_matches_deepspeed(cfg, monkeypatch):
    import deepspeed.runtime.fp16.loss_scaler as dsls

    monkeypatch.setattr(dsls, "dist", _Rank0)  # its log lines ask for the rank
    ds = dsls.DynamicLossScaler(init_scale=2.0**10, scale_window=cfg["window"], min_scale=4.0,
                                delayed_shift=cfg["hysteresis"], consecutive_hysteresis=cfg["consecutive"],
                                raise_error_at_min_scale=False)
    ours = DynamicLossScaler(2.0**10, growth_interval=cfg["window"], min_scale=4.0, hysteresis=cfg["hysteresis"],
                             consecutive_hysteresis=cfg["consecutive"], raise_error_at_min_scale=False)
    rng = random.Random(str(cfg))
    script = [True, False, True, True, False, False, False, False, True, True, True, True, True, True, True,
              False, False, False, False, False, False, False, True, False, True, False]
    script += [rng.random() < 0.3 for _ in range(200)]
    for step, overflow in enumerate(script):
        skipped = ours.update_scale(overflow)
        ds.update_scale(overflow)
        assert skipped == overflow
        assert (ours.cur_scale, ours.cur_hysteresis, ours.last_overflow_iter, ours.cur_iter) == (
            ds.cur_scale, ds.cur_hysteresis, ds.last_overflow_iter, ds.cur_iter), f"step {step}"
    assert ours.cur_scale == 4.0 or any(not o for o in script)


def test_scaler_min_scale_raises_like_deepspeed():
    s = DynamicLossScaler(4.0, hysteresis=1, min_scale=2.0)
    s.update_scale(True)
    assert s.cur_scale == 2.0
    with pytest.raises(RuntimeError):
        s.update_scale(True)


# ---------------------------------------------------------------------------------------------
# ZeRO-3 hook on a real DeepSpeed engine (1 rank, gloo, CPU). DeepSpeed's CPU accelerator only
# reports fp16 support when oneDNN has fp16; the engine otherwise works in fp16 on CPU, so the
# test lifts that sanity check to exercise the real fp16 ZeRO-3 path (DynamicLossScaler).


@pytest.fixture(scope="module")
def in_process_rank():
    """A 1-rank process group inside the pytest process for this module's engine tests (DeepSpeed
    does not re-initialise cleanly, so once per module). The environment, the group,
    DeepSpeed's comm backend and the fp16 patch are undone afterwards: later tests launch their
    own ranks and must not inherit RANK/WORLD_SIZE or a live group."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.accelerator import get_accelerator

    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    ds_comm.cdb = None
    get_accelerator().__dict__.pop("is_fp16_supported", None)
    os.environ.clear()
    os.environ.update(saved)


def _dist_env():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def _run_engine(fused, precision, inject, steps, clip=1.0, plant=(), rank=0):
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _dist_env()
    acc = get_accelerator()
    if precision == "fp16" and not acc.is_fp16_supported():
        acc.is_fp16_supported = lambda: True
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 33), torch.nn.Tanh(),
                                torch.nn.Linear(33, 1))
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 6, "loss_scale_window": 3, "hysteresis": 2,
                       "min_loss_scale": 1}
    elif precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    from furnace.training.distributed import skip_inference_shm_op

    skip_inference_shm_op()  # no 80 s C++ build of an op only DeepSpeed's inference uses
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    if fused:
        # the engine is a CPU one (gloo): Triton reaches CPU tensors only through the interpreter;
        # on a CUDA host benchmarks/kernels.py runs the hook on a CUDA engine
        install_fused_loss_scaling(engine, backend="triton" if ls.INTERPRET else "reference")
        assert isinstance(opt.loss_scaler, DynamicLossScaler) == (precision == "fp16")
    dtype = next(engine.parameters()).dtype
    g = torch.Generator().manual_seed(1 + rank)
    losses, scales, skips, norms = [], [], [], []
    for step in range(steps):
        x = torch.randn(4, 16, generator=g)
        y = torch.randn(4, 1, generator=g)
        out = engine(x.to(dtype)).float()
        loss = (out - y).pow(2).mean()
        bad = inject.get(step)
        if bad is not None:
            loss = loss * bad  # inf -> inf/nan gradients; nan -> nan gradients
        losses.append(float(loss))
        scales.append(float(opt.loss_scale))
        engine.backward(loss)
        if step in plant and rank == 0:
            # a non-finite value in rank 0's own gradient partition only: the other ranks learn
            # about it through the all-reduce alone
            opt.averaged_gradients[0][0].view(-1)[0] = plant[step]
        engine.step()
        skips.append(bool(opt.overflow))
        norms.append(float(opt._global_grad_norm) if not opt.overflow else None)
    # full parameters (each rank's ds_tensor also holds uninitialised padding)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = [p.detach().float().clone() for p in engine.module.parameters()]
    engine.destroy() if hasattr(engine, "destroy") else None
    return losses, scales, skips, norms, params


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_zero3_hook_matches_deepspeed(precision, in_process_rank):
    inject = {2: float("inf"), 3: float("nan"), 7: float("inf"), 8: float("inf"), 9: float("inf")} \
        if precision == "fp16" else {4: float("nan")}
    steps = 14 if precision == "fp16" else 8
    base = _run_engine(False, precision, inject, steps)
    fused = _run_engine(True, precision, inject, steps)
    b_loss, b_scale, b_skip, b_norm, b_params = base
    f_loss, f_scale, f_skip, f_norm, f_params = fused
    assert f_skip == b_skip, (f_skip, b_skip)
    assert all(b_skip[s] for s in inject)
    assert f_scale == b_scale
    if precision == "fp16":
        assert len(set(b_scale)) > 2  # the scale both shrank and grew during the run
    for a, b in zip(f_loss, b_loss):
        if b == b and abs(b) != float("inf"):
            assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (f_loss, b_loss)
    for a, b in zip(f_norm, b_norm):
        assert (a is None) == (b is None)
        if a is not None:
            assert abs(a - b) <= 1e-3 * max(1.0, b)
    for a, b in zip(f_params, b_params):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# Two ranks (gloo): each rank runs the built-in and the fused path; a NaN/inf is planted in rank
# 0's gradient partition only, so the skip decision on rank 1 depends on the all-reduce.

_PLANT = {1: float("nan"), 4: float("inf"), 5: float("-inf")}


def _two_rank_worker(out_path):
    import json

    import deepspeed.comm as dist

    rank = int(os.environ["RANK"])
    steps = 9
    base = _run_engine(False, "fp16", {}, steps, plant=_PLANT, rank=rank)
    fused = _run_engine(True, "fp16", {}, steps, plant=_PLANT, rank=rank)
    with open(out_path, "w") as f:
        json.dump({"base": base[:4], "fused": fused[:4],
                   "params_close": all(torch.allclose(a, b, atol=2e-3, rtol=1e-2) for a, b in zip(base[4], fused[4])),
                   "param_diffs": [float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(base[4], fused[4])],
                   "param_shapes": [list(a.shape) + list(b.shape) for a, b in zip(base[4], fused[4])]}, f)
    dist.barrier()


def test_zero3_hook_two_ranks(tmp_path):
    import json
    import subprocess
    import sys

    port = str(29500 + os.getpid() % 400 + 17)
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0"),
                   PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-c",
                                       "import sys, test_kernels_loss_scale as t; t._two_rank_worker(sys.argv[1])",
                                       str(tmp_path / f"rank{rank}.json")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        logs.append(out.decode(errors="replace")[-3000:])
    assert all(p.returncode == 0 for p in procs), "\n\n".join(logs)
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r in res:
        b_loss, b_scale, b_skip, b_norm = r["base"]
        f_loss, f_scale, f_skip, f_norm = r["fused"]
        assert f_skip == b_skip and [b_skip[s] for s in _PLANT] == [True] * len(_PLANT)
        assert f_scale == b_scale
        for a, b in zip(f_loss, b_loss):
            assert abs(a - b) <= 1e-3 * max(1.0, abs(b))
        for a, b in zip(f_norm, b_norm):
            assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-3 * max(1.0, b))
        assert r["params_close"], (r["param_diffs"], r["param_shapes"])
    assert res[0]["base"][2] == res[1]["base"][2]  # both ranks skipped the same steps
