"""open_flamingo checkpoints in and out (furnace.model.open_flamingo_io), checked against
open_flamingo's own modules: helpers.py and flamingo_lm.py run straight from its 2.0.1 wheel
(the package pins torch==2.0.1, so it is never installed next to furnace)."""
import dataclasses
import importlib.util
import sys
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from furnace.config import PerceiverConfig, XAttnConfig
from furnace.data.tokenizer import load_tokenizer
from furnace.model.flamingo import media_segments
from furnace.model.flamingo_io import load_flamingo, save_flamingo
from furnace.model.open_flamingo_io import from_open_flamingo, load_open_flamingo, to_open_flamingo
from furnace.model.perceiver import PerceiverResampler
from furnace.model.xattn import GatedCrossAttentionBlock
from furnace.tokens import EOC_TOKEN, IMAGE_TOKEN, text_time
from test_model_flamingo import tiny_cfg
from train_utils import pip_wheel

PKG = "_open_flamingo_wheel"
TOL = 1e-5


class NotWeights:
    """A pickled object: what a weights-only load must refuse."""


@pytest.fixture(scope="module")
def of(tmp_path_factory):
    """open_flamingo's helpers and flamingo_lm modules, executed from the wheel's sources."""
    wheels = [pip_wheel("open-flamingo", "2.0.1", tmp_path_factory.mktemp("wheel"))]
    spec = importlib.util.spec_from_loader(PKG, loader=None, is_package=True)
    sys.modules[PKG] = importlib.util.module_from_spec(spec)
    mods = {}
    with zipfile.ZipFile(wheels[0]) as z:
        for name in ("utils", "helpers", "flamingo_lm"):  # flamingo_lm imports .helpers and .utils
            origin = f"{wheels[0]}/open_flamingo/src/{name}.py"
            mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(f"{PKG}.{name}", loader=None,
                                                                                  origin=origin))
            sys.modules[mod.__name__] = mods[name] = mod
            exec(compile(z.read(f"open_flamingo/src/{name}.py"), origin, "exec"), mod.__dict__)
    yield SimpleNamespace(**mods)
    for name in [PKG, *(f"{PKG}.{n}" for n in mods)]:
        sys.modules.pop(name, None)


def perturb(module: nn.Module, **gates) -> nn.Module:
    """Every weight moved off its init (norms included), the named gates set."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, value in gates.items():
            getattr(module, name).fill_(value)
    return module


# ------------------------------------------------------------------ one module at a time

@pytest.mark.parametrize("frames", [1, 2])
def test_resampler_matches_open_flamingos(of, frames):
    """frames 1: open_flamingo's default resampler, without frame embeddings (furnace's are zeros)."""
    ref = perturb(of.helpers.PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=5, ff_mult=2,
                                                max_num_frames=frames if frames > 1 else None))
    ours = PerceiverResampler(32, PerceiverConfig(num_latents=5, depth=2, heads=4, dim_head=8, ff_mult=2,
                                                  max_frames=frames))
    ours.load_state_dict(from_open_flamingo(ours, ref.state_dict()))
    x = torch.randn(2, 3, frames, 7, 32)                   # [b, T, F, v, d]
    want = ref(x)                                         # [b, T, n, d]
    err = (ours(x.flatten(0, 1)).view(want.shape) - want).abs().max().item()
    print(f"resampler frames={frames}: max |diff| {err:.2e}")
    assert err <= TOL


def test_xattn_block_matches_open_flamingos(of):
    """Several images a row, text before the first; open_flamingo's media_locations against
    furnace's text_time / media_segment."""
    ref = perturb(of.helpers.GatedCrossAttentionBlock(dim=48, dim_visual=32, dim_head=8, heads=4, ff_mult=2,
                                                      only_attend_immediate_media=True), attn_gate=0.8, ff_gate=-0.5)
    ours = GatedCrossAttentionBlock(48, 32, XAttnConfig(heads=4, dim_head=8, ff_mult=2))
    ours.load_state_dict(from_open_flamingo(ours, ref.state_dict()))
    img, t, n = 1, 3, 4
    ids = torch.tensor([[5, 5, img, 5, 5, img, 5, 5, 5, img, 5, 5], [5, 5, 5, 5, img, 5, 5, 5, img, 5, img, 5]])
    x, media = torch.randn(2, ids.shape[1], 48), torch.randn(2, t, n, 32)
    seg = media_segments(torch.ones(2, t, dtype=torch.bool), n)
    want = ref(x, media, media_locations=ids == img)
    got = ours(x, media.flatten(1, 2), text_time(ids, img), seg)
    err = (got - want).abs().max().item()
    print(f"xattn block: max |diff| {err:.2e}")
    assert err <= TOL
    other = ours(x, torch.randn_like(media).flatten(1, 2), text_time(ids, img), seg)
    assert torch.equal(other[0, :2], got[0, :2]) and not torch.allclose(other[0, 2:], got[0, 2:])


# ------------------------------------------------------------------ a whole checkpoint

def base_tokenizer():
    """A word-level tokenizer without a pad token (as Llama 2's): open_flamingo then appends
    <|endofchunk|>, <image>, <PAD>, and furnace <image>, <|endofchunk|>, <pad>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *"the a cat dog sat on mat red blue sky".split()]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def open_flamingo_model(of, llama_dir, base):
    """open_flamingo's trainable modules around the HF Llama: perceiver and lang_encoder (the
    names of its Flamingo), its new rows eoc, image, pad at base, base+1, base+2."""
    from transformers import LlamaForCausalLM

    lang = LlamaForCausalLM.from_pretrained(llama_dir)
    lang.resize_token_embeddings(base + 3)
    of.utils.extend_instance(lang, of.flamingo_lm.FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("model.layers")
    lang.init_flamingo(media_token_id=base + 1, lang_hidden_size=64, vis_hidden_size=32, cross_attn_every_n_layers=2,
                       gradient_checkpointing=False)
    model = nn.Module()
    model.perceiver = of.helpers.PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=4)
    model.lang_encoder = lang
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(of, tmp_path_factory):
    """A tiny Llama (untied) and CLIP, open_flamingo's modules around them with trained-looking
    weights, saved two ways: `whole` (its state_dict, aliases, decoder and an open_clip key
    included) and `trained` (what its training script keeps: resampler, xattn, embedding, under
    model_state_dict with DDP's module. prefix)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    w = tmp_path_factory.mktemp("of")
    tok = base_tokenizer()
    base = len(tok)
    LlamaForCausalLM(LlamaConfig(vocab_size=base, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(w / "llama")
    tok.save_pretrained(w / "llama")
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(w / "clip")
    ref = open_flamingo_model(of, w / "llama", base)
    perturb(ref.perceiver)
    for i, blk in enumerate(ref.lang_encoder.gated_cross_attn_layers):
        if blk is not None:
            perturb(blk, attn_gate=0.6 + 0.2 * i, ff_gate=-0.3)
    with torch.no_grad():  # the whole embedding trained, and distinct new head rows
        ref.lang_encoder.get_input_embeddings().weight.add_(torch.randn(base + 3, 64) * 0.02)
        ref.lang_encoder.get_output_embeddings().weight[base:] = torch.randn(3, 64) * 0.05
    state = ref.state_dict()
    torch.save({**state, "vision_encoder.conv1.weight": torch.randn(4, 3, 2, 2)}, w / "whole.pt")
    keep = [k for k in state if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k
            or k == "lang_encoder.model.embed_tokens.weight"]
    torch.save({"epoch": 0, "model_state_dict": {f"module.{k}": state[k] for k in keep}}, w / "trained.pt")
    return SimpleNamespace(dir=w, ref=ref, base=base, whole=w / "whole.pt", trained=w / "trained.pt")


def furnace_cfg(ckpt):
    cfg = tiny_cfg()
    cfg.lm.path, cfg.vision.path = str(ckpt.dir / "llama"), str(ckpt.dir / "clip")
    cfg.perceiver.heads, cfg.perceiver.dim_head = 4, 8   # open_flamingo's xattn defaults: 8 * 64
    cfg.xattn.heads, cfg.xattn.dim_head = 8, 64
    return cfg


def load(ckpt, which):
    tok = load_tokenizer(ckpt.dir / "llama")
    cfg = furnace_cfg(ckpt)
    return load_open_flamingo(which, cfg, tok).eval(), tok, cfg


@pytest.mark.parametrize("kind", ["whole", "trained"])
def test_whole_checkpoint_gives_open_flamingos_logits(of, ckpt, kind):
    """Pixels to logits: furnace's model of the checkpoint against open_flamingo's FlamingoLayers
    around the HF Llama, fed the same tower features (the HF CLIP's). Ids map by token: furnace
    numbers its new tokens <image>, <|endofchunk|>, <pad>, open_flamingo <|endofchunk|>, <image>, <PAD>."""
    from transformers import CLIPVisionModel

    model, tok, cfg = load(ckpt, getattr(ckpt, kind))
    assert (cfg.perceiver.depth, cfg.perceiver.num_latents, cfg.xattn.every, cfg.xattn.ff_mult) == (2, 4, 2, 4)
    base = ckpt.base
    to_of = torch.arange(model.vocab_size)
    to_of[tok.convert_tokens_to_ids(EOC_TOKEN)] = base
    to_of[tok.convert_tokens_to_ids(IMAGE_TOKEN)] = base + 1
    to_of[tok.pad_token_id] = base + 2
    img, eoc, pad = (tok.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, EOC_TOKEN, tok.pad_token))
    ids = torch.tensor([[4, 5, img, 6, 7, 8, eoc, 4, img, 9, pad, 5],
                        [img, 10, 11, eoc, 5, 6, 7, img, 8, 9, 4, 12]])
    images = torch.randn(2, 2, 1, 3, 32, 32)
    with torch.no_grad():
        got = model.logits({"input_ids": ids, "images": images, "media_valid": torch.ones(2, 2, dtype=torch.bool)})
        clip = CLIPVisionModel.from_pretrained(ckpt.dir / "clip").eval()
        feats = clip(pixel_values=images.flatten(0, 2)).last_hidden_state
        latents = ckpt.ref.perceiver(feats.view(2, 2, 1, *feats.shape[1:]))
        lang = ckpt.ref.lang_encoder
        for layer in lang._get_decoder_layers():
            layer.condition_vis_x(latents)
        want = lang(input_ids=to_of[ids], attention_mask=torch.ones_like(ids)).logits[..., to_of]
        lang.clear_conditioned_layers()
    if kind == "trained":  # no head in the checkpoint: the LM's, new rows at furnace's start
        mean = lang.get_input_embeddings().weight[:base].mean(0)
        assert torch.allclose(model.new_tokens.head.weight, mean.expand(3, -1), atol=1e-6)
        got, want = got[..., :base], want[..., :base]
    err = (got - want).abs().max().item()
    print(f"whole model ({kind}): max |logit diff| {err:.2e} of max |logit| {want.abs().max().item():.2e}")
    assert err <= TOL


def test_export_round_trip(of, ckpt, tmp_path):
    """load(to_open_flamingo(model)) is the same model, and open_flamingo's modules take the file
    with strict=False (the frozen decoder aside, every key of theirs it writes lands)."""
    model, tok, cfg = load(ckpt, ckpt.whole)
    to_open_flamingo(model, tmp_path / "plain" / "checkpoint.pt")
    with torch.no_grad():
        model.perceiver.frame_embs.normal_()  # furnace trains them: written when not zero
    to_open_flamingo(model, tmp_path / "checkpoint.pt")
    again, _, _ = load(ckpt, tmp_path / "checkpoint.pt")
    save_flamingo(again, tmp_path / "furnace", dataclasses.asdict(cfg))  # the written-back cfg describes it
    for other in (again, load_flamingo(tmp_path / "furnace")):
        a, b = model.state_dict(), other.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]

    written = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)
    ref = open_flamingo_model(of, ckpt.dir / "llama", ckpt.base)
    res = ref.load_state_dict(written, strict=False)
    assert not res.unexpected_keys
    assert not [k for k in res.missing_keys if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k]
    theirs = ref.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in written.items())
    assert all(torch.equal(theirs[k], v) for k, v in ckpt.ref.state_dict().items()
               if k.startswith("perceiver.") or "gated_cross" in k or "embed_tokens" in k or "lm_head" in k)


def test_bad_checkpoints_are_one_line_errors(ckpt, tmp_path):
    state = torch.load(ckpt.whole, weights_only=True)
    cases = {
        "no_perceiver": ({k: v for k, v in state.items() if not k.startswith("perceiver.")}, "lacks.*perceiver.latents"),
        "no_kv": ({k: v for k, v in state.items() if k != "perceiver.layers.1.0.to_kv.weight"},
                  r"lacks 1 open_flamingo keys.*perceiver\.layers\.1\.0\.to_kv\.weight"),
        "unknown": ({**state, "lang_encoder.transformer.wte.weight": torch.zeros(2)}, "no place for.*transformer.wte"),
        "object": (NotWeights(), "not a weights-only checkpoint"),
    }
    for name, (obj, match) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=match) as err:
            load(ckpt, tmp_path / f"{name}.pt")
        assert "\n" not in str(err.value), name
    cfg = furnace_cfg(ckpt)
    cfg.perceiver.heads = 2
    with pytest.raises(ValueError, match=r"perceiver\.layers\.0\.0\.to_q\.weight has 32 rows.*model.perceiver.heads"):
        load_open_flamingo(ckpt.whole, cfg, load_tokenizer(ckpt.dir / "llama"))
