"""Convert a pretrained Flamingo of another project into folders a furnace run continues from.

    furnace-import idefics SRC --out OUT [--image-token-id N]

SRC: a local IDEFICS folder (transformers' IdeficsForVisionText2Text: config.json, safetensors
and its tokenizer). OUT/lm (the Llama decoder with the tokenizer), OUT/vision (the tower as an HF
CLIP) and OUT/flamingo (the whole model, as furnace-export writes it) are written one tensor at a
time; a run then continues it with model.lm.path=OUT/lm, model.vision.path=OUT/vision and
model.start_from=OUT/flamingo (the `idefics-9b-ft` preset), and furnace-generate / furnace-eval
read OUT/flamingo.
"""
from __future__ import annotations

import argparse
import sys

from furnace.model import idefics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="furnace-import", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["idefics"], help="the checkpoint's project")
    p.add_argument("src", help="the checkpoint folder")
    p.add_argument("--out", required=True)
    p.add_argument("--image-token-id", type=int, default=None,
                   help="<image>'s id (default: read from SRC's tokenizer)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (the memory it holds)")
    a = p.parse_args(argv)
    try:
        out = idefics.convert(a.src, a.out, image_token_id=a.image_token_id,
                              max_shard_bytes=int(a.max_shard_gb * 2**30))
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"furnace import: {e}", file=sys.stderr)
        return 2
    print(f"imported {a.src}: whole model -> {out / 'flamingo'}, decoder -> {out / 'lm'}, tower -> {out / 'vision'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
