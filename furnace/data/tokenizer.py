"""Tokenizers: a local HF tokenizer directory, or a word-level tokenizer built offline (the
demo's: `furnace.data.synthetic.demo_tokenizer`).

`load_tokenizer(path)` always returns a `PreTrainedTokenizerFast` that knows Flamingo's special
tokens (`<image>`, `<|endofchunk|>`), has a pad token and an eos token (and a bos when the
tokenizer defines one). Nothing is downloaded: `path` must be a local directory.
"""
from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from furnace.config import ConfigError, split_sources
from furnace.data.sources import drawn_on_demand
from furnace.tokens import AUDIO_TOKEN, EOC_TOKEN, IMAGE_TOKEN

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

DEMO_PAD, DEMO_UNK, DEMO_BOS, DEMO_EOS = "<pad>", "<unk>", "<s>", "</s>"


def _ensure_specials(tok, audio: bool = False):
    """Register <image>/<|endofchunk|> (and a pad token when missing) as special tokens; with
    `audio` (a run with an audio tower), <audio> too."""
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TypeError(f"expected a fast (tokenizers-backed) tokenizer, got {type(tok).__name__}")
    media = (IMAGE_TOKEN, EOC_TOKEN, AUDIO_TOKEN) if audio else (IMAGE_TOKEN, EOC_TOKEN)
    extra = [t for t in media if t not in tok.get_vocab()
             or t not in tok.all_special_tokens]
    if extra:
        current = list(getattr(tok, "extra_special_tokens", None) or [])
        if isinstance(current, dict):  # some versions keep a name -> token mapping
            current = list(current.values())
        tok.add_special_tokens({"extra_special_tokens": current + [t for t in extra if t not in current]},
                               replace_extra_special_tokens=True)
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": DEMO_EOS})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": DEMO_PAD})
    for t in media:
        if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id):
            raise RuntimeError(f"tokenizer failed to register {t}")
    return tok


def build_word_tokenizer(words: Iterable[str], audio: bool = False):
    """A word-level `PreTrainedTokenizerFast` over `words` (lower-cased, split on whitespace
    and punctuation) with <pad>, <unk>, <s>, </s>, <image>, <|endofchunk|> (and <audio>)."""
    specials = [DEMO_PAD, DEMO_UNK, DEMO_BOS, DEMO_EOS, IMAGE_TOKEN, EOC_TOKEN] + ([AUDIO_TOKEN] if audio else [])
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    for w in sorted({w.lower() for w in words}):
        if w not in vocab:
            vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=DEMO_UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=DEMO_BOS, eos_token=DEMO_EOS, unk_token=DEMO_UNK,
        pad_token=DEMO_PAD, extra_special_tokens=specials[4:],
        model_max_length=1024, padding_side="right")
    return _ensure_specials(tok, audio)


def save_tokenizer(tok, path: str | os.PathLike) -> None:
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(str(path))


def load_tokenizer(path: str | os.PathLike, audio: bool = False):
    """`path`: a local HF tokenizer directory (tokenizer.json etc.); `audio`: <audio> registered too."""
    if path is None:
        raise FileNotFoundError("no tokenizer directory given; pass a local HF tokenizer dir (data.tokenizer)")
    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} not found; pass a local HF tokenizer dir "
                                "(nothing is downloaded)")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        # The fast tokenizer file is complete (model, specials, added tokens); loading it directly
        # skips the Auto* class resolution, which costs seconds of imports.
        tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:  # e.g. a sentencepiece-only dir: let transformers convert it (Auto* costs seconds to import)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    tok.padding_side = "right"
    return _ensure_specials(tok, audio)


def tokenizer_dir(cfg) -> str:
    """Where a run's tokenizer comes from: data.tokenizer; else the pretrained LM's folder
    (model.lm.path) when it holds one; else the synthetic set's (data.synthetic_dir/tokenizer,
    drawn with the set). One ConfigError line naming the key to set otherwise."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    lm = cfg.model.lm.path
    if lm:
        if any(os.path.isfile(os.path.join(lm, f)) for f in TOKENIZER_FILES):
            return lm
        raise ConfigError(f"model.lm.path={lm!r} holds no tokenizer ({' / '.join(TOKENIZER_FILES)}): set "
                          "data.tokenizer to the LM's tokenizer folder")
    sources = split_sources(cfg.data.train_shards)
    if cfg.data.synthetic_dir and sources and all(drawn_on_demand(p, cfg.data) for p in sources):
        return os.path.join(cfg.data.synthetic_dir, "tokenizer")  # the synthetic set's, for its own shards
    raise ConfigError("data.tokenizer is not set: a language model trained from scratch on your data needs a "
                      "tokenizer; set data.tokenizer to a local HF tokenizer folder (or start from a pretrained "
                      "LM: --config finetune)")


def special_ids(tok) -> dict[str, int | None]:
    """Ids the loader and the model need ("audio": None unless the tokenizer has <audio>)."""
    return {
        "image": tok.convert_tokens_to_ids(IMAGE_TOKEN),
        "audio": audio_token_id(tok),
        "eoc": tok.convert_tokens_to_ids(EOC_TOKEN),
        "pad": tok.pad_token_id,
        "eos": tok.eos_token_id,
        "bos": tok.bos_token_id,
    }


def audio_token_id(tok) -> int | None:
    """<audio>'s id, or None in a tokenizer without it (a run without an audio tower)."""
    return tok.get_vocab().get(AUDIO_TOKEN)
