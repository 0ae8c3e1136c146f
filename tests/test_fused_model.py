"""model.fused_kernels: the model with the fused kernels (RMSNorm, add + RMSNorm, SwiGLU, RoPE,
linear cross-entropy) gives the loss and every parameter gradient of the plain model, through
the Triton kernels (the CPU interpreter here) and through their references; LoRA adapters on
the fused MLP still train; tensor parallelism's vocab-parallel fused loss gives the 1-rank
loss curve (real processes)."""
import pytest
import torch

import furnace_kernels as fk
from furnace.config import FUSED_OPS, ConfigError, load_config, validate
from furnace.model.flamingo import build_flamingo
from furnace.model.fused import fused_ops
from furnace.tokens import IGNORE_INDEX

from train_utils import metrics, run, set_keys, train_cmd

V, IMG, EOC = 40, 38, 39  # the LM's 36 rows + 4 new-token rows (<image>, <|endofchunk|> among them)


def tiny_cfg(fused: str, **over):
    cfg = load_config("demo").model
    lm = cfg.lm
    lm.num_layers, lm.hidden_size, lm.intermediate_size, lm.num_heads, lm.num_kv_heads = 2, 32, 48, 4, 2
    lm.vocab_size = 36
    cfg.vision.num_layers, cfg.vision.hidden_size, cfg.vision.intermediate_size, cfg.vision.num_heads = 1, 16, 32, 2
    cfg.vision.image_size, cfg.vision.patch_size = 16, 4
    cfg.perceiver.num_latents, cfg.perceiver.depth, cfg.perceiver.heads, cfg.perceiver.dim_head = 4, 1, 2, 8
    # IDEFICS' block: its RMSNorm and SwiGLU feed-forward take the fused paths too
    cfg.xattn.every, cfg.xattn.heads, cfg.xattn.dim_head, cfg.xattn.gate_init = 1, 2, 8, 0.5
    cfg.xattn.norm, cfg.xattn.ff, cfg.xattn.ff_hidden = "rmsnorm", "swiglu", 48
    cfg.freeze_lm, cfg.freeze_vision = False, True  # the tower runs none of the fused ops
    cfg.fused_kernels = fused
    return set_keys(cfg, over)


def build(fused: str, **over):
    torch.manual_seed(0)
    return build_flamingo(tiny_cfg(fused, **over), vocab_size=V, image_token_id=IMG, eoc_token_id=EOC)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 36, (2, 12), generator=g)
    ids[:, 0], ids[0, 6], ids[1, 3] = IMG, EOC, 37  # a new token both as input and as a target
    ids[1, 9] = IMG
    labels = ids.clone()
    labels[0, :2] = IGNORE_INDEX
    valid = torch.tensor([[True, False], [True, True]])
    images = torch.randn(2, 2, 1, 3, 16, 16, generator=g)
    return {"input_ids": ids, "labels": labels, "images": images, "media_valid": valid}


@pytest.fixture
def fused_backend():
    """Choose the fused ops' implementation for one test; the previous choice afterwards."""
    before = {op: fk.get_backend(op) for op in FUSED_OPS}

    def use(name):
        for op in FUSED_OPS:
            fk.set_backend(op, name)
    yield use
    for op, name in before.items():
        fk.set_backend(op, name)


def loss_and_grads(model, b):
    loss = model(b)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same(ref, got, loss_tol, tol):
    (loss_a, grads_a), (loss_b, grads_b) = ref, got
    assert abs(loss_a - loss_b) <= loss_tol * abs(loss_a), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for n, ga in grads_a.items():
        gb = grads_b[n]
        assert gb is not None and ga is not None, n
        scale = ga.abs().max().clamp(min=1e-12)
        assert (ga - gb).abs().max() <= tol * scale, (n, float((ga - gb).abs().max() / scale))


# (backend, ops, loss tolerance, gradient tolerance). Without the linear CE the references are
# the model's own code: the same numbers. The fused CE sums its fp32 gradient in another order,
# and the attention q/k projections' small gradients (cancellations through the softmax) carry
# that rounding at ~1e-5 of their size; the loss itself agrees to the last bits.
# Last: with activation checkpointing, rope's in-place rotation recomputed in the backward.
CASES = [("reference", "rms_norm,add_rms_norm,swiglu,rope", 1e-6, 1e-6, False),
         ("reference", "all", 1e-6, 3e-5, False),
         ("triton", "all", 1e-6, 5e-5, False),
         ("triton", "all", 1e-6, 5e-5, True)]


@pytest.mark.parametrize("backend,ops,loss_tol,grad_tol,checkpointed", CASES)
def test_fused_model_gives_the_plain_loss_and_gradients(backend, ops, loss_tol, grad_tol, checkpointed,
                                                        fused_backend):
    fused_backend(backend)
    b = batch()
    plain, fused = build("none"), build(ops, activation_checkpointing=checkpointed)
    assert fused.new_tokens is not None and (fused.head_loss is not None) == (ops == "all")
    ref = loss_and_grads(plain, b)
    got = loss_and_grads(fused, b)
    assert_same(ref, got, loss_tol, grad_tol)
    with torch.no_grad():  # logits() keeps the head: the same logits
        torch.testing.assert_close(fused.logits(b), plain.logits(b), rtol=1e-5, atol=1e-6)


def test_lora_adapters_train_through_the_fused_mlp(fused_backend):
    fused_backend("triton")
    over = {"freeze_lm": True, "lora.rank": 4, "lora.targets": ["q", "k", "gate", "up", "down"]}
    b = batch()
    plain, fused = build("none", **over), build("swiglu,rope,rms_norm", **over)
    for m in (plain, fused):  # lora_B starts at zero: open it so the adapters change the loss
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("lora_B.weight"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    assert fused.head_loss is None
    ref, got = loss_and_grads(plain, b), loss_and_grads(fused, b)
    assert any("lora_A" in n for n in got[1])
    assert_same(ref, got, 1e-6, 5e-5)


def test_fused_kernels_value_parses_and_bad_values_fail_in_one_line():
    assert fused_ops("none") == frozenset() and fused_ops("all") == frozenset(FUSED_OPS)
    assert fused_ops(" rope, swiglu") == {"rope", "swiglu"}
    cfg = load_config("demo")
    cfg.model.fused_kernels = "rms_norm,layernorm"
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1, check_paths=False)
    msg = str(e.value)
    assert "\n" not in msg and "model.fused_kernels" in msg and "--set model.fused_kernels=" in msg


@pytest.mark.multirank
def test_parallel_fused_loss_gives_the_single_process_curve(data, tmp_path):
    """Every fused op under TP 2 (ZeRO-3 gathers the heads' weights for the fused loss; the
    vocab-parallel linear CE over 13 rows a rank, one of them padding, plus the replicated
    new-token rows) and under PP 2 (the last stage's loss from the hidden states), against one
    process without them."""
    common = ["train.max_steps=3", "train.lr_decay_steps=3", "model.xattn.gate_init=0.1",
              "model.lm.vocab_size=25"]  # the demo tokenizer's 27 tokens: 2 new-token rows
    layouts = {"ref": (1, ()), "tp2": (2, ("parallel.tp=2", "model.fused_kernels=all")),
               "pp2": (2, ("parallel.pp=2", "parallel.zero_stage=1", "model.fused_kernels=all"))}
    curves = {}
    for name, (nproc, extra) in layouts.items():
        res = run(train_cmd(tmp_path / name, data, *common, *extra, nproc=nproc))
        assert res.returncode == 0, res.stderr[-4000:]
        curves[name] = [m["loss"] for m in metrics(tmp_path / name) if "loss" in m]
    ref = curves.pop("ref")
    assert len(ref) == 3
    for name, got in curves.items():
        assert len(got) == 3 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref, got)), (name, ref, got)
