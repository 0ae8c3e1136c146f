"""Config validation of the parallel layouts: A = ZeRO-3 x TP x DP, B = ZeRO-1 x TP x PP x DP."""
import pytest
import torch

from furnace.config import ConfigError, load_config, validate


@pytest.mark.parametrize("sets,world,dp", [
    (["parallel.tp=2", "parallel.zero_stage=3"], 4, 2),
    (["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"], 8, 2),
    (["parallel.pp=2", "parallel.zero_stage=1"], 2, 1),
    (["parallel.zero_stage=1"], 2, 2),  # plain data parallelism keeps ZeRO-0/1/2 for ablations
])
def test_valid_layouts(sets, world, dp):
    assert validate(load_config("demo", sets + ["train.global_batch_size=16", "train.micro_batch_size=4"]), world, check_paths=False) == dp


@pytest.mark.parametrize("sets,world,needle", [
    (["parallel.pp=2"], 2, "--set parallel.zero_stage=1"),
    (["parallel.pp=2", "parallel.zero_stage=0"], 2, "--set parallel.zero_stage=1"),
    (["parallel.tp=2", "parallel.zero_stage=1"], 2, "--set parallel.zero_stage=3"),
    (["parallel.tp=3", "parallel.zero_stage=3"], 3, "must divide model.lm.num_heads"),
    (["parallel.pp=64", "parallel.zero_stage=1"], 64, "exceeds model.lm.num_layers"),
    (["parallel.zero3_gather=layer"], 1, "parallel.zero3_gather must be block or module"),
])
def test_invalid_layouts_fail_with_one_line_naming_the_fix(sets, world, needle):
    with pytest.raises(ConfigError) as e:
        validate(load_config("demo", sets), world, check_paths=False)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_zero3_blocks_are_the_repeated_layers():
    """ZeRO-3 gathers per block (furnace.parallel.zero3): exactly the decoder layers, vision
    encoder layers, perceiver attention / feed-forward pairs and xattn blocks."""
    import deepspeed.utils

    from furnace.data.synthetic import demo_tokenizer
    from furnace.parallel.zero3 import gather_by_block, repeated_blocks
    from furnace.training.build import build_model

    cfg = load_config("demo", ["model.perceiver.depth=2", "model.lm.num_layers=3"])
    model = build_model(cfg, demo_tokenizer())
    blocks = repeated_blocks(model)
    expect = [*model.lm.layers, *model.vision.model.encoder.layers,
              *(m for pair in model.perceiver.layers for m in pair), *model.xattn]
    assert {id(b) for b in blocks} == {id(b) for b in expect} and len(blocks) == len(expect) == 3 + 2 + 4 + 3
    assert gather_by_block(model) == len(expect)
    assert {id(m) for m in deepspeed.utils.get_z3_leaf_modules(model)} == {id(b) for b in expect}


def test_batch_to_pipe_carries_positions_when_only_segments_are_given():
    from furnace.parallel.pipeline import batch_to_pipe

    ids = torch.tensor([[5, 6, 7, 8]])
    batch = {"input_ids": ids, "images": torch.zeros(1, 1, 1, 3, 8, 8), "media_valid": torch.ones(1, 1, dtype=torch.bool),
             "labels": ids, "segment_ids": torch.tensor([[1, 1, 2, 2]])}
    inputs, labels = batch_to_pipe(batch)
    assert len(inputs) == 5 and inputs[3].tolist() == [[0, 1, 2, 3]] and inputs[4].tolist() == [[1, 1, 2, 2]]
    assert labels is ids
    with pytest.raises(ValueError, match="labels"):
        batch_to_pipe({k: v for k, v in batch.items() if k != "labels"})
