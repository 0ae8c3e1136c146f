"""Every shell command of the README runs, on tiny data and a few steps: a README that can no
longer run fails here. Each command runs as written, in a scratch folder that holds what the
README assumes (train.py, launch/, benchmarks/, captions.json, images/, photo.jpg, ...), with
/path/to/llama and /path/to/clip standing for tiny checkpoints made here; train.py commands get
`--set` items appended that shrink the model and the run (later `--set` items win)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_utils import ROOT, TINY, env, tiny_pretrained

pytestmark = pytest.mark.multirank

# A finetune preset run shrunk for the CPU: the shapes of the LM and the tower come from their checkpoints.
SMALL_FINETUNE = ["model.perceiver.depth=1", "model.perceiver.num_latents=4", "model.perceiver.heads=2",
                  "model.perceiver.dim_head=16", "model.xattn.heads=2", "model.xattn.dim_head=16",
                  "train.micro_batch_size=2", "train.global_batch_size=4", "train.precision=fp32",
                  "data.num_workers=0", "train.log_every=1", "train.warmup_steps=1"]
STEPS = ["train.max_steps=2"]
DEMO_SIZED = [s for s in TINY if not s.startswith("parallel.")]  # the README's own layout wins

# README command -> how this test runs it: "train" (train.py, demo-sized), "finetune", "run" (as
# written), or a reason it does not run here.
COMMANDS = {
    'pip install -c constraints.txt -e ".[test]" && python train.py': "train",
    "pytest": "the command that runs this test",
    "torchrun --standalone --nproc_per_node 2 train.py": "train",
    "deepspeed --no_ssh --node_rank 0 --master_addr 127.0.0.1 --hostfile launch/hosts train.py": "train",
    "python train.py --set train.max_steps=200 --set train.run_dir=runs/try1 --set train.precision=fp32": "train",
    "deepspeed --hostfile launch/hosts train.py --config run.yaml":
        "needs passwordless ssh; the --no_ssh form runs in test_train.py::test_two_nodes_over_loopback_with_the_deepspeed_launcher",
    "deepspeed --no_ssh --hostfile launch/hosts --node_rank $NODE_RANK --master_addr $MASTER_HOST --master_port 29500 "
    "train.py --config run.yaml": "two nodes: test_train.py::test_two_nodes_over_loopback_with_the_deepspeed_launcher",
    "python train.py --nproc 4 --set parallel.tp=2 --set parallel.zero_stage=3": "train",
    "python train.py --nproc 4 --set parallel.tp=2 --set parallel.pp=2 --set parallel.zero_stage=1": "train",
    "furnace-shards coco --input captions.json --images images/ --out data/coco": "run",
    "python train.py --config finetune --set model.lm.path=/path/to/llama --set model.vision.path=/path/to/clip "
    '--set "data.train_shards=data/coco/train-{000000..000000}.tar"': "finetune",
    "furnace-shards jsonl --input pairs.jsonl --out data/mine --prefix train": "run",
    "furnace-shards interleaved --input docs.jsonl --out data/docs --prefix docs": "run",
    "python train.py --config finetune --set model.lm.path=/path/to/llama --set model.vision.path=/path/to/clip "
    '--set "data.train_shards=data/mine/train-{000000..000000}.tar;data/docs/docs-{000000..000000}.tar" '
    "--set data.train_weights=0.7,0.3 --set train.run_dir=runs/mix": "finetune",
    "furnace-export runs/finetune --out exported": "run",
    "python train.py --config finetune --set model.lm.path=/path/to/llama --set model.vision.path=/path/to/clip "
    '--set model.start_from=exported/flamingo --set "data.train_shards=data/coco/train-{000000..000000}.tar" '
    "--set train.run_dir=runs/continued": "finetune",
    "python train.py --config openflamingo-ft --set model.lm.path=/path/to/llama-7b --set model.vision.path=/path/to/vit-l-14 "
    "--set model.start_from=/path/to/OpenFlamingo-9B/checkpoint.pt "
    '--set "data.train_shards=data/mmc4/train-{000000..000999}.tar"':
        "needs a 7B LM and OpenFlamingo's checkpoint: test_start_from.py::test_a_run_starts_from_open_flamingos_checkpoint "
        "runs the same path on tiny ones",
    "furnace-import idefics /path/to/idefics-9b --out idefics-9b":
        "needs IDEFICS-9B: test_idefics.py::test_converted_folders_hold_the_checkpoint converts a tiny one",
    "python train.py --config idefics-9b-ft --set model.lm.path=idefics-9b/lm --set model.vision.path=idefics-9b/vision "
    '--set model.start_from=idefics-9b/flamingo --set "data.train_shards=data/mmc4/train-{000000..000999}.tar"':
        "needs IDEFICS-9B: test_idefics.py::test_a_converted_idefics_trains_on_each_layout_as_one_process trains a "
        "tiny converted one",
    "python train.py --set model.contrastive.dim=64 --set train.contrastive_weight=0.1 --set train.run_dir=runs/contrastive":
        "train",
    'furnace-eval retrieval --model runs/contrastive --shards data/demo/val-000000.tar --template '
    '"<image>{caption}<|endofchunk|>" --limit 200': "run",
    "furnace-generate --model exported/flamingo --image photo.jpg --quantize int8": "run",
    "torchrun --standalone --nproc_per_node 2 -m furnace.generate --model exported/flamingo --image photo.jpg": "run",
    "furnace-eval caption --model exported/flamingo --annotations captions.json --images images/ --shots 0 4": "run",
    "torchrun --standalone --nproc_per_node 2 -m furnace.evaluate caption --model exported/flamingo --annotations "
    "captions.json --images images/": "run",
    "furnace-eval vqa --model exported/flamingo --questions questions.json --annotations answers.json --images images/":
        "run",
    "furnace-eval retrieval --model exported/flamingo --annotations captions.json --images images/": "run",
    "furnace-eval classify --model exported/flamingo --images classes/": "run",
    'furnace-eval caption --model runs/demo --shards data/demo/val-000000.tar --template '
    '"<image>{caption}<|endofchunk|>"': "run",
    'furnace-eval retrieval --model runs/demo --shards data/demo/val-000000.tar --template '
    '"<image>{caption}<|endofchunk|>" --limit 200': "run",
    'python benchmarks/generate.py --model runs/demo --shards data/demo/val-000000.tar --template '
    '"<image>{caption}<|endofchunk|>" --out benchmarks/results/generate-cpu.json': "run",
    "furnace-generate --model exported/flamingo --image photo.jpg": "run",
    "furnace-generate --model exported/flamingo --image photo.jpg --num-beams 3": "run",
    "furnace-generate --model exported/flamingo --image photo.jpg --sample --top-p 0.9 --seed 0": "run",
    'furnace-generate --model exported/flamingo --image a.jpg --image b.jpg --prompt '
    '"<image>a red circle<|endofchunk|><image>"': "run",
    "python benchmarks/throughput.py --preset flamingo-1b --synthetic-data --steps 20 --out "
    "benchmarks/results/throughput-h100.json": "gpu",
    "python benchmarks/throughput.py --preset flamingo-1b --synthetic-data --ablate all --out "
    "benchmarks/results/throughput-h100-ablations.json": "gpu",
    "python benchmarks/kernels.py --out benchmarks/results/kernels-h100.json": "gpu",
    "python benchmarks/throughput.py --preset demo --steps 5 --out /tmp/throughput-demo.json": "benchmark",
    "python benchmarks/kernels.py --quick --only loss_scale --out /tmp/kernels.json": "run",
    "python benchmarks/dataloader.py --out /tmp/dataloader.json": "run",
    "furnace-plan --config flamingo-9b --gpus 64 --gpu-memory 80 --gpus-per-node 8": "run",
    "furnace-plan --config flamingo-80b --gpus 8 --top 4 --json plans.json": "run",
    "python train.py --nproc 2 --set parallel.layout=auto": "train",
    "python benchmarks/memory.py --out benchmarks/results/memory-cpu.json": "run",
    "python benchmarks/launch_forms.py --out benchmarks/results/launch-forms-cpu.json": "benchmark",
    "python benchmarks/load.py --after --out benchmarks/results/load-cpu.json": "run",
    "python benchmarks/load.py --fresh --out benchmarks/results/load-cpu-fresh.json": "run",
    "furnace-shards video --input clips.jsonl --out data/clips --min-frames 4":
        "needs clips: test_video.py::test_furnace_shards_video_round_trip runs this command on clips it writes",
    "furnace-shards audio --input sounds.jsonl --out data/sounds --sample-rate 16000":
        "needs clips: test_audio.py::test_furnace_shards_audio_round_trip runs this command on clips it writes",
    "furnace-generate --model runs/demo-audio --audio clip.wav":
        "needs an audio run: test_audio.py::test_demo_audio_trains_on_two_ranks runs furnace.generate on clips with "
        "its run's export",
    "python train.py --config demo-audio":
        "the demo-audio run; test_audio.py::test_demo_audio_trains_on_two_ranks runs its preset on 2 ranks on a "
        "tiny audio set",
    "python train.py --config demo-video":
        "the ~8-minute demo-video run; test_video.py::test_demo_video_trains_on_two_ranks runs its preset on 2 ranks "
        "on a tiny video set",
}
# What a benchmark command gets appended on the CPU to stay short.
SHORTER = {"benchmarks/dataloader.py": ["--n", "64", "--batches", "2", "--workers", "0"],
           "benchmarks/memory.py": ["--layouts", "dp1"], "benchmarks/launch_forms.py": ["--steps", "6", "--repeats", "1"],
           "benchmarks/throughput.py": ["--warmup", "1", "--steps", "2"],
           "benchmarks/load.py": ["--layouts", "zero3_dp2", "--hidden", "128", "--layers", "4", "--vocab", "512"],
           "benchmarks/generate.py": ["--limit", "8", "--modes", "fp32,int8"], "furnace-eval": ["--limit", "6"],
           "furnace.evaluate": ["--limit", "6"]}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                out.append(re.sub(r"\s+", " ", line))
    return out


def test_every_readme_command_is_run_here_or_says_why_not():
    assert set(readme_commands()) == set(COMMANDS)


@pytest.fixture(scope="module")
def work(tmp_path_factory, data):
    """A folder laid out as the README assumes, with tiny checkpoints and inputs."""
    from PIL import Image

    from furnace.data.synthetic import draw_sample, sample_rng

    w = tmp_path_factory.mktemp("readme")
    for name in ("train.py", "launch", "benchmarks"):
        (w / name).symlink_to(ROOT / name)
    tiny_pretrained(w, layers=4)  # an LM whose tokenizer lacks <image>/<|endofchunk|> (new rows), a CLIP tower
    # captions.json (COCO) + images/, pairs.jsonl, docs.jsonl, photos
    (w / "images").mkdir()
    images, anns, pairs, docs = [], [], [], []
    for i in range(12):
        img, cap = draw_sample(sample_rng(0, "readme", i), 32)
        img.save(w / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
        anns.append({"image_id": i, "id": i, "caption": cap})
        pairs.append({"image": f"images/{i}.png", "caption": cap})
        docs.append({"segments": [{"image": f"images/{i}.png"}, {"text": cap}]})
    import json

    (w / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    (w / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (w / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    # VQAv2 files for those images, and a class folder per shape
    qs = [{"question_id": i, "image_id": i, "question": "what shape is it?"} for i in range(12)]
    qa = [{"question_id": i, "answer_type": "other", "answers": [{"answer": a["caption"].split()[2]}] * 10}
          for i, a in enumerate(anns)]
    (w / "questions.json").write_text(json.dumps({"questions": qs}))
    (w / "answers.json").write_text(json.dumps({"annotations": qa}))
    for i, a in enumerate(anns):
        (w / "classes" / a["caption"].split()[2]).mkdir(parents=True, exist_ok=True)
        (w / "classes" / a["caption"].split()[2] / f"{i}.png").symlink_to(w / "images" / f"{i}.png")
    # the demo's data where the README looks for it (its run: the first README command)
    (w / "data").mkdir()
    (w / "data" / "demo").symlink_to(data["dir"])
    for name in ("photo.jpg", "a.jpg", "b.jpg"):
        Image.open(w / "images" / "0.png").convert("RGB").save(w / name)
    return w


def argv_of(command: str, work: Path) -> list[str]:
    argv = shlex.split(command.replace("/path/to/llama", str(work / "llama")).replace("/path/to/clip", str(work / "clip")))
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] in ("torchrun",):
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    elif argv[0] in ("deepspeed", "furnace-shards", "furnace-export", "furnace-generate", "furnace-eval"):
        argv[0] = str(Path(sys.executable).parent / argv[0])
    return argv


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


FINETUNE_COCO = next(c for c, how in COMMANDS.items() if how == "finetune")
# What a command needs to have run before it, in the README's own order.
DEMO = next(iter(COMMANDS))  # the first command trains the demo, into runs/demo as the README says
EXPORTED = "furnace-export runs/finetune --out exported"
NEEDS = {"python train.py --config finetune --set model.lm.path=/path/to/llama --set model.vision.path=/path/to/clip "
         "--set model.start_from": EXPORTED, "furnace-export": FINETUNE_COCO, "furnace-generate": EXPORTED, "furnace-eval caption --model runs/demo": DEMO,
         "furnace-eval retrieval --model runs/demo": DEMO, "python benchmarks/generate.py": DEMO,
         "furnace-eval retrieval --model runs/contrastive": "python train.py --set model.contrastive.dim",
         "furnace-eval": EXPORTED, "torchrun --standalone --nproc_per_node 2 -m furnace.": EXPORTED,
         "python train.py --config finetune": "furnace-shards"}
DONE: set[str] = set()


RUNNABLE = ("train", "finetune", "run", "benchmark")


@pytest.mark.parametrize("command", [c for c, how in COMMANDS.items() if how in RUNNABLE])
def test_readme_command_runs(command, work, data):
    _run(command, work, data)
    assert command in DONE  # every part exited 0 (asserted per part in _run)


def _run(command: str, work: Path, data: dict) -> list[int]:
    """Runs `command` (and the README commands it needs first) as written; the exit status of
    each `&&` part it ran (empty when an earlier test ran it already)."""
    if command in DONE:
        return []
    statuses = []
    for prefix, needed in NEEDS.items():
        if command.startswith(prefix):
            # the commands this one needs that this file runs (others are described, run elsewhere)
            for c in [c for c in COMMANDS if c.startswith(needed) and COMMANDS[c] in RUNNABLE]:
                _run(c, work, data)
    how = COMMANDS[command]
    tiny_data = [f"data.synthetic_dir={data['dir']}", f"data.train_shards={data['train']}",
                 f"data.val_shards={data['val']}"]
    for part in (c.strip() for c in command.split("&&")):
        if part.startswith("pip install"):
            continue  # .ci/run installs exactly so, in a fresh environment
        argv = argv_of(part, work)
        if how == "train":
            named = re.search(r"train\.run_dir=(\S+)", command)  # a run a later command reads
            run_dir = (work / "runs" / "demo" if command == DEMO else work / named.group(1) if named
                       else work / "runs" / f"r{len(DONE)}")
            argv += sets(*DEMO_SIZED, *tiny_data, *STEPS, "train.save_every=0", f"train.run_dir={run_dir}")
        elif how == "finetune":
            argv += sets(*SMALL_FINETUNE, *STEPS)
        elif how == "benchmark":
            argv += sets(*DEMO_SIZED, *tiny_data)
        argv += next((extra for key, extra in SHORTER.items() if key in part), [])
        if "--out" in argv and "benchmarks/results" in argv[argv.index("--out") + 1]:
            argv[argv.index("--out") + 1] = str(work / "out.json")  # never over the committed results
        res = subprocess.run(argv, cwd=work, env=env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{part}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        statuses.append(res.returncode)
        if part.startswith("furnace-generate"):  # one line of text (a 2-step model may say little)
            assert res.stdout.endswith("\n") and len(res.stdout.splitlines()) == 1, res.stdout
    DONE.add(command)
    return statuses


def test_a_finetune_run_describes_the_model_it_built(work, data):
    """The logged and checkpointed config holds the checkpoints' shapes (not the preset's), the
    row length read off the data, the LM's own tokenizer; the export loads in transformers."""
    import json

    from transformers import AutoModelForCausalLM

    _run(FINETUNE_COCO, work, data)
    saved = json.loads((work / "runs" / "finetune" / "checkpoints" / "step00000002" / "config.json").read_text())
    lm, vision = saved["model"]["lm"], saved["model"]["vision"]
    base = json.loads((work / "llama" / "config.json").read_text())["vocab_size"]
    assert (lm["hidden_size"], lm["num_layers"], lm["num_kv_heads"], lm["vocab_size"]) == (64, 4, 2, base)
    assert (vision["hidden_size"], vision["patch_size"], vision["image_size"]) == (32, 8, 32)
    assert 8 <= saved["data"]["max_length"] <= 64 and saved["data"]["max_length"] % 8 == 0
    log = (work / "runs" / "finetune" / "logs" / "rank000.log").read_text()
    assert "data.val_shards is empty: no evaluation" in log
    _run("furnace-export runs/finetune --out exported", work, data)
    meta = json.loads((work / "exported" / "flamingo" / "flamingo.json").read_text())
    assert meta["model"]["lm"]["hidden_size"] == 64 and meta["model"]["lm"]["path"] is None
    hf = AutoModelForCausalLM.from_pretrained(work / "exported" / "lm").eval()
    assert hf.config.vocab_size == base + 2  # the LM's rows + <image> + <|endofchunk|>
    from furnace.model.flamingo_io import load_flamingo

    ours = load_flamingo(work / "exported" / "flamingo").eval()
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        assert (hf(ids).logits[..., :base] - ours.lm(ids)).abs().max() < 1e-5


@pytest.mark.parametrize("sets_,needle", [
    ([], "data.train_shards is empty"),
    (["data.train_shards=data/nowhere/train-{000000..000003}.tar"], "no shard matches 'data/nowhere"),
    (["model.lm.path={work}/images", "data.train_shards=data/coco/train-000000.tar"], "holds no config.json"),
    (["model.lm.path={work}/llama", "data.train_shards=data/coco/train-000000.tar", "parallel.tp=4"],
     "must divide the checkpoint's num_attention_heads=4 and num_key_value_heads=2"),
    (["model.lm.path={work}/clip", "data.train_shards=data/coco/train-000000.tar"], "furnace's decoder is llama"),
    (["model.lm.path={work}/llama-bare", "model.vision.path={work}/clip", "data.train_shards=data/coco/train-000000.tar"],
     "holds no tokenizer"),
    (["model.lm.path={work}/llama", "data.train_shards=data/coco/train-000000.tar"],
     "model.freeze_vision=true with no model.vision.path"),
])
def test_mistakes_stop_before_launch_in_one_line(sets_, needle, work, data):
    import shutil

    _run("furnace-shards coco --input captions.json --images images/ --out data/coco", work, data)
    if not (work / "llama-bare").exists():  # the LM without its tokenizer
        (work / "llama-bare").mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy(work / "llama" / f, work / "llama-bare" / f)
    argv = [sys.executable, "train.py", "--config", "finetune", "--nproc", "4",
            *[a for s in sets_ for a in ("--set", s.replace("{work}", str(work)))]]
    res = subprocess.run(argv, cwd=work, env=env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr, res.stderr


def test_a_run_exports_after_its_starting_checkpoints_are_gone(work, data):
    """The run_dir holds the decoder's and tower's HF configs: the pretrained folders a run
    started from can be deleted and the run still exports, to the same files."""
    import json

    from safetensors.torch import load_file

    from furnace.export import export

    _run("furnace-export runs/finetune --out exported", work, data)
    away = work / "moved-away"
    away.mkdir(exist_ok=True)
    for name in ("llama", "clip"):
        (work / name).rename(away / name)
    try:
        export(work / "runs" / "finetune", work / "exported-again")
    finally:
        for name in ("llama", "clip"):
            (away / name).rename(work / name)
    for part in ("flamingo", "lm"):
        a, b = load_file(str(next((work / "exported" / part).glob("*.safetensors")))), \
            load_file(str(next((work / "exported-again" / part).glob("*.safetensors"))))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first, again = (json.loads((work / d / "flamingo" / "flamingo.json").read_text()) for d in ("exported", "exported-again"))
    assert first == again
