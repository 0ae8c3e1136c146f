"""The contrastive objective (`model.contrastive`, `train.contrastive_weight`): CLIP's loss as
transformers computes it, rows without an image left out, negatives gathered over data-parallel
ranks with the single process's loss and gradients, and train.py's loss curve under ZeRO-3 x DP,
ZeRO-3 x TP and PP equal to one process's on the same global micro-batch."""
import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from furnace.model.contrastive import info_nce
from furnace.training.distributed import free_port
from train_utils import metrics, run, train_cmd


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_is_clips_loss():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    image, text = _unit(6, 8, seed=0), _unit(6, 8, seed=1)
    scale = torch.tensor(14.3)
    want = image_text_contrastive_loss(scale * text @ image.t())
    got = info_nce(image, text, torch.ones(6, dtype=torch.bool), scale)
    torch.testing.assert_close(got, want)


def test_rows_without_an_image_are_neither_queries_nor_candidates():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    image, text = _unit(6, 8, seed=2), _unit(6, 8, seed=3)
    valid = torch.tensor([True, False, True, True, False, True])
    image.requires_grad_(True)
    got = info_nce(image, text, valid, torch.tensor(10.0))
    want = image_text_contrastive_loss(10.0 * text[valid] @ image[valid].t())
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.isfinite(image.grad).all() and image.grad[~valid].abs().max() == 0


# ------------------------------------------------------------------ negatives over 2 real ranks

def _entry(rank, world, port, errq):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        _gathered_matches_one_process(rank, world)
    except BaseException:
        errq.put(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def _gathered_matches_one_process(rank, world):
    """Each rank holds half of the rows; the loss the ranks' averaged gradients minimise, and those
    gradients, are the single process's over all rows (including a rank with an imageless row)."""
    from furnace.parallel.batch_gather import BatchGather

    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 8)
    image_in, text = torch.randn(8, 8), _unit(8, 8, seed=5)
    valid = torch.tensor([True, True, False, True, True, True, True, False])
    ref = proj(image_in)
    full = info_nce(F.normalize(ref, dim=-1), text, valid, torch.tensor(7.0))
    full.backward()
    want_grad = proj.weight.grad.clone()
    proj.weight.grad = None
    rows = slice(rank * 4, rank * 4 + 4)
    mine = info_nce(F.normalize(proj(image_in[rows]), dim=-1), text[rows], valid[rows], torch.tensor(7.0),
                    BatchGather(dist.group.WORLD))
    mine.backward()
    loss = mine.detach().clone()
    dist.all_reduce(loss)
    dist.all_reduce(proj.weight.grad)
    torch.testing.assert_close(loss / world, full.detach())
    torch.testing.assert_close(proj.weight.grad / world, want_grad)  # data parallelism averages gradients


@pytest.mark.multirank
def test_negatives_gathered_over_ranks_give_the_single_process_loss_and_gradients():
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    mp.spawn(_entry, args=(2, free_port(), errq), nprocs=2, join=True)
    assert errq.empty(), errq.get()


# ------------------------------------------------------------------ train.py on each layout

STEPS = 4
ON = ("model.contrastive.dim=32", "train.contrastive_weight=0.5", "model.xattn.gate_init=0.1",
      f"train.max_steps={STEPS}", "train.save_every=0", "train.global_batch_size=8")
# The loader's micro-batches depend on their size (canonical streams, docs/data.md): a layout
# matches one process at the same micro-batch size. Data parallelism changes the objective itself
# (each rank's rows see the other ranks' as negatives), so ZeRO-3 x DP 2 is held to DP 2 without
# ZeRO; the gather alone is held to one process above.
LAYOUTS = {"ref": (1, ("parallel.zero_stage=0", "train.micro_batch_size=8")),
           "tp2_zero3": (2, ("parallel.tp=2", "parallel.zero_stage=3", "train.micro_batch_size=8")),
           "pp2_zero1": (2, ("parallel.pp=2", "parallel.zero_stage=1", "train.micro_batch_size=8")),
           "dp2_zero0": (2, ("parallel.zero_stage=0", "train.micro_batch_size=4")),
           "dp2_zero3": (2, ("parallel.zero_stage=3", "train.micro_batch_size=4"))}
REFERENCE = {"tp2_zero3": "ref", "pp2_zero1": "ref", "dp2_zero3": "dp2_zero0"}
RUNS: dict = {}


def _train(data, tmp_path_factory, name, extra=ON):
    key = (name, extra)
    if key not in RUNS:
        nproc, layout = LAYOUTS[name]
        run_dir = tmp_path_factory.mktemp(f"contrastive-{name}") / "run"
        res = run(train_cmd(run_dir, data, *extra, *layout, nproc=nproc))
        assert res.returncode == 0, res.stderr[-4000:]
        RUNS[key] = [m for m in metrics(run_dir) if "loss" in m]
    recs = RUNS[key]
    assert [m["step"] for m in recs] == list(range(1, STEPS + 1))
    return recs


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["dp2_zero3", "tp2_zero3", "pp2_zero1"])
def test_each_layout_trains_the_contrastive_objective_as_its_reference(data, tmp_path_factory, layout):
    """Loss (LM + weighted InfoNCE) and gradient norm per step: tensor and pipeline parallelism
    equal one process; ZeRO-3 x DP 2 equals plain DP 2, both gathering the negatives."""
    ref = _train(data, tmp_path_factory, REFERENCE[layout])
    got = _train(data, tmp_path_factory, layout)
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]


@pytest.mark.multirank
def test_the_weighted_term_is_in_the_loss(data, tmp_path_factory):
    """The same run without the contrastive term logs a different (lower: InfoNCE over 8 rows
    starts near ln 8) first loss: the term reaches the optimised loss."""
    with_term = _train(data, tmp_path_factory, "ref")
    without = _train(data, tmp_path_factory, "ref", extra=tuple(s for s in ON if "contrastive" not in s))
    assert with_term[0]["loss"] - without[0]["loss"] == pytest.approx(0.5 * torch.log(torch.tensor(8.0)).item(),
                                                                      abs=0.3)


@pytest.mark.parametrize("sets,needle", [
    (["train.contrastive_weight=0.1"], "model.contrastive.dim=256"),
    (["model.contrastive.dim=16"], "train.contrastive_weight=0.1"),
    (["model.contrastive.dim=16", "train.contrastive_weight=0.1", "data.pack=true"], "data.pack=false"),
])
def test_config_errors_name_the_fix(sets, needle):
    from furnace.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(load_config("demo", sets), 1)


# ------------------------------------------------------------------ retrieval by the embeddings

def test_retrieval_ranks_by_the_contrastive_embeddings(tmp_path):
    """furnace-eval retrieval on a model with contrastive heads (no shots) scores each image and
    caption by the cosine of their embeddings, the caption written as training writes a sample;
    with shots it falls back to the captions' log-likelihood."""
    import dataclasses
    import json

    from furnace.config import load_config
    from furnace.data.synthetic import demo_tokenizer, draw_sample, sample_rng
    from furnace.data.text import TextEncoder
    from furnace.eval.scoring import ModelScorer
    from furnace.evaluate import main
    from furnace.model.flamingo_io import save_flamingo
    from furnace.training.build import build_model
    from train_utils import TINY

    cfg = load_config("demo", [s for s in TINY if s.startswith("model.")] + ["model.contrastive.dim=16"])
    tok = demo_tokenizer()
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    save_flamingo(model, tmp_path / "model", dataclasses.asdict(cfg.model))
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    imgs, anns = [], []
    for i in range(6):
        img, cap = draw_sample(sample_rng(0, "contrastive", i), 32)
        img.save(tmp_path / "images" / f"{i}.png")
        imgs.append({"id": i, "file_name": f"{i}.png"})
        anns.append({"image_id": i, "id": i, "caption": cap})
    (tmp_path / "captions.json").write_text(json.dumps({"images": imgs, "annotations": anns}))

    def report(*extra):
        out = tmp_path / f"out{len(extra)}"
        assert main(["retrieval", "--model", str(tmp_path / "model"), "--annotations", str(tmp_path / "captions.json"),
                     "--images", str(tmp_path / "images"), "--out", str(out), "--no-meteor", *extra]) == 0
        return json.loads((out / "report.json").read_text())

    rep = report()
    assert rep["results"]["0"]["ranking"] == "contrastive embeddings"
    scorer, text = ModelScorer(model, tok, "cpu"), TextEncoder(tok, max_length=64, max_images=1)
    with torch.no_grad():
        img = torch.cat([model.image_embeddings(scorer.images([[tmp_path / "images" / f"{i}.png"]]),
                                                torch.ones(1, 1, dtype=torch.bool)) for i in range(6)])
        txt = torch.cat([model.text_embeddings(torch.tensor([text.caption(a["caption"])])) for a in anns])
    got = torch.tensor([r["scores"] for r in rep["samples"]["0"]])
    torch.testing.assert_close(got, img @ txt.t(), atol=1e-5, rtol=0)
    assert report("--ranking", "likelihood")["results"]["0"]["ranking"] == "caption log-likelihood"
