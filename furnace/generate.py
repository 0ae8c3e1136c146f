"""Caption images (or continue a prompt about them) with a model exported by `furnace.export`.

    furnace-generate --model OUT/flamingo --image a.jpg [--image b.jpg] [--prompt "<image>"] [--max-new-tokens 20]
                     [--num-beams 3 [--length-penalty 1.0]] [--sample [--temperature T] [--top-k K] [--top-p P]
                     [--seed S]] [--repetition-penalty R]

Every `<image>` in the prompt takes the next --image, in order (one prompt; the default is
`<image>`, a caption). Greedy decoding with a KV cache by default, beam search or sampling when
asked, on the GPU when there is one; decoding stops at <|endofchunk|>. Prints the generated text.
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
             device: str | None = None, seed: int | None = None, **decoding) -> str:
    """`decoding`: `furnace.model.decoding.generate`'s options (num_beams, do_sample, ...)."""
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
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    out = model.generate(torch.tensor([ids], device=device), None, batch_images, valid,
                         max_new_tokens=max_new_tokens, eos_token_id=model.eoc_token_id,
                         pad_token_id=tokenizer.pad_token_id or 0, generator=generator, **decoding)
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
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam scores: log-prob sum / length ** this")
    p.add_argument("--sample", action="store_true", help="sample instead of taking the likeliest token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (nucleus)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    p.add_argument("--seed", type=int, default=None, help="the same samples every time")
    a = p.parse_args(argv)
    for flag, value, ok in (("--max-new-tokens", a.max_new_tokens, a.max_new_tokens >= 1),
                            ("--num-beams", a.num_beams, a.num_beams >= 1),
                            ("--temperature", a.temperature, a.temperature > 0), ("--top-k", a.top_k, a.top_k >= 0),
                            ("--top-p", a.top_p, 0 < a.top_p <= 1),
                            ("--repetition-penalty", a.repetition_penalty, a.repetition_penalty > 0)):
        if not ok:
            p.error(f"{flag}={value} is out of range")
    try:
        print(generate(a.model, a.image, a.prompt, a.max_new_tokens, seed=a.seed, num_beams=a.num_beams,
                       length_penalty=a.length_penalty, do_sample=a.sample, temperature=a.temperature, top_k=a.top_k,
                       top_p=a.top_p, repetition_penalty=a.repetition_penalty))
    except (FileNotFoundError, ValueError) as e:
        print(f"furnace-generate: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
