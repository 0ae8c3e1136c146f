"""`model.start_from`: a run starts with a pretrained Flamingo's resampler, xattn blocks and new
token rows, in the source's shapes, on every layout (each rank writes its tensor-parallel cut,
ZeRO-3 partitions through DeepSpeed's gather); open_flamingo's checkpoint.pt likewise; a source
that does not fit is refused in one line before training."""
import dataclasses

import pytest
import torch

from train_utils import TINY, run, tiny_pretrained, train_cmd

pytestmark = pytest.mark.multirank


def _source(tmp_path_factory, tokenizer=None, **over):
    """A saved Flamingo whose resampler (6 latents, depth 2: not the run's preset shapes) and
    xattn blocks are not what a run would draw."""
    from furnace.config import load_config
    from furnace.data.synthetic import demo_tokenizer
    from furnace.model.flamingo_io import save_flamingo
    from furnace.training.build import build_model

    cfg = load_config("demo", [s for s in TINY if s.startswith("model.")]
                      + ["model.perceiver.num_latents=6", "model.perceiver.depth=2", "model.xattn.gate_init=0.3",
                         *(f"{k}={v}" for k, v in over.items())])
    tok = tokenizer or demo_tokenizer()
    torch.manual_seed(123)
    model = build_model(cfg, tok)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path_factory.mktemp("start") / "flamingo"
    save_flamingo(model, out, dataclasses.asdict(cfg.model))
    tok.save_pretrained(out)
    return out, {n: p.detach().clone() for n, p in model.named_parameters()}


def _started(run_dir, tmp_path, name):
    from furnace.export import export
    from furnace.model.hf_io import WeightReader

    res = export(run_dir, tmp_path / name, progress=False)
    reader = WeightReader(res["flamingo"])
    return {n: reader.read(n) for n in reader.names()}


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.zero_stage=3"],
                                    ["parallel.pp=2", "parallel.zero_stage=1"]], ids=["tp2_zero3", "pp2"])
def test_a_run_starts_from_an_export_on_every_layout(data, tmp_path_factory, tmp_path, layout):
    """A scratch model continued (no model.lm.path / model.vision.path): its LM and tower are the
    source's too."""
    source, want = _source(tmp_path_factory)
    run_dir = tmp_path / "run"
    # lr 0: the first step leaves every weight as it started
    res = run(train_cmd(run_dir, data, f"model.start_from={source}", "train.max_steps=1", "train.lr=0",
                        "model.perceiver.num_latents=4", *layout))
    assert res.returncode == 0, res.stderr[-3000:]
    got = _started(run_dir, tmp_path, "export")
    assert got["perceiver.latents"].shape == (6, 32)  # the source's shapes, not the preset's
    for n, t in want.items():
        torch.testing.assert_close(got[n], t, atol=0, rtol=0, msg=n)


def test_a_run_starts_from_open_flamingos_checkpoint(data, tmp_path_factory, tmp_path):
    """A frozen pretrained LM and tower, the xattn blocks, resampler and new token rows from a
    checkpoint.pt in open_flamingo's names (written by to_open_flamingo)."""
    from furnace.model.flamingo_io import load_flamingo
    from furnace.model.open_flamingo_io import to_open_flamingo

    from furnace.data.tokenizer import load_tokenizer

    w = tiny_pretrained(tmp_path_factory.mktemp("of"))
    paths = {"model.lm.path": w / "llama", "model.vision.path": w / "clip"}
    source, _ = _source(tmp_path_factory, tokenizer=load_tokenizer(w / "llama"), **paths)
    model = load_flamingo(source)
    to_open_flamingo(model, w / "checkpoint.pt")
    run_dir = tmp_path / "run"
    res = run(train_cmd(run_dir, data, f"model.start_from={w / 'checkpoint.pt'}", "train.max_steps=1", "train.lr=0",
                        *(f"{k}={v}" for k, v in paths.items()), "data.tokenizer=" + str(w / "llama"),
                        "parallel.zero_stage=0", nproc=1))  # the layouts: the test above
    assert res.returncode == 0, res.stderr[-3000:]
    got = _started(run_dir, tmp_path, "export")
    for n, t in model.named_parameters():
        if n.startswith(("perceiver.", "xattn.", "new_tokens.")) or n == "lm.embed_tokens.weight":
            torch.testing.assert_close(got[n], t.detach(), atol=0, rtol=0, msg=n)


def test_a_source_that_does_not_fit_is_refused_in_one_line(data, tmp_path_factory, tmp_path):
    from furnace.data.tokenizer import load_tokenizer

    w = tiny_pretrained(tmp_path_factory.mktemp("fit"))  # its LM is 64 wide
    # a scratch model 32 wide, its specials rows of its own: no new rows, xattn for a narrower LM
    source, _ = _source(tmp_path_factory, tokenizer=load_tokenizer(w / "llama"), **{"model.lm.hidden_size": 32})
    res = run(train_cmd(tmp_path / "run", data, f"model.start_from={source}", "train.max_steps=1",
                        f"model.lm.path={w / 'llama'}", f"data.tokenizer={w / 'llama'}", nproc=1))
    assert res.returncode != 0
    line = next(x for x in res.stderr.splitlines() if "model.start_from=" in x)
    assert "lacks ['new_tokens.embed.weight'" in line and "start from a model with the same parts" in line, line
    res = run(train_cmd(tmp_path / "run2", data, f"model.start_from={tmp_path}", "train.max_steps=1", nproc=1))
    assert res.returncode != 0 and "neither a furnace export folder" in res.stderr, res.stderr[-2000:]


def test_what_a_run_adds_to_its_source_starts_as_drawn_or_as_the_source_holds_it(data, tmp_path_factory, tmp_path):
    """LoRA adapters and contrastive heads a source lacks start as drawn, and rank 0 says so;
    contrastive heads it holds are its own, in its shapes (16 wide, not the run's 8)."""
    plain, _ = _source(tmp_path_factory)
    adds = ("train.max_steps=1", "train.lr=0", "model.contrastive.dim=8", "train.contrastive_weight=0.1")
    res = run(train_cmd(tmp_path / "a", data, f"model.start_from={plain}", *adds, "model.freeze_lm=true",
                        "model.lora.rank=2", nproc=1))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "holds no LoRA adapters, contrastive heads: they start as drawn" in res.stdout + res.stderr
    heads, want = _source(tmp_path_factory, **{"model.contrastive.dim": 16})
    res = run(train_cmd(tmp_path / "b", data, f"model.start_from={heads}", *adds, nproc=1))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "start as drawn" not in res.stdout + res.stderr
    got = _started(tmp_path / "b", tmp_path, "export")
    names = [n for n in want if n.startswith("contrastive.")]
    assert names and got["contrastive.image_proj.weight"].shape[0] == 16
    for n in names:
        torch.testing.assert_close(got[n], want[n], atol=0, rtol=0, msg=n)
