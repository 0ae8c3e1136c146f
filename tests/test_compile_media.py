"""model.compile: the tower's and the resampler's blocks compiled one by one give the eager
loss and gradients, keep their names, and the builder applies the key."""
import copy

import pytest
import torch

from furnace.config import ConfigError, load_config, validate
from furnace.model.compile import compile_media, compile_parts

from test_model_flamingo import IMG, make_batch, make_model


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_media_blocks_give_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    eager = make_model(freeze_vision=False)  # the tower trains: its blocks' backward is compiled too
    compiled = copy.deepcopy(eager)
    n = compile_media(compiled, compile_parts("vision,perceiver"))
    assert n == len(eager.vision.blocks()) + 2 * eager.perceiver.layers.__len__()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for rows in ([[1, IMG, 5, 6, 7, IMG, 8, 9], [IMG, 3, 4, 2, 2, 2, 2, 2]],  # 3 valid images
                 [[1, IMG, 5, IMG], [IMG, 3, IMG, 2], [IMG, 1, 1, 1]]):        # 5: the tower's batch changes
        batch = make_batch(rows, t_img=2)
        batch["labels"] = batch["input_ids"].clone()
        want_loss, want = _loss_and_grads(eager, batch)
        got_loss, got = _loss_and_grads(compiled, batch)
        torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
        assert got.keys() == want.keys() and any(k.startswith("vision.") for k in got)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("value", ["vision,vision", "tower", "", "vision,"])
def test_a_wrong_compile_value_fails_in_one_line(value):
    cfg = load_config("demo")
    cfg.model.compile = value
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    msg = str(e.value)
    assert "\n" not in msg and "model.compile" in msg and "--set model.compile=vision,perceiver" in msg


def test_compile_parts():
    assert compile_parts("none") == [] and compile_parts("perceiver") == ["perceiver"]
    assert compile_parts("vision, perceiver") == ["vision", "perceiver"]
