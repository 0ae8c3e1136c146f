"""furnace-eval: the caption path on 2 CPU ranks against 1 rank and against pycocoevalcap run
on the files it writes; likelihood scoring against one full forward per (image, text); ranking
metrics on hand-made cases; bad sets and flags fail in one line or are counted."""
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from furnace.eval.prompts import draw_demonstrations, query
from furnace.eval.ranking import retrieval_recall, top_k_accuracy
from furnace.evaluate import main
from train_utils import TINY, env

pytestmark = pytest.mark.multirank


def _amplified_model(cfg, tokenizer):
    """A tiny random model whose captions depend on the image: open gates, loud xattn outputs."""
    from furnace.training.build import build_model

    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).eval()
    with torch.no_grad():
        for b in model.xattn:
            b.attn_gate.fill_(1.0)
            b.ff_gate.fill_(1.0)
            b.attn.to_out.weight.mul_(30)
            b.ff.fc2.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def evalset(tmp_path_factory):
    """An exported model and, for its 10 images, COCO captions, VQAv2 files and class folders."""
    from furnace.config import load_config
    from furnace.data.synthetic import demo_tokenizer, draw_sample, sample_rng
    from furnace.model.flamingo_io import save_flamingo

    w = tmp_path_factory.mktemp("evalset")
    cfg = load_config("demo", [s for s in TINY if s.startswith("model.")])
    tok = demo_tokenizer()
    model = _amplified_model(cfg, tok)
    save_flamingo(model, w / "model", dataclasses.asdict(cfg.model))
    tok.save_pretrained(w / "model")
    (w / "images").mkdir()
    imgs, anns, qs, qa = [], [], [], []
    for i in range(10):
        img, cap = draw_sample(sample_rng(0, "evalset", i), 32)
        name = f"COCO_val2014_{i:012d}.png"
        img.save(w / "images" / name)
        imgs.append({"id": i, "file_name": name})
        anns += [{"image_id": i, "id": 2 * i, "caption": cap}, {"image_id": i, "id": 2 * i + 1, "caption": cap.upper()}]
        qs.append({"question_id": 100 + i, "image_id": i, "question": "what colour is it?"})
        qa.append({"question_id": 100 + i, "image_id": i, "answer_type": "other",
                   "answers": [{"answer": cap.split()[1 + (k % 2)]} for k in range(10)]})
        (w / "classes" / cap.split()[2]).mkdir(parents=True, exist_ok=True)
        img.save(w / "classes" / cap.split()[2] / f"{i}.png")
    (w / "captions.json").write_text(json.dumps({"images": imgs, "annotations": anns}))
    (w / "questions.json").write_text(json.dumps({"questions": qs}))
    (w / "answers.json").write_text(json.dumps({"annotations": qa}))
    return w


def _eval(w, *args) -> dict:
    out = w / f"out{len(list(w.glob('out*')))}"
    assert main([*args, "--model", str(w / "model"), "--out", str(out), "--no-meteor"]) == 0
    return json.loads((out / "report.json").read_text()) | {"out": out}


def _caption_args(w):
    return ["caption", "--annotations", str(w / "captions.json"), "--images", str(w / "images")]


def test_caption_on_two_ranks_equals_one_rank_and_the_written_files_rescore_alike(evalset):
    w = evalset
    one = _eval(w, *_caption_args(w), "--shots", "0", "2", "--batch-size", "3")
    out2 = w / "two-ranks"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "furnace.evaluate", *_caption_args(w), "--shots", "0", "2", "--batch-size", "3",
                          "--model", str(w / "model"), "--out", str(out2), "--no-meteor"],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads((out2 / "report.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["samples"] == one["samples"] and two["results"] == one["results"]
    preds = {r["prediction"] for r in one["samples"]["0"]}
    assert len(preds) > 1, "the test model should caption images differently"
    assert [r["id"] for r in one["samples"]["0"]] == list(range(10))
    # COCO results format next to the references used
    res_file, ref_file = one["out"] / "predictions-0shot.json", one["out"] / "references-0shot.json"
    written = json.loads(res_file.read_text())
    assert written == [{"image_id": r["id"], "caption": r["prediction"]} for r in one["samples"]["0"]]
    if not shutil.which("java"):
        pytest.skip("rescoring with the COCO tokenizer needs Java")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    coco = COCO(str(ref_file))
    results = coco.loadRes(str(res_file))
    ids = coco.getImgIds()
    tok = PTBTokenizer()
    gts = tok.tokenize({i: coco.imgToAnns[i] for i in ids})
    rs = tok.tokenize({i: results.imgToAnns[i] for i in ids})
    scores = one["results"]["0"]
    assert Bleu(4).compute_score(gts, rs, verbose=0)[0][3] == pytest.approx(scores["BLEU-4"], abs=1e-12)
    assert Cider().compute_score(gts, rs)[0] == pytest.approx(scores["CIDEr"], abs=1e-12)
    assert scores["tokenizer"] == "ptb" and "SPICE" in scores["skipped"]


def _brute_force(w, images: list[Path], prefix: str, texts: list[str]) -> torch.Tensor:
    """[images, texts] mean log-prob of each text after the prefix: one whole forward per pair."""
    from furnace.data.text import TextEncoder
    from furnace.data.tokenizer import load_tokenizer
    from furnace.eval.scoring import ModelScorer
    from furnace.model.flamingo_io import load_flamingo

    model, tok = load_flamingo(w / "model").eval(), load_tokenizer(w / "model")
    scorer, text = ModelScorer(model, tok, "cpu"), TextEncoder(tok, max_length=0, max_images=1)
    out = torch.zeros(len(images), len(texts), dtype=torch.float64)
    with torch.no_grad():
        for i, im in enumerate(images):
            for j, t in enumerate(texts):
                p, c = text.prompt(prefix), text.prompt(t)[len(text.prompt("")):]
                ids = torch.tensor([p + c])
                logits = model.logits({"input_ids": ids, "images": scorer.images([[im]]),
                                       "media_valid": torch.ones(1, 1, dtype=torch.bool)})
                logp = logits[0, len(p) - 1: -1].log_softmax(-1).gather(-1, torch.tensor(c)[:, None])
                out[i, j] = float(logp.mean())
    return out


def test_retrieval_and_classification_rank_by_one_forward_per_pair(evalset):
    w = evalset
    coco = json.loads((w / "captions.json").read_text())
    images = [w / "images" / im["file_name"] for im in coco["images"]]
    texts = [a["caption"] + "<|endofchunk|>" for a in coco["annotations"]]
    brute = _brute_force(w, images, "<image>Output:", texts)
    rep = _eval(w, "retrieval", "--annotations", str(w / "captions.json"), "--images", str(w / "images"),
                "--batch-size", "7")
    got = torch.tensor([r["scores"] for r in rep["samples"]["0"]], dtype=torch.float64)
    torch.testing.assert_close(got, brute, atol=1e-5, rtol=0)
    want = retrieval_recall(brute, torch.tensor([a["image_id"] for a in coco["annotations"]]))
    for way in ("image_to_text", "text_to_image"):
        assert rep["results"]["0"][way] == pytest.approx(want[way], abs=1e-9)
    assert rep["results"]["0"]["texts"] == 20 and rep["results"]["0"]["ranking"] == "caption log-likelihood"

    classes = sorted(p.name for p in (w / "classes").iterdir())
    rep = _eval(w, "classify", "--images", str(w / "classes"))
    rows = rep["samples"]["0"]
    files = [w / "classes" / r["id"] for r in rows]
    brute = _brute_force(w, files, "<image>Output:", [c + "<|endofchunk|>" for c in classes])
    torch.testing.assert_close(torch.tensor([r["scores"] for r in rows], dtype=torch.float64), brute, atol=1e-5, rtol=0)
    assert [classes[r["label"]] for r in rows] == [f.parent.name for f in files]
    assert rep["results"]["0"]["top-1"] == pytest.approx(
        top_k_accuracy(brute, torch.tensor([r["label"] for r in rows]))["top-1"])


def test_vqa_scores_its_answers_and_writes_the_vqa_results_format(evalset):
    from furnace.eval.vqa import vqa_score

    w = evalset
    rep = _eval(w, "vqa", "--questions", str(w / "questions.json"), "--annotations", str(w / "answers.json"),
                "--images", str(w / "images"), "--shots", "0", "1")
    for shots in ("0", "1"):
        rows = rep["samples"][shots]
        assert len(rows) == 10 and all(r["question"] == "what colour is it?" for r in rows)
        want = vqa_score({r["id"]: r["prediction"] for r in rows},
                         {r["id"]: {"answers": r["answers"], "answer_type": "other"} for r in rows})
        assert rep["results"][shots]["accuracy"] == pytest.approx(want["accuracy"])
        written = json.loads((rep["out"] / f"predictions-{shots}shot.json").read_text())
        assert written == [{"question_id": r["id"], "answer": r["prediction"]} for r in rows]


def test_ranking_metrics_on_hand_made_scores():
    s = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.7, 0.6, 0.1]])  # image 2's text ranks last
    r = retrieval_recall(s, torch.tensor([0, 1, 2]), ks=(1, 2, 3))
    assert r["image_to_text"] == {"R@1": pytest.approx(2 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}
    # text 2: images score it 0.5, 0.3, 0.1 -> its own image third; texts 0, 1 first
    assert r["text_to_image"] == {"R@1": pytest.approx(2 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}
    # two texts of image 0: found when either ranks first
    r = retrieval_recall(torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.1, 0.8]]), torch.tensor([0, 0, 1]), ks=(1,))
    assert r["image_to_text"]["R@1"] == 1.0 and r["text_to_image"]["R@1"] == pytest.approx(2 / 3)
    # ties count against the answer
    flat = retrieval_recall(torch.zeros(3, 3), torch.tensor([0, 1, 2]), ks=(1, 3))
    assert flat["image_to_text"] == {"R@1": 0.0, "R@3": 1.0}
    acc = top_k_accuracy(torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), torch.tensor([1, 2]), ks=(1, 2))
    assert acc == {"top-1": 0.5, "top-2": 1.0}
    with pytest.raises(ValueError, match="text_image"):
        retrieval_recall(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


def test_demonstrations_are_fixed_per_query_and_never_the_query():
    a = draw_demonstrations(10, 4, seed=0, query_id=7, exclude=7)
    assert a == draw_demonstrations(10, 4, seed=0, query_id=7, exclude=7) and 7 not in a and len(set(a)) == 4
    assert a != draw_demonstrations(10, 4, seed=1, query_id=7, exclude=7)
    with pytest.raises(ValueError, match="--shots 4 needs at least 4"):
        draw_demonstrations(4, 4, seed=0, query_id=0, exclude=0)
    assert query("<image>Question:{question} Short answer:{answer}<|endofchunk|>", question="why?") == \
        "<image>Question:why? Short answer:"


def test_bad_sets_and_flags_fail_in_one_line_or_are_counted(evalset, tmp_path, capsys):
    w = evalset
    base = ["--model", str(w / "model"), "--out", str(tmp_path / "o"), "--no-meteor"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases = [(["caption", "--annotations", str(bad), "--images", str(w / "images")], "is not JSON"),
             (["caption", "--annotations", str(w / "answers.json"), "--images", str(w / "images")], "no 'images' list"),
             (["caption", "--images", str(w / "images")], "--annotations"),
             ([*_caption_args(w), "--shots", "10"], "--shots 10 needs at least 10"),
             ([*_caption_args(w), "--template", "<image>Output:"], "ends with the {caption} field"),
             ([*_caption_args(w), "--model", str(tmp_path)], "neither an exported")]
    for args, message in cases:
        assert main([*base, *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    # a missing and a damaged image: left out and counted, the rest scored
    coco = json.loads((w / "captions.json").read_text())
    coco["images"][0]["file_name"] = "gone.png"
    (tmp_path / "images").mkdir()
    for im in coco["images"][1:]:
        shutil.copy(w / "images" / im["file_name"], tmp_path / "images")
    (tmp_path / "images" / coco["images"][1]["file_name"]).write_bytes(b"\x89PNG not really")
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert main(["caption", "--annotations", str(tmp_path / "c.json"), "--images", str(tmp_path / "images"),
                 *base]) == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["results"]["0"]["skipped_items"] == {"missing_image": 1, "unreadable_image": 1}
    assert rep["results"]["0"]["captions"] == 8


def test_generate_on_two_tensor_parallel_ranks_equals_one_process(evalset):
    """furnace-generate under torchrun: each rank reads its cut of each tensor, the logits are
    gathered; greedy and beam-search text equal one process's, and --stop cuts the text."""
    from furnace.generate import generate

    w = evalset
    images = [str(w / "images" / f"COCO_val2014_{i:012d}.png") for i in (1, 2)]
    prompt = "<image>Output:a red circle<|endofchunk|><image>Output:"
    for beams in (1, 3):
        want = generate(w / "model", images, prompt, max_new_tokens=6, num_beams=beams)
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "furnace.generate", "--model", str(w / "model"), "--image", images[0], "--image",
                              images[1], "--prompt", prompt, "--max-new-tokens", "6", "--num-beams", str(beams)],
                             env=env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.splitlines() == [want], (res.stdout, want)
    word = want.split()[1]
    cut = generate(w / "model", images, prompt, max_new_tokens=6, stop=[word])
    assert cut == want[: want.index(word)].strip()


def test_generate_from_a_run_directory_on_two_tensor_parallel_ranks(full_run, data):
    """A training run's newest checkpoint, consolidated in each process and cut tensor-parallel:
    the text equals one process's."""
    from furnace.generate import generate

    image = Path(data["dir"]) / "photo.png"
    if not image.is_file():
        from furnace.data.synthetic import draw_sample, sample_rng

        draw_sample(sample_rng(0, "photo", 0), 32)[0].save(image)
    want = generate(full_run, [str(image)], max_new_tokens=5)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "furnace.generate", "--model", str(full_run), "--image", str(image),
                          "--max-new-tokens", "5"], env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == [want], (res.stdout, want)


class _KnowingScorer:
    """A scorer that knows the answer: a caption scores 0 after the image it was written for and
    -1 after any other (the image's number is in its file name, the caption's in its text)."""

    has_embeddings = False  # no contrastive heads: retrieval ranks by likelihood

    def pixels(self, image):
        return None

    def loglik(self, prompt, images, continuations, **kw):
        own = int(images[-1].stem.split("_")[-1])
        return torch.tensor([0.0 if c.split()[0] == f"img{own}" else -1.0 for c in continuations])


def test_retrieval_finds_what_a_knowing_model_knows(tmp_path):
    """The retrieval path (the set read, every caption a candidate of every image, outputs
    gathered in order, R@K both ways) on a set whose answer is known: all found at rank 1; with
    two images' captions swapped in the annotations, exactly those are missed, at known ranks."""
    import collections

    from furnace.eval import sets
    from furnace.eval.tasks import Settings, likelihood_outputs, score

    (tmp_path / "images").mkdir()
    for i in range(6):
        (tmp_path / "images" / f"COCO_{i:012d}.png").write_bytes(b"")
    caps = {i: [f"img{i} a caption", f"img{i} another"] for i in range(6)}
    for swapped in (False, True):
        if swapped:
            caps[0], caps[1] = caps[1], caps[0]
        coco = {"images": [{"id": i, "file_name": f"COCO_{i:012d}.png"} for i in range(6)],
                "annotations": [{"image_id": i, "caption": c} for i in range(6) for c in caps[i]]}
        (tmp_path / "c.json").write_text(json.dumps(coco))
        items = sets.coco_captions(tmp_path / "c.json", tmp_path / "images", collections.Counter())
        s = Settings(task="retrieval", template="<image>Output:{caption}<|endofchunk|>")
        # two "ranks", each its share, gathered in any order
        rows = [r for rank in (1, 0) for r in likelihood_outputs(s, _KnowingScorer(), items, list(range(rank, 6, 2)),
                                                                 items, True, collections.Counter())]
        res = score(s, items, rows)
        if not swapped:
            assert res["image_to_text"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
            assert res["text_to_image"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
        else:
            # a swapped image's own captions score -1 like the 8 others of other images, behind the
            # two that name it: rank 10 (ties count against); a swapped caption's own image ties
            # with the 4 others behind the image it names: rank 5
            assert res["image_to_text"] == {"R@1": pytest.approx(4 / 6), "R@5": pytest.approx(4 / 6),
                                            "R@10": pytest.approx(4 / 6)}
            assert res["text_to_image"] == {"R@1": pytest.approx(8 / 12), "R@5": pytest.approx(8 / 12), "R@10": 1.0}


def test_a_tensor_parallel_evaluation_equals_one_process(evalset):
    """--tp 2 on 2 ranks: the model split over them (vocabulary logits gathered), every item
    scored by the pair; the captions are one process's and the retrieval scores within 1e-5."""
    w = evalset
    args = ["--annotations", str(w / "captions.json"), "--images", str(w / "images"), "--no-meteor", "--limit", "6"]
    out = {}
    for task in ("caption", "retrieval"):
        one = _eval(w, task, *args)
        two_dir = w / f"tp-{task}"
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "furnace.evaluate", task, *args, "--tp", "2", "--model", str(w / "model"),
                              "--out", str(two_dir)], env=env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        out[task] = one, json.loads((two_dir / "report.json").read_text())
    one, two = out["caption"]
    assert two["tp"] == 2 and [r["prediction"] for r in two["samples"]["0"]] == [r["prediction"] for r in one["samples"]["0"]]
    one, two = out["retrieval"]
    torch.testing.assert_close(torch.tensor([r["scores"] for r in two["samples"]["0"]]),
                               torch.tensor([r["scores"] for r in one["samples"]["0"]]), atol=1e-5, rtol=0)
