"""open_clip ViT towers: a folder in the hub's layout (open_clip_config.json + weights) read as an
HF CLIP tower gives the patch features of open_clip's own model code (CLIP(**model_cfg) with the
folder's weights), for GELU and QuickGELU models, safetensors and .bin weights; a Flamingo built on
it trains; towers that are not plain ViTs are refused in one line.

open_clip is not a dependency: it needs torchvision, which has no build for the CPU torch this
project pins (and transformers imports torchvision whenever it is installed). The test downloads
open_clip's wheel and runs its model code from it, with a placeholder for the one torchvision name
its utils import at module level (FrozenBatchNorm2d, used only to freeze ResNets)."""
import importlib
import json
import sys
import types
import zipfile

import pytest
import torch

from furnace.model.open_clip_io import OpenClipReader
from furnace.model.vision import vision_from_hf
from train_utils import pip_wheel

VISION = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}
TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def open_clip(tmp_path_factory):
    """open_clip 3.3.0's model code, from its wheel."""
    d = tmp_path_factory.mktemp("wheel")
    with zipfile.ZipFile(pip_wheel("open_clip_torch", "3.3.0", d)) as z:
        z.extractall(d / "src")
    saved = {k: sys.modules.get(k) for k in ("open_clip", "torchvision", "torchvision.ops", "torchvision.ops.misc")}
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    for name, mod in (("torchvision", types.ModuleType("torchvision")), ("torchvision.ops", types.ModuleType("torchvision.ops")),
                      ("torchvision.ops.misc", misc)):
        sys.modules[name] = mod
    package = types.ModuleType("open_clip")  # its __init__ would import the image transforms
    package.__path__ = [str(d / "src" / "open_clip")]
    sys.modules["open_clip"] = package
    try:
        yield importlib.import_module("open_clip.model")
    finally:
        for k in [k for k in sys.modules if k == "open_clip" or k.startswith("open_clip.")]:
            del sys.modules[k]
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_open_clip(open_clip, folder, *, quick_gelu=False, safetensors=False, final_ln_after_pool=False, **vision):
    torch.manual_seed(0)
    cfg = {"embed_dim": 16, "quick_gelu": quick_gelu,
           "vision_cfg": {**VISION, "final_ln_after_pool": final_ln_after_pool, **vision}, "text_cfg": TEXT}
    model = open_clip.CLIP(**cfg)
    with torch.no_grad():  # non-trivial norms, so a missed or extra norm shows
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}))
    state = model.state_dict()
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    else:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    return folder


def open_clip_tokens(open_clip, folder, images):
    """open_clip's model built from the folder's config with its weights (as its factory does),
    its tokens as open_flamingo takes them (output_tokens)."""
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    ref = open_clip.CLIP(**cfg).eval()
    if (folder / "open_clip_model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "open_clip_model.safetensors"))
    else:
        state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    ref.load_state_dict(state, strict=True)
    ref.visual.output_tokens = True
    with torch.no_grad():
        return ref.visual(images)[1]


@pytest.mark.parametrize("quick_gelu,safetensors", [(False, False), (True, True)])
def test_patch_features_equal_open_clips(open_clip, tmp_path, quick_gelu, safetensors):
    images = torch.randn(3, 3, 32, 32)
    normed = write_open_clip(open_clip, tmp_path / "a", quick_gelu=quick_gelu, safetensors=safetensors)
    tower = vision_from_hf(str(normed)).eval()
    tower.features = "patches_normed"  # open_clip >= 2.23: tokens after ln_post
    torch.testing.assert_close(tower(images), open_clip_tokens(open_clip, normed, images), atol=1e-5, rtol=0)
    # open_flamingo's open_clip (<= 2.20) took the tokens before ln_post: final_ln_after_pool=True today
    raw = write_open_clip(open_clip, tmp_path / "b", quick_gelu=quick_gelu, safetensors=safetensors,
                          final_ln_after_pool=True)
    tower = vision_from_hf(str(raw)).eval()
    tower.features = "patches"
    want = open_clip_tokens(open_clip, raw, images)
    torch.testing.assert_close(tower(images), want, atol=1e-5, rtol=0)
    tower.features = "hidden"  # every token: the class token first, then these
    torch.testing.assert_close(tower(images)[:, 1:], want, atol=1e-5, rtol=0)


def test_a_flamingo_on_an_open_clip_tower_trains(open_clip, tmp_path):
    """Built through the one builder, the features configured, gradients reaching the resampler
    and not the frozen tower; the tower read piece by piece into a model built without it (as
    ranks load it) is the same."""
    from furnace.config import load_config
    from furnace.data.synthetic import demo_tokenizer
    from furnace.model.vision import vision_skeleton_from_hf
    from furnace.parallel.materialize import load_pretrained_tower
    from furnace.training.build import build_model
    from train_utils import TINY

    folder = write_open_clip(open_clip, tmp_path / "oc")
    cfg = load_config("demo", [s for s in TINY if s.startswith("model.") and not s.startswith("model.vision.")]
                      + [f"model.vision.path={folder}", "model.vision.features=patches", "model.freeze_vision=true"])
    model = build_model(cfg, demo_tokenizer())
    streamed = build_model(cfg, demo_tokenizer(), vision=vision_skeleton_from_hf(str(folder)))
    load_pretrained_tower(streamed, str(folder))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(streamed.vision(x), model.vision(x), atol=0, rtol=0)
    assert cfg.model.vision.features == "patches" and cfg.model.vision.hidden_size == 32
    ids = torch.tensor([[1, model.image_token_id, 5, 6, 7]])
    batch = {"input_ids": ids, "images": torch.randn(1, 1, 1, 3, 32, 32), "media_valid": torch.ones(1, 1, dtype=torch.bool)}
    feats = model.vision(batch["images"][0, 0])
    assert feats.shape == (1, 16, 32)  # 4 x 4 patches, no class token
    model(batch).backward()
    assert model.perceiver.latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision.parameters())  # frozen


def test_towers_that_are_not_plain_vits_are_refused_in_one_line(open_clip, tmp_path):
    folder = write_open_clip(open_clip, tmp_path / "ls", ls_init_value=0.1)
    with pytest.raises(ValueError, match="ls_init_value=0.1 is not a plain CLIP ViT"):
        vision_from_hf(str(folder))
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"].pop("ls_init_value")
    cfg["preprocess_cfg"] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not CLIP's"):
        vision_from_hf(str(folder))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"vision_cfg": VISION}}))
    with pytest.raises(FileNotFoundError, match="no open_clip weights"):
        OpenClipReader(tmp_path / "empty")
