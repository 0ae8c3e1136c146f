"""FlamingoModel: mask semantics, gradient locality, freezing, checkpointing, cached generation."""
import math

import pytest
import torch

from furnace.config import load_config
from furnace.model.decoding import left_align
from furnace.model.flamingo import build_flamingo, media_segments
from furnace.model.flamingo_io import lm_with_new_tokens
from furnace.tokens import IGNORE_INDEX, build_labels, text_time
from train_utils import set_keys

V, IMG, EOC = 60, 58, 59  # tokenizer of 60 tokens; <image> and <|endofchunk|> are the last two


def tiny_cfg(**over):
    cfg = load_config("demo").model
    cfg.lm.num_layers, cfg.xattn.every = 4, 2
    cfg.perceiver.num_latents, cfg.perceiver.depth = 4, 1
    cfg.vision.num_layers = 1
    cfg.xattn.gate_init = 0.0  # Flamingo's default (the demo preset opens them)
    return set_keys(cfg, over)


def make_model(lm_vocab=None, **over):
    cfg = tiny_cfg(**over)
    cfg.lm.vocab_size = lm_vocab or 0
    return build_flamingo(cfg, vocab_size=V, image_token_id=IMG, eoc_token_id=EOC)


def set_gates(model, value):
    with torch.no_grad():
        for blk in model.xattn:
            blk.attn_gate.fill_(value)
            blk.ff_gate.fill_(value)


def make_batch(rows, t_img=3, frames=1, size=32):
    """rows: lists of token ids; pads right. Images random; media_valid from the <image> count."""
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    n_img = (ids == IMG).sum(1)
    valid = torch.arange(t_img)[None, :] < n_img[:, None]
    images = torch.randn(len(rows), t_img, frames, 3, size, size)
    return {"input_ids": ids, "attention_mask": mask, "images": images, "media_valid": valid}


def test_zero_gates_equal_bare_lm_whatever_the_images():
    model = make_model(lm_vocab=V).eval()  # LM vocab already holds the special tokens
    batch = make_batch([[1, IMG, 5, 6, 7, IMG, 8, 9], [IMG, 3, 4, EOC, 2, IMG, 2, 2]], t_img=2)
    with torch.no_grad():
        lm_logits = model.lm(batch["input_ids"])
        out1 = model.logits(batch)
        batch["images"] = torch.randn_like(batch["images"]) * 10
        out2 = model.logits(batch)
    assert (out1 - lm_logits).abs().max() <= 1e-5
    assert (out2 - lm_logits).abs().max() <= 1e-5


def dense_xattn_reference(block, x, latents, ids):
    """Independent per-token loop: token i attends to the latents of the latest <image> at or
    before i; no image yet -> the attention branch contributes exactly 0."""
    a = block.attn
    b, l, _ = x.shape
    n = latents.shape[2]
    dh = a.dim_head
    out = torch.zeros_like(x, dtype=torch.float64)
    xn = a.norm(x).double()
    for bi in range(b):
        img = 0
        for i in range(l):
            if ids[bi, i] == IMG:
                img += 1
            if img == 0:
                continue
            lat = latents[bi, img - 1].double()
            q = (xn[bi, i] @ a.to_q.weight.double().T).view(-1, dh)
            k = (lat @ a.to_k.weight.double().T).view(n, -1, dh).transpose(0, 1)
            v = (lat @ a.to_v.weight.double().T).view(n, -1, dh).transpose(0, 1)
            p = torch.softmax((k @ q[:, :, None]).squeeze(-1) / math.sqrt(dh), dim=-1)
            o = (p[:, None, :] @ v).squeeze(1).reshape(-1)
            out[bi, i] = o @ a.to_out.weight.double().T
    return out


@pytest.mark.parametrize("rows", [
    [[1, 2, 3, 4, 5]],                                  # no image at all
    [[1, 2, IMG, 4, 5, 6]],                             # text before the only image
    [[IMG, 1, 2, IMG, 3, IMG, 4, 5]],                   # several images, first at the very start
    [[1, 2, 3, IMG], [IMG, 2, IMG, 4]],                 # image at the very end; rows differ
])
def test_xattn_mask_matches_dense_reference(rows):
    model = make_model().eval()
    batch = make_batch(rows, t_img=3)
    ids = batch["input_ids"]
    block = model.xattn[0]
    x = torch.randn(*ids.shape, model.lm.cfg.hidden_size)
    with torch.no_grad():
        latents = model.encode_media(batch["images"], batch["media_valid"])
        out = block.attn(x, latents.flatten(1, 2), text_time(ids, IMG),
                         media_segments(batch["media_valid"], model.num_latents))
    ref = dense_xattn_reference(block, x, latents, ids)
    assert (out.double() - ref).abs().max() <= 1e-5
    before_first = text_time(ids, IMG) == 0
    assert torch.all(out[before_first] == 0)  # exactly zero, not just small


def _image_influence(model, batch, output_fn):
    """[B, L, T] bool: does image t change output position i (by gradient)?"""
    images = batch["images"].clone().requires_grad_(True)
    b, l = batch["input_ids"].shape
    infl = torch.zeros(b, l, images.shape[1], dtype=torch.bool)
    for i in range(l):
        images.grad = None
        out = output_fn({**batch, "images": images})
        out[:, i].sum().backward()
        infl[:, i] = images.grad.flatten(2).abs().sum(-1) > 0
    return infl


def test_image_influences_only_its_own_span_at_the_xattn_block():
    model = make_model(freeze_vision=False).eval()
    set_gates(model, 0.5)
    batch = make_batch([[1, IMG, 2, 3, IMG, 4, 5, IMG], [IMG, 1, 2, 3, 4, 5, 6, 7]], t_img=3)
    ids = batch["input_ids"]

    def xattn_out(b):
        lat = model.encode_media(b["images"], b["media_valid"]).flatten(1, 2)
        h = model.embed(ids)
        return model.xattn[0](h, lat, text_time(ids, IMG), media_segments(b["media_valid"], model.num_latents))

    infl = _image_influence(model, batch, xattn_out)
    tt = text_time(ids, IMG)
    expected = tt[:, :, None] == torch.arange(1, 4)[None, None, :]
    expected &= batch["media_valid"][:, None, :]
    assert torch.equal(infl, expected)


def test_full_model_image_influence_is_causal_and_gated():
    model = make_model(freeze_vision=False).eval()
    batch = make_batch([[1, 2, IMG, 3, 4, IMG, 5, 6]], t_img=2)
    first_img_pos = [2, 5]
    set_gates(model, 0.0)
    infl0 = _image_influence(model, batch, model.logits)
    assert not infl0.any()  # gates at 0: images cannot change anything
    set_gates(model, 0.5)
    infl = _image_influence(model, batch, model.logits)
    for t, pos in enumerate(first_img_pos):
        assert not infl[0, :pos, t].any()  # nothing before its own <image> token
        assert infl[0, pos:, t].all()  # its token and everything after (self-attention carries it on)


def test_resampler_video_and_several_images():
    model = make_model(freeze_vision=False).eval()
    batch = make_batch([[IMG, 1, IMG, 2], [IMG, 3, 4, 5]], t_img=2, frames=3)
    with torch.no_grad():
        lat = model.encode_media(batch["images"], batch["media_valid"])
        assert lat.shape == (2, 2, model.num_latents, model.vision.hidden_size)
        assert torch.all(lat[1, 1] == 0)  # padding media
        # media are resampled independently: changing image (0, 1) leaves (0, 0) alone
        imgs = batch["images"].clone()
        imgs[0, 1] = torch.randn_like(imgs[0, 1])
        lat2 = model.encode_media(imgs, batch["media_valid"])
        assert torch.equal(lat2[0, 0], lat[0, 0]) and not torch.allclose(lat2[0, 1], lat[0, 1])
        # frame time embeddings: swapping frames changes the latents
        swapped = batch["images"][:, :, [1, 0, 2]]
        assert not torch.allclose(model.encode_media(swapped, batch["media_valid"]), lat, atol=1e-6)
    with pytest.raises(ValueError, match="max_frames"):
        model.encode_media(torch.randn(1, 1, 9, 3, 32, 32), torch.ones(1, 1, dtype=torch.bool))


def test_frozen_lm_and_vision_train_exactly_resampler_xattn_and_new_rows():
    model = make_model(freeze_lm=True, freeze_vision=True, **{"lm.tie_word_embeddings": False})
    lm_vocab = model.base_vocab
    assert lm_vocab == V and model.new_tokens is None  # scratch LM sized to the tokenizer
    model = make_model(lm_vocab=V - 2, freeze_lm=True, freeze_vision=True,
                       **{"lm.tie_word_embeddings": False})
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("perceiver.", "xattn."))}
    expected |= {"new_tokens.embed.weight", "new_tokens.head.weight"}
    assert names == expected
    # and a loss step moves gradients only into those
    set_gates(model, 0.3)
    loss = model(make_batch([[1, IMG, 2, 3, EOC, 4]], t_img=1))
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)
    assert model.new_tokens.embed.weight.grad.abs().sum() > 0  # the new token rows do train
    assert model.vision.model.training is False
    model.train()
    assert model.vision.model.training is False  # frozen tower stays in eval mode


def test_new_token_rows_extend_the_vocabulary():
    model = make_model(lm_vocab=V - 2).eval()
    batch = make_batch([[1, IMG, 2, EOC]], t_img=1)
    with torch.no_grad():
        logits = model.logits(batch)
    assert logits.shape[-1] == V
    merged = lm_with_new_tokens(model)
    assert merged.cfg.vocab_size == V
    set_gates(model, 0.0)
    with torch.no_grad():
        assert (merged(batch["input_ids"]) - model.logits(batch)).abs().max() <= 1e-5


def test_activation_checkpointing_gives_identical_loss_and_grads():
    model = make_model(freeze_lm=False, freeze_vision=False)
    set_gates(model, 0.4)
    batch = make_batch([[1, IMG, 2, 3, EOC, IMG, 4, 5], [IMG, 6, 7, EOC, 1, 1, 1, 1]], t_img=2)
    batch["labels"] = build_labels(batch["input_ids"], batch["attention_mask"], image_token_id=IMG,
                                   eoc_token_id=EOC)
    results = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = ckpt
        model.train()
        loss = model(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-7, rtol=1e-6), n


def test_cached_generation_equals_full_recompute():
    model = make_model().eval()
    set_gates(model, 0.8)
    with torch.no_grad():  # sharper logits so greedy paths are not decided by rounding
        model.lm.embed_tokens.weight.mul_(8)
    prompts = [[1, IMG, 2], [IMG, 3, 4, 5, 6], [7, IMG, 8, IMG]]
    batch = make_batch(prompts, t_img=2)
    steps = 6
    got = model.generate(batch["input_ids"], batch["attention_mask"], batch["images"], batch["media_valid"],
                         max_new_tokens=steps)
    for b, prompt in enumerate(prompts):
        seq = torch.tensor([prompt])
        single = {"images": batch["images"][b:b + 1], "media_valid": batch["media_valid"][b:b + 1]}
        for s in range(steps):
            with torch.no_grad():
                logits = model.logits({"input_ids": seq, **single})[0, -1]
                logits[IMG] = float("-inf")  # generate() never emits <image>
                nxt = logits.argmax()
            assert int(nxt) == int(got[b, s]), (b, s)
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
    assert len(set(got.flatten().tolist())) > 1  # not a degenerate constant output


def test_generation_stops_at_eos_and_pads():
    model = make_model().eval()
    batch = make_batch([[1, IMG, 2]], t_img=1)
    first = model.generate(batch["input_ids"], None, batch["images"], batch["media_valid"], max_new_tokens=3)
    eos = int(first[0, 0])
    out = model.generate(batch["input_ids"], None, batch["images"], batch["media_valid"], max_new_tokens=5,
                         eos_token_id=eos, pad_token_id=0)
    assert out.shape[1] == 1 and int(out[0, 0]) == eos


def test_left_align():
    ids = torch.tensor([[5, 6, 0, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    a, m = left_align(ids, mask, pad_id=9)
    assert a.tolist() == [[9, 9, 5, 6], [1, 2, 3, 4]]
    assert m.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_image_count_mismatch_is_one_clear_error():
    model = make_model()
    batch = make_batch([[1, IMG, 2, IMG]], t_img=2)
    batch["media_valid"][0, 1] = False
    with pytest.raises(ValueError, match=r"batch row 0 has 2 <image> tokens but 1 valid images"):
        model(batch)


def test_labels_mask_padding_images_and_interleaved_gaps():
    P = 0
    ids = torch.tensor([[9, 8, IMG, 1, 2, EOC, 3, 4, IMG, 5, EOC, P, P]])
    mask = (torch.arange(13) < 11).long()[None]
    caption = build_labels(ids, mask, image_token_id=IMG, eoc_token_id=EOC, interleaved=False)
    X = IGNORE_INDEX
    assert caption.tolist() == [[9, 8, X, 1, 2, EOC, 3, 4, X, 5, EOC, X, X]]
    inter = build_labels(ids, mask, image_token_id=IMG, eoc_token_id=EOC, interleaved=True)
    # text before the first image and between <|endofchunk|> and the next <image> are masked;
    # <|endofchunk|> itself keeps its label
    assert inter.tolist() == [[X, X, X, 1, 2, EOC, X, X, X, 5, EOC, X, X]]
    both = build_labels(ids.repeat(2, 1), mask.repeat(2, 1), image_token_id=IMG, eoc_token_id=EOC,
                        interleaved=torch.tensor([False, True]))
    assert both[0].tolist() == caption[0].tolist() and both[1].tolist() == inter[0].tolist()


def test_loss_ignores_masked_labels():
    model = make_model()
    batch = make_batch([[1, IMG, 2, 3, EOC]], t_img=1)
    batch["labels"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    assert model(batch).item() == 0.0
    batch["labels"][0, 3] = 3
    logits = model.logits(batch)
    expected = torch.nn.functional.cross_entropy(logits[0, 2:3], torch.tensor([3]))
    assert torch.allclose(model(batch), expected, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_whole_flamingo(tmp_path, tied):
    import dataclasses

    from furnace.model.flamingo_io import load_flamingo, save_flamingo

    model = make_model(lm_vocab=V - 2, **{"lm.tie_word_embeddings": tied}).eval()
    set_gates(model, 0.3)
    cfg = tiny_cfg(**{"lm.tie_word_embeddings": tied})
    save_flamingo(model, tmp_path, dataclasses.asdict(cfg))
    again = load_flamingo(tmp_path).eval()
    assert (again.lm.lm_head.weight is again.lm.embed_tokens.weight) == tied
    batch = make_batch([[1, IMG, 2, EOC, 3]], t_img=1)
    with torch.no_grad():
        assert torch.equal(again.logits(batch), model.logits(batch))


def test_gates_start_closed_by_default_and_open_when_configured():
    assert all(float(b.attn_gate) == 0.0 and float(b.ff_gate) == 0.0 for b in make_model().xattn)
    opened = make_model(**{"xattn.gate_init": 0.5})
    assert all(float(b.attn_gate) == 0.5 and float(b.ff_gate) == 0.5 for b in opened.xattn)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_from_scratch_tower_starts_at_sincos_positions(kind):
    from furnace.config import VisionConfig
    from furnace.model.vision import sincos_2d, vision_from_config

    kw = dict(kind=kind, image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    w = vision_from_config(VisionConfig(**kw)).model.embeddings.position_embedding.weight.detach()
    rows = w[1:] if kind == "clip" else w  # CLIP's class-token row comes first and starts at 0
    code = sincos_2d(4, 32)
    assert torch.equal(rows, code) and (kind == "siglip" or not w[0].any())
    # x lives in the first half of the channels, y in the second; patches are row-major
    assert torch.equal(code[1, :16], code[5, :16]) and torch.equal(code[4, 16:], code[5, 16:])
    assert torch.cdist(code, code).add(torch.eye(16)).min() > 0.1  # every patch distinguishable
    rnd = vision_from_config(VisionConfig(sincos_positions=False, **kw)).model.embeddings.position_embedding.weight
    assert (rnd[-16:] - code).abs().max() > 0.5  # opting out keeps the transformers init
