"""LoRA adapters on the frozen LM (model.lora): the merged export is the adapted decoder, peft
applies the exported adapter folder as furnace does, tensor parallelism (ZeRO-3 x TP 2) trains
as one process does, and only the adapters, the resampler, the xattn blocks (and new token
rows) hold optimizer state."""
import dataclasses
import json

import pytest
import torch

from furnace.config import ConfigError, load_config, validate
from furnace.model import llama
from furnace.model.flamingo import FlamingoModel, build_flamingo
from furnace.model.flamingo_io import save_flamingo, write_lm, write_peft_adapter
from furnace.model.hf_io import WeightReader
from furnace.model.lora import LoraLinear, is_adapter, merged_state_dict
from furnace.model.vision import vision_from_config
from test_model_flamingo import tiny_cfg
from train_utils import metrics, run, tiny_pretrained, train_cmd

ALL = ["q", "k", "v", "o", "gate", "up", "down"]
STEPS = 4


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-layer Llama whose vocabulary lacks <image> and <|endofchunk|>, its tokenizer, a CLIP tower."""
    return tiny_pretrained(tmp_path_factory.mktemp("lora-pretrained"))


def _cfg(pretrained, targets, rank=4):
    return tiny_cfg(**{"lm.path": str(pretrained / "llama"), "freeze_lm": True, "freeze_vision": True,
                       "lora.rank": rank, "lora.targets": targets, "lora.alpha": 8.0})


def _model(pretrained, targets, rank=4) -> FlamingoModel:
    vocab = llama.skeleton_from_hf(pretrained / "llama").cfg.vocab_size + 2
    torch.manual_seed(0)
    cfg = _cfg(pretrained, targets, rank)
    model = build_flamingo(cfg, vocab_size=vocab, image_token_id=vocab - 2, eoc_token_id=vocab - 1).eval()
    model.model_config = dataclasses.asdict(cfg)  # what save_flamingo records
    return model


@pytest.fixture(scope="module", params=[ALL, ["q", "v", "down"]], ids=["all", "q-v-down"])
def adapted(request, pretrained):
    """(model, its LM's logits on `ids`, ids): random non-zero A and B on the targeted linears."""
    model = _model(pretrained, request.param)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_adapter(n):
                p.normal_(std=0.1)
    ids = torch.randint(0, model.base_vocab, (2, 16))
    with torch.no_grad():
        want = model.lm(ids)
    return model, want, ids


def _hf_logits(hf, ids, vocab):
    with torch.no_grad():
        return hf(ids).logits[..., :vocab]


def test_adapters_start_as_the_frozen_lm_and_leave_the_other_weights_as_drawn(pretrained):
    """B = 0: at step 0 the model is the pretrained LM; the adapters are drawn after everything
    else, so every other weight is the run's without LoRA; names as peft's, base names kept."""
    plain, lora = _model(pretrained, ALL, rank=0), _model(pretrained, ALL)
    base = {n: p for n, p in lora.named_parameters() if not is_adapter(n)}
    assert base.keys() == dict(plain.named_parameters()).keys()
    assert all(torch.equal(p, base[n]) for n, p in plain.named_parameters())
    adapters = {n: p for n, p in lora.named_parameters() if is_adapter(n)}
    assert sorted(adapters) == sorted(f"lm.layers.{i}.{part}.{leaf}.{ab}.weight" for i in range(2)
                                      for part, leaf in (("self_attn", "q_proj"), ("self_attn", "k_proj"),
                                                         ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                                                         ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
                                      for ab in ("lora_A", "lora_B"))
    assert all(p.requires_grad for p in adapters.values())
    assert not any(p.requires_grad for n, p in lora.lm.named_parameters() if not is_adapter(n))
    assert all(adapters[n].abs().sum() == 0 for n in adapters if "lora_B" in n)
    ids = torch.randint(0, lora.base_vocab, (2, 16))
    with torch.no_grad():
        assert torch.equal(lora.lm(ids), plain.lm(ids))


def test_a_meta_decoder_gets_real_adapters_and_is_filled_from_the_checkpoint(pretrained):
    """The pretrained path (`build`): the decoder is a meta shape, the adapters are drawn for real
    and are not looked for in the LM's checkpoint."""
    from furnace.parallel.materialize import load_pretrained_lm

    cfg = _cfg(pretrained, ALL)
    lm = llama.skeleton_from_hf(pretrained / "llama")
    torch.manual_seed(0)
    m = FlamingoModel(lm, vision_from_config(cfg.vision), cfg, vocab_size=lm.cfg.vocab_size + 2,
                      image_token_id=lm.cfg.vocab_size, eoc_token_id=lm.cfg.vocab_size + 1)
    assert all(p.is_meta != is_adapter(n) for n, p in m.lm.named_parameters())
    load_pretrained_lm(m, str(pretrained / "llama"))
    whole = _model(pretrained, ALL)
    assert all(torch.equal(p, dict(whole.lm.named_parameters())[n]) for n, p in m.lm.named_parameters())


def test_merged_export_is_the_adapted_lm(adapted, tmp_path):
    """merged_state_dict in memory and write_lm's streamed merge give transformers a plain decoder
    with the adapted LM's logits."""
    model, want, ids = adapted
    plain = llama.Llama(model.lm.cfg)
    plain.load_state_dict(merged_state_dict(model.lm))
    with torch.no_grad():
        merged = plain(ids)
    assert (merged - want).abs().max() <= 1e-5

    from transformers import AutoModelForCausalLM

    save_flamingo(model, tmp_path / "flamingo", model.model_config)
    write_lm(tmp_path / "flamingo", tmp_path / "lm")
    assert not any("lora" in n for n in WeightReader(tmp_path / "lm").names())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    diff = (_hf_logits(hf, ids, model.base_vocab) - want).abs().max()
    assert diff <= 1e-5, diff


def test_peft_applies_the_adapter_folder_as_furnace_does(adapted, tmp_path):
    """--lora peft: the base decoder plus adapter_config.json / adapter_model.safetensors in peft's
    names; peft.PeftModel.from_pretrained over transformers' decoder gives furnace's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, want, ids = adapted
    save_flamingo(model, tmp_path / "flamingo", model.model_config)
    write_lm(tmp_path / "flamingo", tmp_path / "lm", lora="peft")
    write_peft_adapter(tmp_path / "flamingo", tmp_path / "lora", base_model=str(tmp_path / "lm"))
    conf = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    targets = [m.split(".")[-1] for m, mod in model.lm.named_modules() if isinstance(mod, LoraLinear)]
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["r"] == 4
    assert conf["lora_alpha"] == 8.0 and sorted(conf["target_modules"]) == sorted(set(targets))
    keys = WeightReader.of_file(tmp_path / "lora" / "adapter_model.safetensors").names()
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert len(keys) == 2 * len(targets)

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert (_hf_logits(base, ids, model.base_vocab) - want).abs().max() > 1e-2  # the adapters matter
    peft_model = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    diff = (_hf_logits(peft_model, ids, model.base_vocab) - want).abs().max()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("sets,needle", [
    (["model.lora.rank=4"], "model.lora.rank=4 adapts a frozen LM but model.freeze_lm=false"),
    (["model.lora.rank=-1"], "model.lora.rank must be >= 0; got -1"),
    (["model.lora.alpha=0"], "model.lora.alpha must be finite and > 0; got 0.0"),
    (["model.lora.dropout=1"], "model.lora.dropout must be at least 0 and below 1; got 1.0"),
    (["model.lora.targets=q,qkv"], "model.lora.targets must be a non-empty list of distinct names from q, k, v, o, "
                                   "gate, up, down; got ['q', 'qkv']"),
    (["model.lora.targets=[]"], "model.lora.targets must be a non-empty list"),
])
def test_config_errors_are_one_line_naming_the_fix(sets, needle):
    cfg = load_config("demo", sets)
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1, check_paths=False)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and "--set" in msg, msg


def test_targets_read_from_set_and_yaml_lists():
    assert load_config("demo", ["model.lora.targets=q, v,down"]).model.lora.targets == ["q", "v", "down"]
    assert load_config("demo", ["model.lora.targets=[gate, up]"]).model.lora.targets == ["gate", "up"]
    with pytest.raises(ConfigError, match=r"^--set model.lora.targets: expected a list of names, got \{a: 1\}"):
        load_config("demo", ["model.lora.targets={a: 1}"])


def test_tensor_parallel_cuts_of_the_adapters_merge_back(pretrained, tmp_path):
    """tp_split_dim / tp_shard (what a rank holds) and DeepSpeed's merge with furnace's patterns
    (what resharding and export read): column linears split lora_B by rows, row linears lora_A by
    columns, the other factor whole."""
    from deepspeed.checkpoint.ds_to_universal import merge_tp_slices

    from furnace.parallel.apply import tp_shard, tp_split_dim
    from furnace.training.reshard import merge_info

    model = _model(pretrained, ALL)
    info = merge_info(model.base_vocab)
    want = {"q_proj": (None, 0), "k_proj": (None, 0), "v_proj": (None, 0), "gate_proj": (None, 0),
            "up_proj": (None, 0), "o_proj": (1, None), "down_proj": (1, None)}
    for name, p in model.named_parameters():
        if not is_adapter(name):
            continue
        leaf, ab = name.split(".")[-3:-1]
        assert tp_split_dim(name) == want[leaf][ab == "lora_B"], name
        with torch.no_grad():
            p.normal_()
        for r in range(2):
            (tmp_path / "tmp" / name / str(r)).mkdir(parents=True)
            for state in ("fp32", "exp_avg", "exp_avg_sq"):  # merge_tp_slices merges all three
                cut = tp_shard(p.data, name, r, 2).flatten().clone()
                torch.save(cut, tmp_path / "tmp" / name / str(r) / f"{state}.00")
        merge_tp_slices(info, str(tmp_path / "zero"), str(tmp_path / "tmp"), 2,
                        (name, [tp_shard(p.data, name, r, 2).shape for r in range(2)]))
        got = torch.load(tmp_path / "zero" / name / "fp32.pt", weights_only=False)["param"]
        assert torch.equal(got, p.data), name


# ------------------------------------------------------------------ train.py: TP 2 x ZeRO-3 against one process

RUNS: dict = {}
LAYOUTS = {"ref": (1, ("parallel.zero_stage=0",)), "tp2_zero3": (2, ("parallel.tp=2", "parallel.zero_stage=3"))}


def _run(pretrained, data, tmp_path_factory, name):
    if name not in RUNS:
        nproc, extra = LAYOUTS[name]
        run_dir = tmp_path_factory.mktemp(f"lora-{name}") / "run"
        sets = [f"model.lm.path={pretrained / 'llama'}", f"model.vision.path={pretrained / 'clip'}",
                "model.freeze_lm=true", "model.freeze_vision=true", "model.xattn.every=2", "model.xattn.gate_init=0.1",
                "model.lora.rank=4", f"model.lora.targets={','.join(ALL)}", "data.tokenizer=null",
                f"train.max_steps={STEPS}", "train.save_every=0"]
        res = run(train_cmd(run_dir, data, *sets, *extra, nproc=nproc))
        assert res.returncode == 0, res.stderr[-4000:]
        RUNS[name] = run_dir
    recs = [m for m in metrics(RUNS[name]) if "loss" in m]
    assert [m["step"] for m in recs] == list(range(1, STEPS + 1))
    return RUNS[name], recs


@pytest.mark.multirank
def test_tp2_zero3_trains_the_adapters_as_one_process_does(pretrained, data, tmp_path_factory):
    """The loss curve and the gradient norm (the adapters' gradients under the TP cuts) of
    ZeRO-3 x TP 2 equal the single process's; the loss goes down."""
    _, ref = _run(pretrained, data, tmp_path_factory, "ref")
    _, got = _run(pretrained, data, tmp_path_factory, "tp2_zero3")
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
    assert got[-1]["loss"] < got[0]["loss"] - 0.05


@pytest.mark.multirank
def test_only_adapters_resampler_and_xattn_have_optimizer_state_and_the_export_is_the_run(pretrained, data,
                                                                                         tmp_path_factory, tmp_path):
    """ZeRO-3 x TP 2: the optimizer holds the adapters (in their TP cuts), the resampler, the
    xattn blocks and the new token rows, nothing of the frozen LM or tower. Its export (TP cuts
    joined) has the single process's adapters; the frozen weights are the checkpoint's bit for
    bit; the peft folder over the base LM gives the merged LM's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from furnace.export import export
    from furnace.model.flamingo_io import load_flamingo
    from furnace.training.safe_load import safe_load

    ref_dir, _ = _run(pretrained, data, tmp_path_factory, "ref")
    run_dir, _ = _run(pretrained, data, tmp_path_factory, "tp2_zero3")
    tag = run_dir / "checkpoints" / f"step{STEPS:08d}"
    for t in range(2):
        states = safe_load(tag / f"zero_pp_rank_0_mp_rank_{t:02d}_model_states.pt", map_location="cpu")
        shapes = {n: s for group in states["param_shapes"] for n, s in group.items()}
        assert all(is_adapter(n) or n.startswith(("perceiver.", "xattn.", "new_tokens.")) for n in shapes), shapes
        assert sum(is_adapter(n) for n in shapes) == 2 * 7 * 2
        assert shapes["lm.layers.0.self_attn.q_proj.lora_B.weight"] == (64 // 2, 4)   # split like q_proj's rows
        assert shapes["lm.layers.0.mlp.down_proj.lora_A.weight"] == (4, 128 // 2)     # ... like down_proj's columns

    got = export(run_dir, tmp_path / "tp2", lora="peft")
    want = export(ref_dir, tmp_path / "ref")  # merged
    a, b = load_flamingo(want["flamingo"]).state_dict(), load_flamingo(got["flamingo"]).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert any(b[k].abs().sum() > 0 for k in b if k.endswith("lora_B.weight"))  # the adapters trained
    hf = WeightReader(pretrained / "llama")
    base = WeightReader(got["lm"])
    for k in hf.names():
        if k not in ("model.embed_tokens.weight", "lm_head.weight"):  # those gained the new rows
            assert torch.equal(hf.read(k), base.read(k)), k

    ids = torch.randint(0, 19, (2, 12))
    merged = AutoModelForCausalLM.from_pretrained(want["lm"]).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(got["lm"]).eval(), got["lora"]).eval()
    with torch.no_grad():
        diff = (merged(ids).logits - peft_model(ids).logits).abs().max()
    assert diff <= 1e-4, diff
