import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One attention config per kernel instead of autotuning every test's shape (a fresh GPU machine
# spent minutes compiling); test_every_config checks each config of the autotune lists.
os.environ.setdefault("FURNACE_ATTN_AUTOTUNE", "0")

import pytest
import torch

if not torch.cuda.is_available():
    # The CPU runs the Triton kernels' tests in the interpreter, which must be chosen before anything
    # imports triton (its own tl.* helpers are decorated then): a test module collected earlier
    # that imports the model would otherwise fix the compiled mode for the whole session.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The synthetic set the train.py tests run on: 320 training samples in 4 shards, 48 held out."""
    from furnace.data.synthetic import build

    out = tmp_path_factory.mktemp("data") / "synth"
    meta = build(str(out), n=320, seed=0, image_size=32, shards=4, n_val=48)
    return {"dir": str(out), "train": meta["train_pattern"], "val": meta["val_pattern"]}


@pytest.fixture(scope="session")
def full_run(data, tmp_path_factory):
    """The uninterrupted reference run of the train.py tests: 6 steps, checkpoints at 3 and 6."""
    from train_utils import run, train_cmd

    run_dir = tmp_path_factory.mktemp("full") / "run"
    res = run(train_cmd(run_dir, data, "train.max_steps=6", "train.save_every=3", "train.lr_decay_steps=6"))
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir.parent / "output.txt").write_text(res.stdout + res.stderr)
    return run_dir
