"""A pretrained LM is built as its shape only and filled in per rank (furnace.parallel.materialize):
each rank reads only its tensor-parallel part of each checkpoint tensor, partitions it at once
under ZeRO-3, and fills only its own pipeline stage. The filled decoder equals transformers'
loading of the same folder, and every layout trains on it exactly as one process does."""
import pytest
import torch

from furnace.model import llama
from furnace.model.flamingo import FlamingoModel
from furnace.model.hf_io import WeightReader
from furnace.model.vision import vision_from_config
from furnace.parallel.materialize import load_pretrained_lm, load_pretrained_tower
from test_model_flamingo import tiny_cfg
from train_utils import lm_tokenizer, metrics, run, train_cmd

STEPS = 4


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A Llama in 20 safetensors shards (index included) whose vocabulary lacks <image> and
    <|endofchunk|> (new rows start at the embedding mean), its tokenizer, and a CLIP tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from furnace.data.synthetic import vocabulary

    w = tmp_path_factory.mktemp("pretrained")
    tok = lm_tokenizer(vocabulary())
    torch.manual_seed(0)
    # vocabulary + 1: an odd size, padded under tp 2
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 1, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64, tie_word_embeddings=False)
                     ).save_pretrained(w / "llama", max_shard_size="40KB")
    tok.save_pretrained(w / "llama")
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(w / "clip")
    assert len(list((w / "llama").glob("*.safetensors"))) > 2
    return w


def test_reader_reads_blocks_of_rows_and_columns(pretrained):
    r = WeightReader(pretrained / "llama")
    key = "model.layers.0.mlp.down_proj.weight"
    whole = r.read(key)
    assert list(whole.shape) == r.shape(key) == [64, 128]
    assert torch.equal(r.read(key, 0, 16, 48), whole[16:48])
    assert torch.equal(r.read(key, 1, 64, 128), whole[:, 64:])


def test_a_filled_decoder_and_tower_equal_the_whole_load(pretrained):
    """One rank, no ZeRO: the meta decoder and tower filled tensor by tensor equal llama.from_hf
    (whose logits tests/test_model_llama.py checks against transformers') and transformers'
    from_pretrained of the tower, new rows included."""
    from furnace.model.vision import vision_from_hf, vision_skeleton_from_hf

    cfg = tiny_cfg()
    vocab = llama.skeleton_from_hf(pretrained / "llama").cfg.vocab_size + 2  # <image>, <|endofchunk|>
    models = []
    for lm, tower in ((llama.from_hf(pretrained / "llama"), vision_from_hf(str(pretrained / "clip"))),
                      (llama.skeleton_from_hf(pretrained / "llama"), vision_skeleton_from_hf(str(pretrained / "clip")))):
        torch.manual_seed(0)
        m = FlamingoModel(lm, tower, cfg, vocab_size=vocab, image_token_id=vocab - 2, eoc_token_id=vocab - 1)
        models.append(m)
    whole, filled = models
    assert all(p.is_meta for p in filled.lm.parameters()) and all(p.is_meta for p in filled.vision.parameters())
    read = load_pretrained_lm(filled, str(pretrained / "llama"))
    assert read == sum(p.numel() * 4 for p in whole.lm.parameters())  # every tensor once, nothing more
    read = load_pretrained_tower(filled, str(pretrained / "clip"))
    assert read == sum(p.numel() * 4 for p in whole.vision.parameters())
    a, b = whole.state_dict(), filled.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not any(p.requires_grad for p in filled.vision.parameters())  # frozen as configured


def test_a_pipeline_stage_fills_only_its_own_modules(pretrained):
    cfg = tiny_cfg()
    lm = llama.skeleton_from_hf(pretrained / "llama")
    m = FlamingoModel(lm, vision_from_config(cfg.vision), cfg, vocab_size=lm.cfg.vocab_size + 2,
                      image_token_id=lm.cfg.vocab_size, eoc_token_id=lm.cfg.vocab_size + 1)
    mine = {id(p) for p in m.lm.layers[2].parameters()}
    load_pretrained_lm(m, str(pretrained / "llama"), keep=lambda p: id(p) in mine)
    assert not any(p.is_meta for p in m.lm.layers[2].parameters())
    assert all(p.is_meta for n, p in m.lm.named_parameters() if not n.startswith("layers.2."))


LAYOUTS = {
    "tp2_dp2_zero3": (4, ("parallel.tp=2", "parallel.zero_stage=3")),                      # tp cuts, partitioned as read
    "tp2_pp2_zero1": (4, ("parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1")),    # a stage's cuts only
}
RUNS: dict = {}


def _curve(pretrained, data, tmp_path_factory, name, nproc, *extra):
    if name not in RUNS:
        run_dir = tmp_path_factory.mktemp(name) / "run"
        sets = [f"model.lm.path={pretrained / 'llama'}", f"model.vision.path={pretrained / 'clip'}",
                "model.freeze_lm=false", "model.xattn.every=2", "model.xattn.gate_init=0.1", "data.tokenizer=null",
                f"train.max_steps={STEPS}", "train.save_every=0"]
        res = run(train_cmd(run_dir, data, *sets, *extra, nproc=nproc))
        assert res.returncode == 0, res.stderr[-4000:]
        RUNS[name] = [m["loss"] for m in metrics(run_dir) if "loss" in m]
        assert len(RUNS[name]) == STEPS
    return RUNS[name]


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_trains_the_pretrained_model_as_one_process_does(layout, pretrained, data, tmp_path_factory):
    """The LM trains too (freeze_lm=false), so every filled tensor reaches the loss curve."""
    ref = _curve(pretrained, data, tmp_path_factory, "ref", 1, "parallel.zero_stage=0")
    got = _curve(pretrained, data, tmp_path_factory, layout, LAYOUTS[layout][0], *LAYOUTS[layout][1])
    for step, (a, b) in enumerate(zip(ref, got), 1):
        assert abs(a - b) / abs(a) < 1e-5, (step, a, b)


def test_a_checkpoint_missing_a_tensor_or_safetensors_is_refused_naming_it(pretrained, tmp_path):
    import json
    import shutil

    lm_dir = tmp_path / "llama"
    shutil.copytree(pretrained / "llama", lm_dir)
    index = json.loads((lm_dir / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (lm_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    lm = llama.skeleton_from_hf(lm_dir)
    cfg = tiny_cfg()
    m = FlamingoModel(lm, vision_from_config(cfg.vision), cfg, vocab_size=lm.cfg.vocab_size + 2,
                      image_token_id=lm.cfg.vocab_size, eoc_token_id=lm.cfg.vocab_size + 1)
    with pytest.raises(ValueError, match=r"lacks \['model.layers.2.mlp.up_proj.weight'\]"):
        load_pretrained_lm(m, str(lm_dir))
    for f in lm_dir.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights in .*streaming needs model.safetensors"):
        WeightReader(lm_dir)


# ------------------------------------------------------------------ frozen LM and tower: export, resume

FROZEN = {
    "ref": (1, ("parallel.zero_stage=0",)),
    "tp2_zero3": (2, ("parallel.tp=2", "parallel.zero_stage=3")),  # frozen ZeRO-3 fragments, tp cuts of the vocabulary
    "tp2_pp2_zero1": (4, ("parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1")),  # per-layer files of each tp rank
}
FROZEN_RUNS: dict = {}


def _frozen_run(pretrained, data, tmp_path_factory, name):
    """Two steps with the LM and the tower frozen (only the resampler, xattn and new rows train),
    a checkpoint at step 2."""
    if name not in FROZEN_RUNS:
        run_dir = tmp_path_factory.mktemp(f"frozen-{name}") / "run"
        nproc, extra = FROZEN[name]
        sets = [f"model.lm.path={pretrained / 'llama'}", f"model.vision.path={pretrained / 'clip'}",
                "model.freeze_lm=true", "model.freeze_vision=true", "model.xattn.every=2", "model.xattn.gate_init=0.1",
                "data.tokenizer=null", "train.max_steps=2", "train.save_every=2"]
        res = run(train_cmd(run_dir, data, *sets, *extra, nproc=nproc))
        assert res.returncode == 0, res.stderr[-4000:]
        FROZEN_RUNS[name] = run_dir
    return FROZEN_RUNS[name]


@pytest.mark.multirank
def test_export_streams_every_layout_into_the_frozen_and_the_trained_weights(pretrained, data, tmp_path_factory,
                                                                            tmp_path):
    """The export (one tensor at a time from the layout's own files, no gathered copy) holds the
    pretrained LM and tower bit for bit, the same trained parts from both layouts, and an LM
    folder transformers loads with the new rows appended."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from furnace.export import export
    from furnace.model.flamingo_io import load_flamingo
    from furnace.model.hf_io import load_weights

    lm_w, tower_w = load_weights(pretrained / "llama"), load_weights(pretrained / "clip")
    trained = {}
    for layout in ("tp2_zero3", "tp2_pp2_zero1"):
        run_dir = _frozen_run(pretrained, data, tmp_path_factory, layout)
        assert not list(run_dir.glob("checkpoints/*/full_model.safetensors"))  # nothing gathered at save time
        res = export(run_dir, tmp_path / layout, max_shard_bytes=64 * 1024)
        shards = sorted((tmp_path / layout / "flamingo").glob("*.safetensors"))
        assert len(shards) > 2 and all(len(load_file(str(s))) for s in shards)
        got = load_flamingo(res["flamingo"]).state_dict()
        for key, value in lm_w.items():
            if key != "model.embed_tokens.weight":  # the frozen decoder, vocabulary padding trimmed
                assert torch.equal(got["lm." + key.removeprefix("model.")], value), (layout, key)
        assert torch.equal(got["lm.embed_tokens.weight"], lm_w["model.embed_tokens.weight"])
        for key, value in tower_w.items():
            assert torch.equal(got["vision.model." + key], value), (layout, key)
        trained[layout] = {k: v for k, v in got.items() if k.startswith(("perceiver.", "xattn.", "new_tokens."))}
        hf = AutoModelForCausalLM.from_pretrained(res["lm"])
        assert torch.equal(hf.get_input_embeddings().weight,
                           torch.cat([got["lm.embed_tokens.weight"], got["new_tokens.embed.weight"]]))
    a, b = trained.values()  # the trained parts agree between the layouts (test_parallel_parity: with 1 rank)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4), (k, (a[k] - b[k]).abs().max())


@pytest.mark.multirank
def test_a_frozen_lm_run_resumes_on_another_layout(pretrained, data, tmp_path_factory, tmp_path):
    """tp 2 with ZeRO-3 -> one process without ZeRO: the step after the checkpoint equals the
    1-rank run's own continuation (the frozen vocabulary has no merge rule to apply)."""
    import shutil

    from train_utils import losses

    steps = {}
    for layout in ("ref", "tp2_zero3"):
        run_dir = tmp_path / layout
        shutil.copytree(_frozen_run(pretrained, data, tmp_path_factory, layout), run_dir)
        sets = [f"model.lm.path={pretrained / 'llama'}", f"model.vision.path={pretrained / 'clip'}",
                "model.freeze_lm=true", "model.freeze_vision=true", "model.xattn.every=2", "model.xattn.gate_init=0.1",
                "data.tokenizer=null", "train.max_steps=3", "train.save_every=0", "parallel.zero_stage=0"]
        res = run(train_cmd(run_dir, data, *sets, nproc=1))
        assert res.returncode == 0, res.stderr[-4000:]
        steps[layout] = losses(run_dir)[3]
    assert abs(steps["ref"] - steps["tp2_zero3"]) / abs(steps["ref"]) < 1e-5, steps
