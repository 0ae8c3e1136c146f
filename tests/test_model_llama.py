"""furnace's Llama-family decoder against transformers on tiny random checkpoints."""
import dataclasses
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from furnace.model import llama

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {
    "llama2": (LlamaConfig, LlamaForCausalLM, {}),
    "llama3": (LlamaConfig, LlamaForCausalLM, {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE,
                                               "tie_word_embeddings": True}),
    "llama-bias": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 512}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen2-untied": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": False}),
}


def _hf(name, tmp_path):
    cfg_cls, model_cls, extra = CASES[name]
    hf = model_cls(cfg_cls(**SMALL, **extra)).eval()
    with torch.no_grad():  # HF zero-inits biases; give them values so they are really tested
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(std=0.1)
    path = tmp_path / name
    hf.save_pretrained(path)
    return hf, path


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_and_export_roundtrips(name, tmp_path):
    hf, path = _hf(name, tmp_path)
    model = llama.from_hf(path).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 48))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4

    llama.to_hf(model, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max().item() <= 1e-4


def test_llama3_rope_scaling_is_applied(tmp_path):
    _, path = _hf("llama3", tmp_path)
    scaled = llama.from_hf(path)
    plain = llama.rope_inv_freq(dataclasses.replace(scaled.cfg, rope_scaling=None))
    assert not torch.allclose(scaled.inv_freq, plain)  # the low frequencies were slowed down


def test_sharded_checkpoint_loads(tmp_path):
    hf, path = _hf("llama2", tmp_path)
    model = llama.from_hf(path)
    llama.to_hf(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = llama.from_hf(tmp_path / "sharded")
    ids = torch.randint(0, SMALL["vocab_size"], (1, 16))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
        assert (hf(ids).logits - again(ids)).abs().max() <= 1e-4


def test_segments_isolate_packed_documents(tmp_path):
    _, path = _hf("llama2", tmp_path)
    model = llama.from_hf(path).eval()
    a, b = torch.randint(0, 97, (1, 10)), torch.randint(0, 97, (1, 7))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[1] * 10 + [2] * 7])
    pos = torch.cat([torch.arange(10), torch.arange(7)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=pos, segment_ids=seg)
        assert (out[:, :10] - model(a)).abs().max() <= 1e-5
        assert (out[:, 10:] - model(b)).abs().max() <= 1e-5


def test_unsupported_architecture_is_one_clear_line(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError) as e:
        llama.from_hf(tmp_path / "gpt2")
    msg = str(e.value)
    assert "\n" not in msg and "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert arch in msg


def test_missing_checkpoint_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        llama.from_hf(tmp_path / "nope")


def test_sliding_window_overflow_is_refused(tmp_path):
    cfg_cls, model_cls, _ = CASES["mistral"]
    model_cls(cfg_cls(**SMALL, sliding_window=8)).save_pretrained(tmp_path / "m")
    model = llama.from_hf(tmp_path / "m")
    with pytest.raises(ValueError, match="sliding_window"):
        model(torch.randint(0, 97, (1, 9)))
