"""The analytic FLOP model behind MFU (`metrics.flamingo_flops_per_sample`) against torch's
FlopCounterMode over a real forward + backward, on narrow versions of every preset.

FlopCounterMode has no formula for the op furnace's CPU attention reaches
(kernels/reference.py calls F.scaled_dot_product_attention, which dispatches to
aten._scaled_dot_product_flash_attention_for_cpu and its backward), so it would count no
attention at all. The formulas registered below count it with the FLOP model's conventions:
4 x head_dim FLOPs (QK^T and PV) per visible (query, key) pair forward, twice that backward;
`is_causal` (the decoder's self-attention) counts half the Lq x Lk pairs; with a mask (the
xattn blocks' segments) the visible pairs are counted, which is each token x its image's
latents when every token follows an image, as the batch below has it.
"""
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from furnace.config import load_config
from furnace.data.synthetic import demo_tokenizer
from furnace.data.tokenizer import load_tokenizer, save_tokenizer
from furnace.tokens import EOC_TOKEN, IMAGE_TOKEN
from furnace.training.build import build_model
from furnace.training.metrics import StepShape, flamingo_flops_per_sample
from train_utils import lm_tokenizer

aten = torch.ops.aten
PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "furnace" / "presets").glob("*.yaml"))


def _pairs(q, k, is_causal, attn_mask) -> float:
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if attn_mask is not None:  # SDPA hands a boolean mask on as 0 / -inf
        seen = attn_mask if attn_mask.dtype == torch.bool else attn_mask.isfinite()
        return float(seen.expand(b, h, lq, lk).sum())
    return b * h * lq * lk * (0.5 if is_causal else 1.0)


if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:  # torch may add its own one day
    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _sdpa_cpu(q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None, out_val=None):
        return 4 * q.shape[-1] * _pairs(q, k, is_causal, attn_mask)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _sdpa_cpu_backward(grad, q, k, v, out, lse, dropout_p, is_causal, *, attn_mask=None, scale=None,
                           out_val=None):
        return 8 * q.shape[-1] * _pairs(q, k, is_causal, attn_mask)  # dS, dQ, dK, dV: 2 x forward


# Narrow widths, each preset's structure kept: freeze flags, xattn every (two blocks' worth of
# layers, so layers precede the first block whenever every > 1), GQA, tied or untied head,
# max_images. Activation checkpointing off: its recompute is not model FLOPs.
NARROW = ["model.lm.hidden_size=64", "model.lm.intermediate_size=96", "model.lm.num_heads=4",
          "model.lm.num_kv_heads=2", "model.vision.image_size=32", "model.vision.patch_size=8",
          "model.vision.hidden_size=32", "model.vision.intermediate_size=64", "model.vision.num_layers=1",
          "model.vision.num_heads=2", "model.perceiver.num_latents=4", "model.perceiver.depth=2",
          "model.perceiver.heads=2", "model.perceiver.dim_head=16", "model.xattn.heads=2",
          "model.xattn.dim_head=16", "model.xattn.ff_hidden=0", "model.activation_checkpointing=false"]
SEQ = 32
# The per-row count has no audio (a step adds its clips: the audio test below): demo-audio's without it.
CASES = [(p, ["model.audio.kind=none"] if p == "demo-audio" else []) for p in PRESETS] + [
    ("flamingo-1b", ["model.lm.vocab_size=0"]),    # specials inside the LM's vocabulary: no new rows
    ("flamingo-1b", ["model.freeze_lm=false"]),    # the LM trains too
]


def narrow(preset: str, extra: list[str], tmp_path):
    shape = load_config(preset).model
    # a pretrained LM (every preset but the demo's scratch one): a small vocabulary of its own
    vocab = ["model.lm.vocab_size=96"] if shape.lm.vocab_size or shape.freeze_lm else []
    cfg = load_config(preset, [*NARROW, f"model.lm.num_layers={max(2, 2 * shape.xattn.every)}", *vocab, *extra])
    if cfg.model.lm.vocab_size:
        # the LM's tokenizer lacks <image> / <|endofchunk|>: load_tokenizer adds them as new rows
        save_tokenizer(lm_tokenizer([f"w{i}" for i in range(cfg.model.lm.vocab_size - 4)]), tmp_path / "tok")
        tok = load_tokenizer(tmp_path / "tok")
    else:
        tok = demo_tokenizer()  # the LM is sized to it: the specials are rows of its own
    return cfg, tok, build_model(cfg, tok).train()


def batch_of(model, tok, images: int, rows: int = 2) -> dict:
    """Full rows of SEQ tokens, an <image> first (every token sees an image) and `images` in all."""
    img, eoc = tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(EOC_TOKEN)
    ids = torch.randint(6, 16, (rows, SEQ))
    for k in range(images):
        ids[:, k * SEQ // images] = img
        if k:
            ids[:, k * SEQ // images - 1] = eoc
    size = model.vision.image_size
    return {"input_ids": ids, "images": torch.randn(rows, images, 1, 3, size, size),
            "media_valid": torch.ones(rows, images, dtype=torch.bool)}


@pytest.mark.parametrize("preset,extra", CASES, ids=[" ".join([p, *e]) for p, e in CASES])
def test_flop_model_matches_flop_counter(preset, extra, tmp_path):
    cfg, tok, model = narrow(preset, extra, tmp_path)
    images = cfg.data.max_images
    batch = batch_of(model, tok, images)
    rows = batch["input_ids"].shape[0]
    with FlopCounterMode(display=False) as fc:
        loss = model(batch)
        counted_fwd = fc.get_total_flops() / rows
        loss.backward()
    counted = fc.get_total_flops() / rows
    counts = fc.get_flop_counts()["Global"]
    assert counts.get(aten._scaled_dot_product_flash_attention_for_cpu, 0) > 0, "attention went uncounted"
    f = flamingo_flops_per_sample(model, StepShape(seq_len=SEQ, images=images))
    assert counted_fwd == pytest.approx(f["forward"], rel=0.02)
    assert counted == pytest.approx(f["train"], rel=0.02), (counted / f["train"], f)
    # what decides the layers before the first xattn block: something upstream of them training
    bwd, fwd = f["backward_by_part"], f["forward_by_part"]
    early = next(i for i in range(len(model.lm.layers)) if model.xattn_index(i) is not None)  # 0: IDEFICS placement
    if early and model.new_tokens is None and cfg.model.freeze_lm:
        assert fwd["decoder_before_xattn"] > 0 and bwd["decoder_before_xattn"] == 0
    if early and model.new_tokens is not None:
        assert bwd["decoder_before_xattn"] > 0


def test_a_step_counts_the_images_that_ran(tmp_path):
    """Rows with fewer valid images than data.max_images: the tower and the resampler run on the
    valid ones only, and the trainer's count (`step_flops` over `batch_counts`) is what runs."""
    from furnace.training.metrics import batch_counts, step_flops

    cfg, tok, model = narrow("flamingo-1b", [], tmp_path)
    slots = cfg.data.max_images
    assert slots > 2
    batch = batch_of(model, tok, 2)  # two <image> tokens a row, in `slots` media slots
    rows, size = batch["input_ids"].shape[0], model.vision.image_size
    batch["images"] = torch.randn(rows, slots, 1, 3, size, size)
    batch["media_valid"] = torch.zeros(rows, slots, dtype=torch.bool)
    batch["media_valid"][:, :2] = True
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with FlopCounterMode(display=False) as fc:
        model(batch).backward()
    f = flamingo_flops_per_sample(model, StepShape(seq_len=SEQ, images=slots))
    tokens, counted_rows, images, clips = batch_counts(batch)
    assert (tokens, counted_rows, images, clips) == (rows * SEQ, rows, 2 * rows, 0)
    assert fc.get_total_flops() == pytest.approx(step_flops(f, rows, images), rel=0.02)
    # the shape's count (every slot an image) is what a full batch runs, and more than this one
    assert step_flops(f, rows, rows * slots) == pytest.approx(rows * f["train"])
    assert fc.get_total_flops() < 0.98 * rows * f["train"]


@pytest.mark.parametrize("freeze_audio", [False, True], ids=["audio_trains", "audio_frozen"])
def test_the_audio_branch_counts_as_it_runs(freeze_audio, tmp_path):
    """demo-audio's branch (log-mel filterbank, the encoder's convolutions and layers, the
    projection to the latents' width, its resampler) per clip: FlopCounterMode over rows whose one
    medium is a clip equals the step count, with the one (zero) image the tower still encodes."""
    from furnace.data.synthetic_audio import vocabulary as audio_words
    from furnace.data.tokenizer import build_word_tokenizer
    from furnace.tokens import AUDIO_TOKEN
    from furnace.training.metrics import batch_counts, step_flops

    # a narrow branch whose width differs from the latents' (a projection) and a scratch LM
    cfg = load_config("demo-audio", [*NARROW, "model.lm.num_layers=2", "model.audio.hidden_size=48",
                                     "model.audio.intermediate_size=64", "model.audio.num_layers=1",
                                     "model.audio.num_heads=2", "model.audio.seconds=0.2",
                                     "model.audio_perceiver.num_latents=4", "model.audio_perceiver.heads=2",
                                     "model.audio_perceiver.dim_head=16", f"model.freeze_audio={str(freeze_audio).lower()}"])
    tok = build_word_tokenizer(audio_words(), audio=True)
    model = build_model(cfg, tok).train()
    rows, size = 2, model.vision.image_size
    words = torch.tensor(tok.convert_tokens_to_ids(audio_words()))
    ids = words[torch.randint(len(words), (rows, SEQ))]
    ids[:, 0] = tok.convert_tokens_to_ids(AUDIO_TOKEN)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "images": torch.zeros(rows, 1, 1, 3, size, size), "media_valid": torch.ones(rows, 1, dtype=torch.bool),
             "audio": torch.randn(rows, 1, model.audio.tower.num_samples) * 0.1,
             "audio_valid": torch.ones(rows, 1, dtype=torch.bool)}
    with FlopCounterMode(display=False) as fc:
        model(batch).backward()
    f = flamingo_flops_per_sample(model, StepShape(seq_len=SEQ, images=1))
    tokens, n_rows, images, clips = batch_counts(batch)
    assert (n_rows, images, clips) == (rows, 1, rows)  # no image: one zero image still runs
    assert f["train_per_clip"] > 0
    assert fc.get_total_flops() == pytest.approx(step_flops(f, n_rows, images, clips), rel=0.02)
