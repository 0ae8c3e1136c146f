"""Resharding's two halves against each other, in one process: furnace's tensor-parallel cut of
every parameter (`tp_shard`, what a rank loads) and DeepSpeed's own merge of those cuts
(`ds_to_universal.merge_tp_slices`, run with the patterns furnace hands it) give back the full
tensor, for plain and pipeline names, tied and untied embeddings, and a vocabulary that needs
padding. The end-to-end resumes on other layouts are in tests/test_parallel_parity.py."""
import pytest
import torch

from furnace.parallel.apply import tp_shard, tp_split_dim
from furnace.parallel.pipeline import pipeline_param_names
from furnace.training.reshard import merge_info, saved_names
from test_model_flamingo import make_model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model(request):
    torch.manual_seed(0)
    m = make_model(lm_vocab=57, **{"lm.tie_word_embeddings": request.param})  # 57: padded at tp 2 and 4
    assert any(n.startswith("vision.") and n.split(".")[-2] in ("fc1", "fc2", "q_proj") for n, _ in
               m.named_parameters()), "the vision tower must share leaf names with sharded modules"
    return m


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shards_put_back_together_are_the_parameter(model, tp):
    for name, p in model.named_parameters():
        parts = [tp_shard(p.data, name, r, tp) for r in range(tp)]
        dim = tp_split_dim(name)
        if dim is None:
            assert all(torch.equal(x, p.data) for x in parts), name
            continue
        assert len({x.shape for x in parts}) == 1, name  # every rank the same shape (padding included)
        whole = torch.cat(parts, dim=dim)[: p.shape[0]] if dim == 0 else torch.cat(parts, dim=dim)
        assert torch.equal(whole, p.data), name


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipeline"])
def test_deepspeed_merges_furnace_cuts_into_the_parameter(model, pipeline, tmp_path):
    """Each parameter's tp 2 cuts written as ds_to_universal's fragments; its merge, with
    furnace's patterns (vision tower replicated though it has fc1/q_proj leaves, row-parallel
    on dim 1, the vocabulary's padding trimmed), returns the full tensor for every state."""
    from deepspeed.checkpoint.ds_to_universal import merge_tp_slices

    tp = 2
    names = saved_names(model, 2 if pipeline else 1)
    info = merge_info(model.base_vocab)
    slices, out = tmp_path / "tmp", tmp_path / "zero"
    for name, p in model.named_parameters():
        saved = names[name]
        shapes = []
        for r in range(tp):
            (slices / saved / str(r)).mkdir(parents=True)
            cut = tp_shard(p.data, name, r, tp)
            shapes.append(cut.shape)
            for state, scale in (("fp32", 1.0), ("exp_avg", 2.0), ("exp_avg_sq", 3.0)):
                torch.save((cut * scale).flatten().clone(), slices / saved / str(r) / f"{state}.00")
        merge_tp_slices(info, str(out), str(slices), tp, (saved, shapes))
        for state, scale in (("fp32", 1.0), ("exp_avg", 2.0), ("exp_avg_sq", 3.0)):
            got = torch.load(out / saved / f"{state}.pt", weights_only=False)["param"]
            assert torch.equal(got, p.data * scale), (saved, state)


def test_pipeline_names_cover_every_parameter_once(model):
    names = pipeline_param_names(model)
    mapped = sorted(set(names.values()))
    assert mapped == sorted(n for n, _ in model.named_parameters())
    assert all(k.split(".")[0].isdigit() or k.startswith("tied_modules.embed.") for k in names)


def test_a_zero0_checkpoint_that_does_not_fit_the_model_is_refused_in_one_line(model, tmp_path):
    """A ZeRO-0 optimizer state with other parameter groups than this model's (another model,
    or DeepSpeed's fused fp16 flat groups) is refused by name, before anything is written."""
    from furnace.training.checkpoint import CheckpointError
    from furnace.training.reshard import convert_plain

    tag = tmp_path / "step00000003"
    tag.mkdir()
    n = sum(1 for p in model.parameters() if p.requires_grad)
    for optimizer in ({"state": {}, "param_groups": [{"params": list(range(n - 1))}]},   # one parameter short
                      {"fp32_groups_flat": [torch.zeros(3)], "state": {}, "param_groups": []}):
        torch.save({"module": {}, "optimizer": optimizer}, tag / "mp_rank_00_model_states.pt")
        with pytest.raises(CheckpointError, match="step00000003 holds a ZeRO-0 optimizer state furnace cannot map") as e:
            convert_plain(tag, tmp_path / "out", model)
        assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
