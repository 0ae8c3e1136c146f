"""Megatron mappings, parallel layers and vocab-parallel CE against their unsharded versions, in
2 real gloo processes; and a whole tensor-parallel FlamingoModel against the plain one."""
import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from furnace.training.distributed import free_port

pytestmark = pytest.mark.multirank

TP = 2


def _entry(rank, world, port, fns, errq):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # A bounded wait: a check that fails on one rank must not leave the other in a collective forever.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for fn in fns:  # one group of processes runs every check (process start-up dominates)
            try:
                fn(rank, world)
            except BaseException:
                errq.put((fn.__name__, rank, traceback.format_exc()))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fns, world=TP) -> dict:
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    mp.spawn(_entry, args=(world, free_port(), fns, errq), nprocs=world, join=True)
    errors = {}
    while not errq.empty():
        name, rank, tb = errq.get()
        errors.setdefault(name, f"rank {rank} failed:\n{tb}")
    return errors


@pytest.fixture(scope="module")
def failures():
    return spawn([_layers, _ce, _model, _packed_pipeline, _zero3_decoding])


def check(failures, fn):
    if fn.__name__ in failures:
        pytest.fail(failures[fn.__name__])


def _close(a, b, tol=1e-5, what=""):
    assert torch.allclose(a, b, rtol=tol, atol=tol), f"{what}: max diff {(a - b).abs().max().item()}"


# ---------------------------------------------------------------- mappings and layers

def _layers(rank, world):
    from furnace.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                         copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp)

    g = dist.group.WORLD
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)

    # mapping pairs: forward and backward are each other's transpose
    xi = x.clone().requires_grad_()
    y = gather_from_tp(scatter_to_tp(xi, g), g)
    _close(y, x, what="scatter->gather")
    y.backward(torch.ones_like(y))
    _close(xi.grad, torch.ones_like(x), what="scatter->gather backward")
    xi = (x * (rank + 1)).requires_grad_()
    r = reduce_from_tp(xi, g)
    _close(r, x * sum(range(1, world + 1)), what="reduce")
    c = copy_to_tp(xi, g)
    (c * (rank + 1)).sum().backward()  # each rank's gradient differs: copy's backward sums them
    _close(xi.grad, torch.full_like(x, sum(range(1, world + 1))), what="copy backward")
    xi.grad = None
    (reduce_from_tp(xi, g) * (rank + 1)).sum().backward()  # reduce's backward is the identity
    _close(xi.grad, torch.full_like(x, rank + 1), what="reduce backward")

    # column -> row pair equals the dense MLP, gradients included
    fc1, fc2 = nn.Linear(8, 12, bias=True), nn.Linear(12, 8, bias=True)
    col, row = ColumnParallelLinear.from_linear(fc1, g), RowParallelLinear.from_linear(fc2, g)
    xr = x.clone().requires_grad_()
    xp = x.clone().requires_grad_()
    ref = fc2(F.gelu(fc1(xr)))
    out = row(F.gelu(col(xp)))
    _close(out, ref, what="column->row forward")
    ref.square().sum().backward()
    out.square().sum().backward()
    _close(xp.grad, xr.grad, what="input grad")
    _close(col.weight.grad, fc1.weight.grad.chunk(world, 0)[rank], what="column weight grad")
    _close(col.bias.grad, fc1.bias.grad.chunk(world, 0)[rank], what="column bias grad")
    _close(row.weight.grad, fc2.weight.grad.chunk(world, 1)[rank], what="row weight grad")
    _close(row.bias.grad, fc2.bias.grad, what="row bias grad")
    assert col.weight.tensor_model_parallel and row.weight.tensor_model_parallel
    assert not getattr(row.bias, "tensor_model_parallel", False)

    # gather_output / scattered input variants
    colg = ColumnParallelLinear.from_linear(fc1, g, gather_output=True)
    _close(colg(x), fc1(x), what="gather_output")
    rows = RowParallelLinear.from_linear(fc2, g, input_is_parallel=False)
    h = torch.randn(3, 5, 12)
    _close(rows(h), fc2(h), what="row with scatter")

    # vocab-parallel embedding, vocabulary not divisible by tp (padding rows)
    emb = nn.Embedding(11, 6)
    vp = VocabParallelEmbedding.from_embedding(emb, g)
    ids = torch.randint(0, 11, (4, 7))
    e_ref = emb(ids)
    e = vp(ids)
    _close(e, e_ref, what="embedding")
    e.square().sum().backward()
    e_ref.square().sum().backward()
    n = vp.end - vp.start
    _close(vp.weight.grad[:n], emb.weight.grad[vp.start:vp.end], what="embedding grad")
    assert vp.weight.grad[n:].abs().sum() == 0


def test_mappings_and_layers_match_dense(failures):
    check(failures, _layers)


def _ce(rank, world):
    from furnace.parallel.tensor import VocabParallelLMLoss, vocab_range

    g = dist.group.WORLD
    torch.manual_seed(1)
    for base, new in ((11, 0), (10, 3), (7, 2)):
        logits = torch.randn(2, 9, base + new) * 3
        labels = torch.randint(0, base + new, (2, 9))
        labels[0, :3] = -100
        labels[1, -2:] = base + new - 1  # a new-token target when there are new tokens
        ref_in = logits.clone().requires_grad_()
        from furnace.model.flamingo import causal_lm_loss

        ref = causal_lm_loss(ref_in, labels)
        ref.backward()
        start, end, per = vocab_range(base, rank, world)
        local = torch.zeros(2, 9, per)
        local[..., : end - start] = logits[..., start:end]
        local[..., end - start:] = 1e4  # padding columns must be ignored whatever they hold
        inp = torch.cat([local, logits[..., base:]], dim=-1).requires_grad_()
        loss = VocabParallelLMLoss(base, new, g)(inp, labels)
        _close(loss, ref, tol=1e-6, what=f"CE {base}+{new}")
        loss.backward()
        _close(inp.grad[..., : end - start], ref_in.grad[..., start:end], tol=1e-6, what="CE grad (base)")
        assert inp.grad[..., end - start: per].abs().sum() == 0
        if new:
            _close(inp.grad[..., per:], ref_in.grad[..., base:], tol=1e-6, what="CE grad (new)")


def test_vocab_parallel_cross_entropy_matches_dense(failures):
    check(failures, _ce)


# ---------------------------------------------------------------- the whole model

def _model(rank, world):
    import copy

    from furnace.config import load_config
    from furnace.model.flamingo import build_flamingo
    from furnace.parallel.apply import parallelize, tp_shard
    from furnace.parallel.topology import Topology

    V, IMG, EOC = 61, 59, 60
    cfg = load_config("demo").model
    cfg.lm.num_layers, cfg.xattn.every, cfg.lm.hidden_size, cfg.lm.intermediate_size = 2, 1, 32, 64
    cfg.lm.num_heads, cfg.lm.num_kv_heads = 4, 2
    cfg.xattn.heads, cfg.xattn.dim_head, cfg.perceiver.heads, cfg.perceiver.dim_head = 2, 8, 2, 8
    cfg.perceiver.num_latents, cfg.perceiver.depth, cfg.vision.num_layers = 4, 1, 1
    cfg.vision.hidden_size, cfg.vision.intermediate_size, cfg.vision.num_heads = 16, 32, 2
    cfg.xattn.gate_init = 0.5
    topo = Topology(tp=world)
    for tied, lm_vocab in ((True, 57), (False, 0)):  # 57 + 4 new tokens (odd base vocab); plain 61
        cfg.lm.tie_word_embeddings = tied
        cfg.lm.vocab_size = lm_vocab
        torch.manual_seed(0)
        ref = build_flamingo(cfg, vocab_size=V, image_token_id=IMG, eoc_token_id=EOC)
        ref.lm.requires_grad_(True)
        tp = parallelize(copy.deepcopy(ref), topo)
        ids = torch.randint(1, 50, (2, 12))
        ids[:, 2] = IMG
        ids[1, 7] = IMG
        ids[0, 9] = EOC
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "images": torch.randn(2, 2, 1, 3, 32, 32), "media_valid": torch.tensor([[1, 0], [1, 1]]).bool()}
        batch["labels"] = ids.clone()
        lr, lt = ref(batch), tp(batch)
        _close(lt, lr, tol=1e-5, what=f"loss tied={tied}")
        lr.backward()
        lt.backward()
        for j, blk in enumerate(ref.xattn):
            for gname in ("attn_gate", "ff_gate"):
                a, b = getattr(tp.xattn[j], gname).grad, getattr(blk, gname).grad
                _close(a, b, tol=1e-5, what=f"xattn[{j}].{gname} grad")
        # the pipeline's layers, run in sequence, compute the same loss (tied and untied heads)
        from furnace.parallel.pipeline import BlockStage, EmbedHead, HeadStage, MediaStage, NormStage

        with torch.no_grad():
            x = EmbedHead(tp)(MediaStage(tp)((ids, batch["images"], batch["media_valid"])))
            for i in range(len(tp.lm.layers)):
                x = BlockStage(tp, i)(x)
            x = NormStage(tp)(x)
            logits = EmbedHead(tp).head(x) if tied else HeadStage(tp)(x)
            _close(tp.loss_fn(logits, batch["labels"]), lt.detach(), tol=1e-6, what=f"pipeline layers tied={tied}")
        # each rank holds exactly its cut of every parameter
        own = dict(tp.named_parameters())
        for k, v in ref.named_parameters():
            _close(own[k], tp_shard(v.detach(), k, rank, world), tol=0, what=k)
        # greedy decoding sees the whole vocabulary (gathered): the plain model's tokens
        with torch.no_grad():
            prompt, images, valid = ids[:, :4], batch["images"][:, :1], batch["media_valid"][:, :1]
            want = ref.generate(prompt, None, images, valid, max_new_tokens=6)
            got = tp.generate(prompt, None, images, valid, max_new_tokens=6)
        assert torch.equal(want, got), (want, got)
        # gradients of sharded weights are the matching slices of the dense gradients
        w = tp.lm.layers[0].self_attn.q_proj.weight.grad
        _close(w, ref.lm.layers[0].self_attn.q_proj.weight.grad.chunk(world, 0)[rank], what="q_proj grad")
        w = tp.perceiver.layers[0][0].to_out.weight.grad
        _close(w, ref.perceiver.layers[0][0].to_out.weight.grad.chunk(world, 1)[rank], what="perceiver to_out grad")


def test_parallelized_flamingo_matches_plain_model(failures):
    check(failures, _model)


# ---------------------------------------------------------------- packed rows through the pipeline

def _packed_pipeline(rank, world):
    """Two samples packed in each row (segment ids, positions restarting at each sample) through
    a real 2-stage DeepSpeed pipeline built by the trainer's builder: the loss equals the plain
    model's on the same packed batch, which differs from the loss without the segments."""
    from furnace.config import load_config
    from furnace.data.synthetic import demo_tokenizer
    from furnace.data.text import TextEncoder
    from furnace.parallel.pipeline import batch_to_pipe
    from furnace.parallel.staged import StagedFlamingo
    from furnace.parallel.topology import Topology
    from furnace.tokens import build_labels
    from furnace.training.build import build, build_model
    from furnace.training.distributed import init_distributed

    init_distributed()  # DeepSpeed's comm adopts this process group
    cfg = load_config("demo", ["parallel.pp=2", "parallel.zero_stage=1", "train.micro_batch_size=2",
                               "train.global_batch_size=2", "train.precision=fp32", "data.max_images=2",
                               "model.xattn.gate_init=0.5"])
    tok = demo_tokenizer()
    run = build(cfg, Topology(tp=1, pp=world), loaders=False, tokenizer=tok)
    torch.manual_seed(cfg.train.seed)
    plain = build_model(cfg, tok).eval()  # the same seeded weights as the pipeline's

    enc = TextEncoder(tok, 64, 2)
    rows = [("a red circle", "a blue square left of a green triangle"), ("a small yellow square", "a large red circle")]
    length = max(len(enc.caption(a)) + len(enc.caption(b)) for a, b in rows)
    ids = torch.full((2, length), enc.pad_id)
    seg = torch.zeros(2, length, dtype=torch.long)
    pos = torch.zeros(2, length, dtype=torch.long)
    for r, caps in enumerate(rows):
        at = 0
        for s, cap in enumerate(caps, 1):
            t = enc.caption(cap)
            ids[r, at:at + len(t)] = torch.tensor(t)
            seg[r, at:at + len(t)] = s
            pos[r, at:at + len(t)] = torch.arange(len(t))
            at += len(t)
    torch.manual_seed(1)
    batch = {"input_ids": ids, "attention_mask": (seg > 0).long(), "segment_ids": seg, "position_ids": pos,
             "images": torch.randn(2, 2, 1, 3, 32, 32), "media_valid": torch.ones(2, 2, dtype=torch.bool)}
    batch["labels"] = build_labels(ids, batch["attention_mask"], image_token_id=enc.image_id, eoc_token_id=enc.eoc_id)
    with torch.no_grad():
        want = plain(batch)
        unsegmented = plain({k: v for k, v in batch.items() if k not in ("segment_ids", "position_ids")})
    got = run.engine.eval_batch(iter([batch_to_pipe(batch)]))
    _close(got, want, tol=1e-5, what="packed loss through the pipeline")
    assert abs(float(unsegmented) - float(want)) > 1e-3, "the segments made no difference: were they dropped?"
    # evaluation runs the stages eagerly (each rank its own): the same loss, the same greedy tokens
    staged = StagedFlamingo(run.model, run.pipe, run.topology).eval()
    _close(staged(batch), want, tol=1e-5, what="packed loss through the staged model")
    a, red = tok.convert_tokens_to_ids(["a", "red"])
    prompt = torch.tensor([[enc.image_id, a, red], [enc.pad_id, enc.image_id, a]])
    mask = (prompt != enc.pad_id).long()
    images, valid = batch["images"][:, :1], batch["media_valid"][:, :1]
    with torch.no_grad():
        want_tokens = plain.generate(prompt, mask, images, valid, max_new_tokens=8, pad_token_id=enc.pad_id)
    got_tokens = staged.generate(prompt, mask, images, valid, max_new_tokens=8, pad_token_id=enc.pad_id)
    assert torch.equal(got_tokens, want_tokens), (got_tokens, want_tokens)
    assert not torch.equal(want_tokens[0], want_tokens[1])  # the rows' images and prompts tell
    with torch.no_grad():
        want_logits = plain.next_logits(prompt, *plain.media(prompt, images, valid))
    _close(staged.next_logits(prompt, *staged.media(prompt, images, valid)), want_logits, tol=1e-5,
           what="next-token logits through the stages")


def _zero3_decoding(rank, world):
    """ZeRO-3 over 2 ranks gathers each module's weights collectively: a rank whose rows are done
    keeps running forwards until its peer's are, and each gets the plain model's tokens."""
    from furnace.config import load_config
    from furnace.data.synthetic import demo_tokenizer
    from furnace.parallel.topology import Topology
    from furnace.training.build import build, build_model
    from furnace.training.distributed import init_distributed

    init_distributed()
    cfg = load_config("demo", ["parallel.zero_stage=3", "train.micro_batch_size=2", "train.global_batch_size=4",
                               "train.precision=fp32", "model.xattn.gate_init=0.5"])
    tok = demo_tokenizer()
    run = build(cfg, Topology(), loaders=False, tokenizer=tok)
    torch.manual_seed(cfg.train.seed)
    plain = build_model(cfg, tok).eval()
    img = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(10 + rank)  # each rank its own rows; rank 0's two are the same, so end together
    a, red, blue, square = tok.convert_tokens_to_ids(["a", "red", "blue", "square"])
    prompt = torch.tensor([[img, a, red], [img, a, red]] if rank == 0 else [[img, a, blue], [img, blue, square]])
    images = torch.randn(1 if rank == 0 else 2, 1, 1, 3, 32, 32).expand(2, -1, -1, -1, -1, -1).contiguous()
    valid = torch.ones(2, 1, dtype=torch.bool)
    with torch.no_grad():
        first = int(plain.generate(prompt, None, images, valid, max_new_tokens=1)[0, 0])
        eos = first if rank == 0 else None  # rank 0 is done after one token, rank 1 decodes 6
        want = plain.generate(prompt, None, images, valid, max_new_tokens=6, eos_token_id=eos)
    run.model.eval()
    got = run.model.generate(prompt, None, images, valid, max_new_tokens=6, eos_token_id=eos,
                             synced_group=run.topology.get_data_parallel_group())
    assert want.shape[1] == (1 if rank == 0 else 6)
    assert got.shape[1] == 6 and not got[:, want.shape[1]:].any()  # decoded on, padded
    assert torch.equal(got[:, : want.shape[1]], want), (rank, got, want)


def test_zero3_ranks_decode_in_lockstep(failures):
    check(failures, _zero3_decoding)


def test_packed_rows_through_the_pipeline_match_the_plain_model(failures):
    check(failures, _packed_pipeline)
