"""Helpers for the tests that run train.py in real processes."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "model.lm.num_layers=2", "model.lm.hidden_size=64", "model.lm.intermediate_size=128", "model.lm.num_heads=4",
    "model.lm.num_kv_heads=2", "model.xattn.every=1", "model.xattn.heads=2", "model.xattn.dim_head=16",
    "model.perceiver.depth=1", "model.perceiver.num_latents=4", "model.perceiver.heads=2",
    "model.perceiver.dim_head=16", "model.vision.num_layers=1", "model.vision.hidden_size=32",
    "model.vision.intermediate_size=64", "model.vision.num_heads=2", "data.max_length=24", "data.num_workers=0",
    "data.shuffle_buffer=64", "train.micro_batch_size=4", "train.global_batch_size=16", "train.eval_every=0",
    "train.log_every=1", "train.precision=fp32", "train.warmup_steps=2", "train.lr=1e-3",
    "parallel.zero_stage=3",  # the demo preset runs ZeRO-0; these tests are about ZeRO-3
]


def set_keys(cfg, over: dict):
    """`cfg` with each dotted key of `over` ("lm.num_layers": 2) set in place; returns cfg."""
    for k, v in over.items():
        obj = cfg
        *path, last = k.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, v)
    return cfg


def lm_tokenizer(words: list[str]):
    """A word-level tokenizer as a pretrained LM ships one: <pad>, <unk>, <s>, </s> and `words`,
    without <image> and <|endofchunk|> (furnace adds them as new rows)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", *words]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_pretrained(folder, *, layers: int = 2) -> Path:
    """`folder`/llama (a `layers`-layer Llama whose tokenizer, saved beside it, lacks <image> and
    <|endofchunk|>: furnace adds them as new rows) and `folder`/clip (a 1-layer CLIP tower on
    32-pixel images), as pretrained checkpoints come. Returns `folder`."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from furnace.data.synthetic import vocabulary

    folder = Path(folder)
    tok = lm_tokenizer(vocabulary())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(folder / "llama")
    tok.save_pretrained(folder / "llama")
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(folder / "clip")
    return folder


def pip_wheel(name: str, version: str, folder) -> Path:
    """`name`==`version`'s wheel, downloaded into `folder` without its dependencies (reference code
    the tests run from source); the test is skipped, with pip's complaint, when pip cannot get it."""
    import pytest

    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{name}=={version}",
                          "-d", str(folder)], capture_output=True, text=True, timeout=300)
    wheels = sorted(Path(folder).glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if res.returncode or not wheels:
        pytest.skip(f"pip could not download {name} {version}: " + (res.stderr.strip().splitlines() or ["no wheel"])[-1])
    return wheels[0]


def data_overrides(data: dict) -> list[str]:
    return [f"data.synthetic_dir={data['dir']}", f"data.train_shards={data['train']}", f"data.val_shards={data['val']}"]


def train_cmd(run_dir, data: dict, *extra: str, nproc: int = 2) -> list[str]:
    sets = [*TINY, *data_overrides(data), f"train.run_dir={run_dir}", *extra]
    args = [sys.executable, str(ROOT / "train.py"), "--nproc", str(nproc)]
    for s in sets:
        args += ["--set", s]
    return args


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def env(**extra) -> dict:
    """The environment of a child run: none of a launcher's variables (with RANK/WORLD_SIZE
    set, train.py would take itself for an already launched rank)."""
    e = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    e.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return {k: v for k, v in e.items() if v is not None}  # extra KEY=None removes KEY


def run(cmd, timeout: int = 420, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def start(run_dir, data, *extra, **env_extra) -> subprocess.Popen:
    """A long run in the background, in a session of its own (signals can reach it as a group)."""
    return subprocess.Popen(train_cmd(run_dir, data, "train.max_steps=100000", "train.save_every=0", *extra),
                            cwd=ROOT, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@contextlib.contextmanager
def running(run_dir, data, *extra, until=None, **env_extra):
    """A long run (`start`) once it has logged two steps (or `until()` holds); killed with its
    whole group on the way out if it is still there."""
    proc = start(run_dir, data, *extra, **env_extra)
    try:
        assert wait_for(until or (lambda: len(metrics(run_dir)) >= 2), 240), "training did not start"
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_for(pred, timeout) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.5)
    return False


def alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def rank_pid(run_dir, rank) -> int:
    log = Path(run_dir) / "logs" / f"rank{rank:03d}.log"
    for line in log.read_text().splitlines():
        if " pid " in line:
            return int(line.split(" pid ")[1].split(",")[0])
    raise AssertionError(f"no pid in {log}")


def train_preset_briefly(preset: str, data: dict, run_dir: Path) -> dict:
    """`train.py --config PRESET` on 2 ranks for 12 steps on a tiny drawn set (`data`: its dir,
    train and val patterns): the loss falls, no sample is skipped, the held-out evaluation ran on
    16 samples. Returns that evaluation's report."""
    sets = [f"data.synthetic_dir={data['dir']}", f"data.train_shards={data['train']}",
            f"data.val_shards={data['val']}", f"train.run_dir={run_dir}", "train.max_steps=12",
            "train.global_batch_size=16", "train.micro_batch_size=8", "train.warmup_steps=2", "train.log_every=1",
            "train.eval_every=12", "train.save_every=0", "data.canonical_streams=2"]
    argv = [sys.executable, str(ROOT / "train.py"), "--config", preset, "--nproc", "2"]
    argv += [a for s in sets for a in ("--set", s)]
    res = subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    losses = [m["loss"] for m in metrics(run_dir) if "loss" in m]
    assert len(losses) == 12 and losses[-1] < 0.85 * losses[0], losses
    assert all(m.get("skipped_samples", 0) == 0 for m in metrics(run_dir) if "loss" in m)
    report = json.loads((run_dir / "eval" / "step00000012.json").read_text())
    assert report["val_samples"] == 16 and 0.0 <= report["caption_accuracy"] <= 1.0
    return report
