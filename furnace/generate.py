"""Caption images and audio clips (or continue a prompt about them) with a model exported by
`furnace.export`, or a training run's newest complete checkpoint.

    furnace-generate --model OUT/flamingo|RUN_DIR --image a.jpg [--image b.jpg] [--audio c.wav] [--prompt "<image>"] [--max-new-tokens 20]
                     [--num-beams 3 [--length-penalty 1.0]] [--sample [--temperature T] [--top-k K] [--top-p P]
                     [--seed S]] [--repetition-penalty R] [--stop STR] [--quantize int8|int4] [--dtype bf16]

Every `<image>` in the prompt takes the next --image, in order, and every `<audio>` the next
--audio (a model with an audio tower; the clip is resampled to its rate and cut to its window);
one prompt, the default `<image>` (`<audio>` with clips only): a caption. Greedy decoding with a KV cache by default, beam search or sampling when
asked, on the GPU when there is one; decoding stops at <|endofchunk|> or a --stop string.
Launched on N ranks (`torchrun --nproc_per_node N -m furnace.generate ...`) the model is split
tensor-parallel over them, each rank reading only its cut of each tensor, and the vocabulary's
logits are gathered for every token. Prints the generated text (rank 0).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from furnace.data.audio import AudioError, decode_audio
from furnace.data.images import decode_image, normalize
from furnace.data.text import TextEncoder
from furnace.data.tokenizer import load_tokenizer
from furnace.model.flamingo_io import load_flamingo
from furnace.export import load_run_model
from furnace.model.quantize import quantize_lm
from furnace.parallel.apply import parallelize
from furnace.parallel.materialize import load_flamingo_sharded
from furnace.parallel.topology import Topology
from furnace.training.distributed import join_launched_group
from furnace.tokens import AUDIO_TOKEN, IMAGE_TOKEN


def load(model_dir, device, topology: Topology | None = None):
    """(the model, whole or this rank's tensor-parallel part of `topology`, on `device`; its
    tokenizer) from an exported folder (each rank reads only its cut of each tensor) or a
    training run directory (its newest complete checkpoint, consolidated in each process, then cut)."""
    path = Path(model_dir)
    tp = topology is not None and topology.tp > 1
    if (path / "flamingo.json").is_file():
        if tp:
            model = load_flamingo_sharded(path, topology, device=torch.device(device))
        else:
            model = load_flamingo(path).to(device)
        return model.eval(), load_tokenizer(path)
    if (path / "checkpoints").is_dir():
        model, tokenizer, _, _ = load_run_model(path)
        if tp:
            model = parallelize(model, topology)
        return model.to(device).eval(), tokenizer
    raise FileNotFoundError(f"{str(path)!r} is neither an exported model (no flamingo.json) nor a run directory "
                            "(no checkpoints/): pass furnace-export's OUT/flamingo or a train.run_dir")


def generate(model_dir, images: list[str], prompt: str | None = None, max_new_tokens: int = 20,
             device: str | None = None, seed: int | None = None, stop: list[str] = (), quantize: str = "none",
             dtype: torch.dtype | None = None, tp: int = 1, audio: list[str] = (), **decoding) -> str:
    """`decoding`: `furnace.model.decoding.generate`'s options (num_beams, do_sample, ...);
    `tp`: how many launched ranks the model is split over (tensor parallel); `audio`: clip files."""
    device = device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    if prompt is None:
        prompt = AUDIO_TOKEN if audio and not images else IMAGE_TOKEN
    for token, files, flag in ((IMAGE_TOKEN, images, "--image"), (AUDIO_TOKEN, audio, "--audio")):
        if prompt.count(token) != len(files):
            raise ValueError(f"the prompt holds {prompt.count(token)} {token} but {len(files)} {flag} were given; "
                             f"give one {flag} per {token}")
    model, tokenizer = load(model_dir, device, Topology(tp=tp) if tp > 1 else None)
    if audio and model.audio is None:
        raise ValueError(f"{str(model_dir)!r} has no audio tower (model.audio): it cannot read --audio clips")
    if dtype is not None:
        model = model.to(dtype)
    if quantize != "none":
        quantize_lm(model, quantize)
    text = TextEncoder(tokenizer, max_length=0, max_images=len(images) + len(audio))
    ids = text.prompt(prompt)
    size = model.vision.image_size
    mean, std = model.vision.image_stats
    param_dtype = next(model.perceiver.parameters()).dtype
    # the media slots in prompt order: the k-th media token's medium in slot k
    kinds = [t == text.audio_id for t in ids if t in (text.image_id, text.audio_id)]
    batch_images = torch.zeros(1, len(kinds), 1, 3, size, size)
    pictures, clips = iter(images), iter(audio)
    for k, is_clip in enumerate(kinds):
        if not is_clip:
            batch_images[0, k, 0] = normalize(torch.from_numpy(_read(next(pictures), size)), mean, std)
    batch_images = batch_images.to(device, param_dtype)  # [1, T, 1, C, H, W]
    valid = torch.ones(1, len(kinds), dtype=torch.bool, device=device)
    extra = {}
    if audio:
        tower = model.audio.tower
        wave = torch.zeros(1, len(kinds), tower.num_samples)
        for k, is_clip in enumerate(kinds):
            if is_clip:
                x = torch.from_numpy(_read_audio(next(clips), tower.sample_rate, tower.num_samples))
                wave[0, k, : len(x)] = x
        extra = {"audio": wave.to(device), "audio_valid": torch.tensor([kinds], device=device)}
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    out = model.generate(torch.tensor([ids], device=device), None, batch_images, valid,
                         max_new_tokens=max_new_tokens, eos_token_id=model.eoc_token_id,
                         pad_token_id=tokenizer.pad_token_id or 0, generator=generator,
                         stop=text.stop_check(stop) if stop else None, **extra, **decoding)
    return text.cut_at(text.decode(out[0].cpu()), stop)


def _read(path: str, size: int):
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read image {path!r}: {e.strerror or e}") from None
    try:
        return decode_image(data, size).copy()
    except Exception as e:  # PIL's many errors on what is not a JPEG/PNG/WEBP image
        raise ValueError(f"{path!r} is not a JPEG, PNG or WEBP image ({type(e).__name__})") from None


def _read_audio(path: str, rate: int, samples: int):
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read audio clip {path!r}: {e.strerror or e}") from None
    try:
        return decode_audio(data, rate, keep=samples, resample=True)
    except AudioError as e:
        raise ValueError(f"{path!r}: {e.reason} ({e.detail})") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="furnace-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model folder (OUT/flamingo) or a training run directory")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--audio", action="append", default=[],
                   help="an audio clip, WAV/FLAC/MP3/Ogg (repeatable; a model with an audio tower)")
    p.add_argument("--prompt", default=None,
                   help=f"text with one {IMAGE_TOKEN} per image and one {AUDIO_TOKEN} per clip "
                        f"(default {IMAGE_TOKEN}, or {AUDIO_TOKEN} with clips only)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam scores: log-prob sum / length ** this")
    p.add_argument("--sample", action="store_true", help="sample instead of taking the likeliest token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (nucleus)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    p.add_argument("--seed", type=int, default=None, help="the same samples every time")
    p.add_argument("--stop", action="append", default=[], help="end the text where this string appears (repeatable)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="the LM's linear weights in int8 (LLM.int8()) or 4-bit NF4, by bitsandbytes")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: as stored")
    a = p.parse_args(argv)
    for flag, value, ok in (("--max-new-tokens", a.max_new_tokens, a.max_new_tokens >= 1),
                            ("--num-beams", a.num_beams, a.num_beams >= 1),
                            ("--temperature", a.temperature, a.temperature > 0), ("--top-k", a.top_k, a.top_k >= 0),
                            ("--top-p", a.top_p, 0 < a.top_p <= 1),
                            ("--repetition-penalty", a.repetition_penalty, a.repetition_penalty > 0)):
        if not ok:
            p.error(f"{flag}={value} is out of range")
    if not a.image and not a.audio:
        p.error("give at least one --image or --audio")
    if a.num_beams > 1 and a.sample:
        p.error("--num-beams with --sample: beam search takes the likeliest tokens; choose one")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(a.dtype)
    rank, world = join_launched_group()
    try:
        text = generate(a.model, a.image, a.prompt, a.max_new_tokens, seed=a.seed, stop=a.stop, quantize=a.quantize,
                        dtype=dtype, tp=world, audio=a.audio, num_beams=a.num_beams, length_penalty=a.length_penalty,
                        do_sample=a.sample, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                        repetition_penalty=a.repetition_penalty)
    except (FileNotFoundError, ValueError) as e:
        print(f"furnace-generate: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
