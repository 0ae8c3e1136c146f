import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One attention config per kernel instead of autotuning every test's shape (a fresh GPU machine
# spent minutes compiling); test_every_config checks each config of the autotune lists.
os.environ.setdefault("FURNACE_ATTN_AUTOTUNE", "0")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
