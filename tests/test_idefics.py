"""IDEFICS in and out (`furnace.model.idefics`): furnace's logits equal transformers'
IdeficsForVisionText2Text on tiny random checkpoints made here, one per variant (qk norms on
and off, vector and float alphas, cross_layer_interval 1, 2 and 3, tied and untied heads); the
image-attention rule equals transformers' processor's; `to_hf` loads in transformers with the
same logits; a converted checkpoint trains under ZeRO-3 x TP and PP as one process does."""
import json

import pytest
import torch

from train_utils import lm_tokenizer, metrics, run, train_cmd

IMG = 41  # <image>: the second additional token of a 40-token vocabulary
EOS = 2


def make_idefics(path, *, qk=True, qk_perceiver=True, alpha="vector", interval=2, tied=False, layers=4,
                 vocab=40, image_size=16, eos=EOS, seed=0):
    """A random IdeficsForVisionText2Text saved at `path`, its alphas and norms away from their
    starting values and its matrices wide enough that the images move the logits (closed gates,
    unit norms and N(0, 0.02) weights would hide a wrong mapping)."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    torch.manual_seed(seed)
    cfg = IdeficsConfig(
        vocab_size=vocab, additional_vocab_size=2, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, alpha_type=alpha, cross_layer_interval=interval, qk_layer_norms=qk,
        tie_word_embeddings=tied, use_resampler=True, max_position_embeddings=64, rms_norm_eps=1e-6, eos_token_id=eos,
        vision_config=dict(embed_dim=24, image_size=image_size, patch_size=8, intermediate_size=40,
                           num_hidden_layers=2, num_attention_heads=2),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=3, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=8, qk_layer_norms_perceiver=qk_perceiver))
    model = IdeficsForVisionText2Text(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.normal_(0, 0.8)
            elif "norm" in name or ".ln." in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.15)
    model.save_pretrained(path)
    return model


class _Tok:
    """What transformers' image-attention rule reads of a tokenizer."""

    def __init__(self, image, eos):
        self.image, self.eos_token_id = image, eos

    def convert_tokens_to_ids(self, token):
        assert token == "<image>"
        return self.image


def idefics_inputs(ids, images, image=IMG, eos=EOS):
    """transformers' image_attention_mask for `ids`, made by its processor's own functions."""
    from transformers.models.idefics.processing_idefics import (image_attention_mask_for_packed_input_ids,
                                                                incremental_to_binary_attention_mask)

    incremental, _ = image_attention_mask_for_packed_input_ids(ids.clone(), _Tok(image, eos), "pt")
    return incremental_to_binary_attention_mask(incremental, "pt", num_classes=images)


def batch(seed=1, images=3, image_size=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (2, 14), generator=g)
    ids[0, [1, 6]] = IMG
    ids[0, [4, 9]] = EOS  # the text after each EOS sees no image until the next
    ids[1, [0, 3, 10]] = IMG
    ids[1, 11] = 40       # the other additional token
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0      # right padding
    valid = torch.arange(images)[None] < (ids == IMG).sum(1)[:, None]
    pixels = torch.randn(2, images, 3, image_size, image_size, generator=g)
    return ids, mask, pixels, valid


def both_logits(ours, theirs, ids, mask, pixels, valid):
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                      image_attention_mask=idefics_inputs(ids, pixels.shape[1], ours.image_token_id,
                                                          ours.eos_token_id)).logits
        got = ours.logits({"input_ids": ids, "attention_mask": mask, "images": pixels[:, :, None],
                           "media_valid": valid})
    real = mask.bool()
    return got[real], want[real]


VARIANTS = {
    "qk-norms_vector-alphas_every2": {},
    "no-qk-norms_float-alphas_every1_tied": dict(qk=False, qk_perceiver=False, alpha="float", interval=1, tied=True),
    "every3_6-layers_perceiver-qk-only": dict(qk=False, interval=3, layers=6),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers_and_to_hf_loads_back(variant, tmp_path):
    from transformers import IdeficsForVisionText2Text

    from furnace.model import idefics

    theirs = make_idefics(tmp_path / "idefics", **VARIANTS[variant])
    ours = idefics.from_hf(tmp_path / "idefics", image_token_id=IMG).eval()
    ids, mask, pixels, valid = batch()
    got, want = both_logits(ours, theirs, ids, mask, pixels, valid)
    assert (got - want).abs().max() <= 1e-4
    # the images reach the logits (open gates): other pixels, other logits
    other, _ = both_logits(ours, theirs, ids, mask, torch.randn_like(pixels), valid)
    assert (other - got).abs().max() > 0.1

    idefics.to_hf(ours, tmp_path / "back")
    back = IdeficsForVisionText2Text.from_pretrained(tmp_path / "back").eval()
    got2, want2 = both_logits(ours, back, ids, mask, pixels, valid)
    assert (got2 - want2).abs().max() <= 1e-4


def test_text_time_is_idefics_image_attention_rule():
    """Which image each token sees (`text_time` with the EOS reset) equals the one-hot mask
    transformers' processor builds, on random rows dense in <image> and EOS tokens."""
    from furnace.tokens import text_time

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (64, 30), generator=g)
    ids = torch.where(ids == 5, torch.full_like(ids, IMG), ids)
    images = int((ids == IMG).sum(1).max())
    want = idefics_inputs(ids, images)                       # [B, L, images] one-hot or all zero
    tt = text_time(ids, IMG, reset_id=EOS)                   # k: the k-th image, 0: none
    got = torch.nn.functional.one_hot(tt, images + 1)[..., 1:]
    assert torch.equal(got, want)


def test_what_idefics_cannot_hold_is_refused_in_one_line(tmp_path):
    from furnace.config import ModelConfig
    from furnace.model import idefics
    from furnace.model.flamingo import build_flamingo

    make_idefics(tmp_path / "idefics")
    cfg = json.loads((tmp_path / "idefics" / "config.json").read_text())
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "config.json").write_text(json.dumps({**cfg, "use_resampler": False}))
    with pytest.raises(ValueError, match="use_resampler=false"):
        idefics.from_hf(tmp_path / "raw", image_token_id=IMG)
    with pytest.raises(ValueError, match="not an IDEFICS checkpoint"):
        idefics.from_hf(tmp_path, image_token_id=IMG)
    open_flamingo_style = build_flamingo(ModelConfig(), vocab_size=300, image_token_id=298, eoc_token_id=299)
    with pytest.raises(ValueError, match="IDEFICS needs model.xattn.placement=first"):
        idefics.to_hf(open_flamingo_style, tmp_path / "out")


# ------------------------------------------------------------------ continuing IDEFICS with train.py

def _with_tokenizer(path):
    """A tiny IDEFICS over the synthetic set's words, with its tokenizer as IDEFICS ships one
    (<fake_token_around_image> and <image> after the LM's vocabulary)."""
    from furnace.data.synthetic import vocabulary

    tok = lm_tokenizer(vocabulary())
    base = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>"]})
    make_idefics(path, vocab=base, image_size=32, interval=1, layers=2, eos=tok.eos_token_id)
    tok.save_pretrained(path)
    return tok


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from furnace.model import idefics

    src = tmp_path_factory.mktemp("idefics") / "idefics-tiny"
    _with_tokenizer(src)
    return src, idefics.convert(src, src.parent / "converted")


def test_converted_folders_hold_the_checkpoint(converted):
    """OUT/flamingo loads as the IDEFICS model (plus a new <|endofchunk|> row); OUT/lm and
    OUT/vision load in transformers as the decoder and the tower."""
    from transformers import CLIPVisionModel, IdeficsForVisionText2Text, LlamaForCausalLM

    from furnace.model import idefics
    from furnace.model.flamingo_io import load_flamingo

    src, out = converted
    theirs = IdeficsForVisionText2Text.from_pretrained(src).eval()
    direct = idefics.from_hf(src).eval()
    loaded = load_flamingo(out / "flamingo").eval()
    assert loaded.vocab_size == direct.vocab_size + 1 and loaded.image_token_id == direct.image_token_id
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, theirs.config.vocab_size, (2, 12), generator=g)
    ids[:, 2] = direct.image_token_id
    ids[:, 6] = direct.eos_token_id
    pixels = torch.randn(2, 1, 3, 32, 32, generator=g)
    valid = torch.ones(2, 1, dtype=torch.bool)
    got, want = both_logits(loaded, theirs, ids, torch.ones_like(ids), pixels, valid)
    assert (got[:, :want.shape[-1]] - want).abs().max() <= 1e-4
    lm = LlamaForCausalLM.from_pretrained(out / "lm")
    torch.testing.assert_close(lm.model.embed_tokens.weight, theirs.model.embed_tokens.weight, atol=0, rtol=0)
    tower = CLIPVisionModel.from_pretrained(out / "vision")
    with torch.no_grad():
        torch.testing.assert_close(tower(pixel_values=pixels[:, 0]).last_hidden_state,
                                   theirs.model.vision_model(pixel_values=pixels[:, 0]).last_hidden_state)


RUNS: dict = {}
STEPS = 4
LAYOUTS = {"ref": (1, ("parallel.zero_stage=0",)),
           "tp2_zero3": (2, ("parallel.tp=2", "parallel.zero_stage=3")),
           "pp2_zero1": (2, ("parallel.pp=2", "parallel.zero_stage=1"))}


def _train(converted, data, tmp_path_factory, name):
    if name not in RUNS:
        _, out = converted
        nproc, extra = LAYOUTS[name]
        run_dir = tmp_path_factory.mktemp(f"idefics-{name}") / "run"
        sets = [f"model.lm.path={out / 'lm'}", f"model.vision.path={out / 'vision'}",
                f"model.start_from={out / 'flamingo'}", "model.freeze_lm=true", "model.freeze_vision=true",
                "data.tokenizer=null", f"train.max_steps={STEPS}", "train.save_every=0", "debug.log_gate_grads=true"]
        res = run(train_cmd(run_dir, data, *sets, *extra, nproc=nproc))
        assert res.returncode == 0, res.stderr[-4000:]
        RUNS[name] = run_dir
    recs = [m for m in metrics(RUNS[name]) if "loss" in m]
    assert [m["step"] for m in recs] == list(range(1, STEPS + 1))
    return recs


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2_zero3", "pp2_zero1"])
def test_a_converted_idefics_trains_on_each_layout_as_one_process(converted, data, tmp_path_factory, layout):
    """The loss curve, the gradient norm (the per-head q/k norms' gradients summed over the
    tensor-parallel ranks) and the vector gates' gradients equal the single process's."""
    ref = _train(converted, data, tmp_path_factory, "ref")
    got = _train(converted, data, tmp_path_factory, layout)
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        gates = [k for k in a if k.startswith("gate_grad/")]
        assert gates and set(gates) <= set(b)
        for k in gates:
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-6), (a["step"], k)
    assert ref[-1]["loss"] < ref[0]["loss"]


def test_furnace_import_cli(converted, tmp_path, capsys):
    """furnace-import writes the three folders and says where; a folder that is not IDEFICS is
    refused in one line with exit status 2."""
    from furnace.import_checkpoint import main

    src, _ = converted
    assert main(["idefics", str(src), "--out", str(tmp_path / "out")]) == 0
    assert all((tmp_path / "out" / part / "model.safetensors").is_file() for part in ("lm", "vision", "flamingo"))
    assert "whole model ->" in capsys.readouterr().out
    assert main(["idefics", str(tmp_path / "out" / "lm"), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an IDEFICS checkpoint" in err[0]
