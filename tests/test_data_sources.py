"""Where a run's data comes from: shard patterns checked before launch, ';' mixing, the
tokenizer's folder, the row length read off the data, and the formats other tools write
(img2dataset caption shards, open_flamingo's MMC4 shards) read as they are."""
import base64
import io
import json
import tarfile

import pytest

from furnace.config import ConfigError, load_config
from furnace.data.lengths import longest_sample
from furnace.data.loader import ShardLoader
from furnace.data.sources import check_sources
from furnace.data.synthetic import demo_tokenizer, draw_sample, sample_rng, vocabulary
from furnace.data.testing import write_caption_shards, write_raw_tar
from furnace.data.text import TextEncoder
from furnace.data.tokenizer import build_word_tokenizer, save_tokenizer, tokenizer_dir


def png(i: int) -> bytes:
    img, _ = draw_sample(sample_rng(0, "src", i), 32)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def caps(tmp_path_factory):
    d = tmp_path_factory.mktemp("caps")
    return d, write_caption_shards(str(d), 40, shards=2)


def test_training_needs_shards_and_every_pattern_must_match_something(caps, tmp_path):
    d, _ = caps
    cfg = load_config(None).data
    with pytest.raises(ConfigError, match="data.train_shards is empty.*--config demo"):
        check_sources(cfg)
    cfg.train_shards = f"{d}/train-{{000000..000001}}.tar;{tmp_path}/mine-{{000000..000003}}.tar"
    with pytest.raises(ConfigError) as e:
        check_sources(cfg)
    assert "no shard matches" in str(e.value) and "mine-{000000..000003}.tar" in str(e.value)
    assert "\n" not in str(e.value)
    cfg.train_shards = f"{d}/train-{{000000..000001}}.tar;{d}/train-000000.tar"  # ';' mixing of two sources
    check_sources(cfg)
    cfg.val_shards = f"{tmp_path}/val.tar"
    with pytest.raises(ConfigError, match="data.val_shards: no shard matches"):
        check_sources(cfg)
    # the demo's own shards may be missing: they are drawn on first use
    demo = load_config("demo").data
    demo.synthetic_dir = str(tmp_path / "demo")
    demo.train_shards = f"{tmp_path}/demo/train-{{000000..000015}}.tar;{d}/train-000000.tar"
    demo.val_shards = f"{tmp_path}/demo/val-000000.tar"
    check_sources(demo)
    assert not (tmp_path / "demo").exists()  # checking draws nothing


def test_mixing_a_user_source_with_the_synthetic_set_builds_only_the_set(caps, tmp_path):
    from furnace.data.demo import ensure_demo_data

    d, _ = caps
    cfg = load_config("demo", [f"data.synthetic_dir={tmp_path}/demo", "data.synthetic_n=16",
                               f"data.train_shards={tmp_path}/demo/train-{{000000..000015}}.tar;{d}/train-000000.tar",
                               f"data.val_shards={tmp_path}/demo/val-000000.tar", "data.train_weights=0.5,0.5"]).data
    ensure_demo_data(cfg)
    ld = ShardLoader.from_config(cfg, demo_tokenizer(), split="train", batch_size=8, image_size=32)
    next(iter(ld))
    assert (tmp_path / "demo" / "train-000015.tar").exists()


def test_the_tokenizer_comes_from_the_config_the_lm_or_the_synthetic_set(tmp_path):
    cfg = load_config(None)
    with pytest.raises(ConfigError, match="data.tokenizer is not set"):
        tokenizer_dir(cfg)
    cfg.model.lm.path = str(tmp_path / "lm")
    (tmp_path / "lm").mkdir()
    with pytest.raises(ConfigError, match="holds no tokenizer.*set data.tokenizer"):
        tokenizer_dir(cfg)
    save_tokenizer(demo_tokenizer(), tmp_path / "lm")
    assert tokenizer_dir(cfg) == str(tmp_path / "lm")
    cfg.data.tokenizer = str(tmp_path / "tok")
    assert tokenizer_dir(cfg) == str(tmp_path / "tok")
    demo = load_config("demo")
    assert tokenizer_dir(demo) == "data/demo/tokenizer"
    # the demo preset on your own shards: the synthetic set's words would not cover them
    mine = load_config("demo", [f"data.train_shards={tmp_path}/mine-000000.tar"])
    with pytest.raises(ConfigError, match="data.tokenizer is not set"):
        tokenizer_dir(mine)


def test_max_length_zero_reads_the_longest_sample_off_the_data(caps):
    d, shards = caps
    tok = demo_tokenizer()
    cfg = load_config("demo", [f"data.train_shards={d}/train-{{000000..000001}}.tar", "data.max_length=0"]).data
    enc = TextEncoder(tok, 1000, 1)
    texts = []
    for path in shards:
        with tarfile.open(path) as tf:
            texts += [tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")]
    longest = max(len(enc.caption(t)) for t in texts)
    assert longest_sample(cfg, tok, cap=64) == -(-longest // 8) * 8
    assert longest_sample(cfg, tok, cap=8) == 8  # the LM's positions bound it


def test_max_length_zero_looks_at_every_source_and_skips_bad_samples(caps, tmp_path):
    d, _ = caps
    tok = demo_tokenizer()
    long_caption = " ".join(["a red circle left of a blue square"] * 3)
    write_raw_tar(str(tmp_path / "other-000000.tar"), [
        ("000000.txt", b"\xff\xfe not utf-8"), ("000000.png", png(0)),  # a bad sample: skipped, not fatal
        ("000001.txt", long_caption.encode()), ("000001.png", png(1)),
    ])
    first = f"{d}/train-{{000000..000001}}.tar"
    cfg = load_config("demo", [f"data.train_shards={first};{tmp_path}/other-000000.tar", "data.max_length=0"]).data
    longest = len(TextEncoder(tok, 1000, 1).caption(long_caption))
    # the first source alone would fill n: the second source's longer sample is still read
    assert longest_sample(cfg, tok, cap=512, n=5) == -(-longest // 8) * 8


def test_img2dataset_shards_read_as_they_are(tmp_path):
    """img2dataset writes key.jpg + key.txt + key.json (its metadata, not a document)."""
    members = []
    for i in range(6):
        meta = {"url": f"http://x/{i}.png", "key": f"{i:09d}", "status": "success", "caption": "ignored",
                "width": 32, "height": 32, "original_width": 640, "exif": "{}", "sha256": "ab" * 32, "error_message": None}
        members += [(f"{i:09d}.jpg", png(i)), (f"{i:09d}.txt", b"a red circle"),
                    (f"{i:09d}.json", json.dumps(meta).encode())]
    write_raw_tar(str(tmp_path / "00000.tar"), members)
    ld = ShardLoader(str(tmp_path / "00000.tar"), demo_tokenizer(), batch_size=6, image_size=32, max_length=16,
                     training=False)
    batch = next(iter(ld))
    assert ld.skipped == {} and batch["media_valid"].all()
    enc = TextEncoder(demo_tokenizer(), 16, 1)
    assert [enc.reference_caption(r) for r in batch["input_ids"]] == ["a red circle"] * 6


def test_open_flamingo_mmc4_shards_read_as_they_are(tmp_path):
    """open_flamingo's MMC4 shards: one .json per document with text_list and image_info whose
    images are base64 inside it; each image goes before its matched sentence."""
    tok = build_word_tokenizer([*vocabulary(), "hello", "there", "end"])
    docs = []
    for i in range(4):
        doc = {"text_list": ["hello there", "a red circle", "a blue square", "end"],
               "image_info": [{"image_name": "x.jpg", "matched_text_index": 1, "matched_sim": 0.3,
                               "image_base64": base64.b64encode(png(2 * i)).decode()},
                              {"image_name": "y.jpg", "matched_text_index": 2, "matched_sim": 0.28,
                               "image_base64": base64.b64encode(png(2 * i + 1)).decode()}],
               "similarity_matrix": [[0.1, 0.3, 0.2, 0.0]], "url": "http://x"}
        docs.append((f"doc{i}.json", json.dumps(doc).encode()))
    docs.append(("bad.json", json.dumps({"text_list": ["a"], "image_info": [{"matched_text_index": 0,
                                                                          "image_base64": "!!!"}]}).encode()))
    write_raw_tar(str(tmp_path / "mmc4.tar"), docs)
    ld = ShardLoader(str(tmp_path / "mmc4.tar"), tok, batch_size=5, image_size=32, max_length=32, max_images=2,
                     training=False)
    batch = next(iter(ld))
    assert ld.skipped == {"bad_image": 1}
    enc = TextEncoder(tok, 32, 2)
    ids = batch["input_ids"][0].tolist()
    text = tok.convert_ids_to_tokens([t for t in ids if t != enc.pad_id])
    assert text == ["<s>", "hello", "there", "<image>", "a", "red", "circle", "<|endofchunk|>", "<image>", "a", "blue",
                    "square", "end", "<|endofchunk|>", "</s>"]
    assert batch["media_valid"][:4].sum().item() == 8
