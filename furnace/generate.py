"""Caption images (or continue a prompt about them) with a model exported by `furnace.export`.

    furnace-generate --model OUT/flamingo --image a.jpg [--image b.jpg] [--prompt "<image>"] [--max-new-tokens 20]

Every `<image>` in the prompt takes the next --image, in order (one prompt; the default is
`<image>`, a caption). Greedy decoding with a KV cache, on the GPU when there is one. Prints
the generated text.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from furnace.data.images import decode_image, normalize
from furnace.data.text import TextEncoder
from furnace.data.tokenizer import load_tokenizer
from furnace.model.flamingo_io import load_flamingo
from furnace.tokens import IMAGE_TOKEN


def generate(model_dir, images: list[str], prompt: str = IMAGE_TOKEN, max_new_tokens: int = 20,
             device: str | None = None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (Path(model_dir) / "flamingo.json").is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} holds no flamingo.json: pass the flamingo/ folder that "
                                "furnace-export wrote")
    model = load_flamingo(model_dir).eval().to(device)
    tokenizer = load_tokenizer(model_dir)
    if prompt.count(IMAGE_TOKEN) != len(images):
        raise ValueError(f"the prompt holds {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} but {len(images)} --image "
                         f"were given; give one --image per {IMAGE_TOKEN}")
    text = TextEncoder(tokenizer, max_length=0, max_images=len(images))
    ids = text.prompt(prompt)
    size = model.vision.image_size
    mean, std = model.vision.image_stats
    pixels = torch.stack([torch.from_numpy(_read(p, size)) for p in images])
    batch_images = normalize(pixels, mean, std)[None, :, None].to(device)  # [1, T, 1, C, H, W]
    valid = torch.ones(1, len(images), dtype=torch.bool, device=device)
    out = model.generate(torch.tensor([ids], device=device), None, batch_images, valid,
                         max_new_tokens=max_new_tokens, eos_token_id=model.eoc_token_id,
                         pad_token_id=tokenizer.pad_token_id or 0)
    return text.decode(out[0].cpu())


def _read(path: str, size: int):
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read image {path!r}: {e.strerror or e}") from None
    try:
        return decode_image(data, size).copy()
    except Exception as e:  # PIL's many errors on what is not a JPEG/PNG/WEBP image
        raise ValueError(f"{path!r} is not a JPEG, PNG or WEBP image ({type(e).__name__})") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="furnace-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model folder (OUT/flamingo)")
    p.add_argument("--image", action="append", default=[], required=True, help="an image file (repeatable)")
    p.add_argument("--prompt", default=IMAGE_TOKEN, help=f"text with one {IMAGE_TOKEN} per image")
    p.add_argument("--max-new-tokens", type=int, default=20)
    a = p.parse_args(argv)
    try:
        print(generate(a.model, a.image, a.prompt, a.max_new_tokens))
    except (FileNotFoundError, ValueError) as e:
        print(f"furnace-generate: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
