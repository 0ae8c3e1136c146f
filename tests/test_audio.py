"""Audio: PyAV decoding (WAV / FLAC) with its bounds, bad clips skipped and counted, `furnace-shards
audio`, <audio> as a media token (mixed image + audio documents and batches), the Whisper-shaped
tower (its log-mel equal to transformers' feature extractor, a local Whisper folder's encoder equal
to transformers'), the synthetic tones-and-beeps set, a 2-rank run of the demo-audio preset, and
the parallel layouts on a mixed image + audio set against one process."""
from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from furnace.config import ConfigError, load_config, validate
from furnace.data.audio import AudioError, AudioSpec, decode_audio, encode_audio, probe_audio
from furnace.data.collate import collate
from furnace.data.images import CLIP_MEAN, CLIP_STD, decode_image
from furnace.data.loader import ShardLoader
from furnace.data.samples import SampleDecoder
from furnace.data.shard_writer import ShardWriter, read_stats
from furnace.data.synthetic import draw_sample, sample_rng as image_rng, vocabulary as image_words
from furnace.data.synthetic_audio import CAPTIONS, build, draw_clip, sample_rng, vocabulary as audio_words
from furnace.data.testing import write_raw_tar
from furnace.data.text import SkipSample, TextEncoder
from furnace.data.tokenizer import build_word_tokenizer, save_tokenizer
from furnace.tokens import text_time

from train_utils import ROOT, TINY, env, metrics, run, train_preset_briefly

RATE = 16000


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(image_words() + audio_words(), audio=True)


def tone(seconds: float, f: float = 440.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32)


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("fmt", ["flac", "wav"])
def test_a_written_clip_decodes_to_its_samples(fmt):
    x = tone(0.3)
    data = encode_audio(x, RATE, fmt)
    info = probe_audio(data)
    assert (info["container"], info["sample_rate"], info["channels"]) == (fmt, RATE, 1)
    assert abs(info["seconds"] - 0.3) < 1e-3
    y = decode_audio(data, RATE)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() < 2 / 32767  # 16-bit PCM
    assert np.array_equal(decode_audio(data, RATE, keep=1000), y[:1000])
    with pytest.raises(AudioError, match="wrong_sample_rate"):
        decode_audio(data, 8000)
    z = decode_audio(data, 8000, resample=True)  # what the shard writer does
    assert abs(z.size - x.size // 2) <= 64
    with pytest.raises(AudioError, match="unsupported_audio"):  # a header's rate past MAX_SAMPLE_RATE
        probe_audio(encode_audio(np.zeros(1000, np.float32), 400_000, "wav"))


def test_bad_clips_are_skipped_and_counted(tmp_path, tok):
    good = encode_audio(tone(0.5), RATE)
    cap = b"a low hum"
    members = [
        ("good0.flac", good), ("good0.txt", cap),
        ("cut.flac", good[:40]), ("cut.txt", cap),                                   # truncated in its header
        ("junk.wav", b"RIFF\x00\x10\x00\x00WAVEfmt " + b"\x07" * 200), ("junk.txt", cap),  # undecodable
        ("midi.wav", b"MThd\x00\x00\x00\x06" + b"\x00" * 64), ("midi.txt", cap),     # not WAV/FLAC/MP3/Ogg
        ("rate.flac", encode_audio(tone(0.5, rate=22050), 22050)), ("rate.txt", cap),  # another rate
        ("long.wav", encode_audio(tone(3.0), RATE, "wav")), ("long.txt", cap),        # > max_audio_seconds
        ("short.flac", encode_audio(tone(0.01), RATE)), ("short.txt", cap),          # < min_audio_seconds
        ("good1.wav", encode_audio(tone(1.5, 880), RATE, "wav")), ("good1.txt", cap),  # cut to the window
    ]
    write_raw_tar(str(tmp_path / "bad.tar"), members)
    spec = AudioSpec(RATE, 16000, max_seconds=2.0, min_seconds=0.05)
    ld = ShardLoader(str(tmp_path / "bad.tar"), tok, batch_size=8, image_size=8, max_length=8, training=False,
                     audio=spec)
    keys, batches = [], []
    for b in ld:
        keys += [k for k in ld.last_keys if k is not None]
        batches.append(b)
    assert keys == ["good0", "good1"]
    b = batches[0]
    assert b["audio"].shape == (2, 1, 16000) and b["audio_valid"].tolist() == [[True], [True]]
    assert torch.count_nonzero(b["audio"][0, 0, 8000:]) == 0  # 0.5 s, zero-padded
    assert torch.count_nonzero(b["images"]) == 0               # an audio slot holds no image
    assert ld.skipped == {"bad_audio": 2, "unsupported_audio": 1, "wrong_sample_rate": 1, "audio_too_long": 1,
                          "audio_too_short": 1}
    # A run without an audio tower skips clips, counted (its tokenizer has no <audio> either).
    plain = build_word_tokenizer(audio_words())
    ld = ShardLoader(str(tmp_path / "bad.tar"), plain, batch_size=4, image_size=8, max_length=8, training=False)
    assert sum(b["media_valid"].sum().item() for b in ld) == 0
    assert ld.skipped == {"audio_not_enabled": 8}


# ---------------------------------------------------------------------------- tokens, samples, batches

def test_a_document_mixes_images_and_audio(tok):
    """An interleaved document with an image and a clip: <image> and <audio> in order, each
    starting a medium (text_time), both unlabelled; the batch marks the clip's slot."""
    img, _ = draw_sample(image_rng(0, "train", 0), 32)
    doc = {"segments": [{"text": "a"}, {"image": "0.png"}, {"text": "red circle"}, {"audio": "1.flac"},
                        {"text": "a low hum"}]}
    raw = {"__key__": "d", "json": json.dumps(doc).encode(), "0.png": png(img), "1.flac": encode_audio(tone(0.4), RATE)}
    enc = TextEncoder(tok, 16, 2)
    dec = SampleDecoder(enc, image_size=32, audio=AudioSpec(RATE, 8000))
    row = dec.row(raw)
    ids, media, interleaved, _ = row
    assert interleaved and media[0].shape == (32, 32, 3) and media[1].shape == (6400,)
    assert [t for t in ids if t in (enc.image_id, enc.audio_id)] == [enc.image_id, enc.audio_id]
    caption = (enc.caption("two short beeps", audio=True), [np.zeros(100, np.float32)], False, False)
    b = collate([row, caption], enc, max_length=16, max_images=2, image_size=32, mean=CLIP_MEAN, std=CLIP_STD,
                pad_to_max=True, audio_samples=8000)
    assert b["audio"].shape == (2, 2, 8000)
    assert b["media_valid"].tolist() == [[True, True], [True, False]]
    assert b["audio_valid"].tolist() == [[False, True], [True, False]]
    assert torch.count_nonzero(b["images"][0, 1]) == 0 and torch.count_nonzero(b["images"][1]) == 0
    media_pos = [i for i, t in enumerate(b["input_ids"][0].tolist()) if t in (enc.image_id, enc.audio_id)]
    tt = text_time(b["input_ids"], enc.media_ids)
    assert tt[0, media_pos[0]] == 1 and tt[0, media_pos[1]] == 2 and tt[0, -1] == 2
    assert (b["labels"][0, media_pos] == -100).all()
    assert enc.reference_caption(b["input_ids"][1]) == "two short beeps"
    with pytest.raises(SkipSample, match="audio_not_enabled"):
        SampleDecoder(enc, image_size=32).row(raw)


def test_config_keys_name_the_fix():
    cfg = load_config("demo-audio", [])
    assert validate(cfg, 2, check_paths=False) == 2
    for sets, words in ((["model.audio_perceiver.num_latents=8"], "model.audio_perceiver.num_latents"),
                        (["model.audio.kind=whisper"], "model.audio.path"),
                        (["model.audio.hidden_size=66"], "model.audio.hidden_size"),
                        (["data.min_audio_seconds=700"], "data.min_audio_seconds"),
                        (["model.audio.kind=none"], "data.synthetic_kind=audio"),
                        (["model.audio.seconds=0"], "model.audio.seconds")):
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as e:
            validate(load_config("demo-audio", sets), 2, check_paths=False)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- the tower

def test_log_mel_is_whispers_feature_extractor():
    from transformers import WhisperFeatureExtractor

    from furnace.model.audio import LogMel

    fe = WhisperFeatureExtractor(feature_size=40, sampling_rate=RATE, hop_length=160, chunk_length=1, n_fft=400)
    rng = np.random.default_rng(0)
    waves = [tone(0.7, 300) + 0.05 * rng.standard_normal(int(0.7 * RATE)).astype(np.float32),
             tone(1.0, 2500)]
    want = fe(waves, sampling_rate=RATE, return_tensors="np", padding="max_length").input_features
    padded = torch.zeros(2, RATE)
    for i, w in enumerate(waves):
        padded[i, : len(w)] = torch.from_numpy(w)
    mel = LogMel(RATE, 400, 160, 40)
    got = mel(padded).numpy()
    assert got.shape == want.shape == (2, 40, 100)
    assert np.abs(got - want).max() < 1e-4
    assert np.array_equal(mel.bfloat16()(padded).numpy(), got)  # a bf16 model's front end stays fp32


def test_a_whisper_folder_is_read_as_transformers_encodes(tmp_path):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    from furnace.model.audio import audio_from_hf

    hf = WhisperConfig(num_mel_bins=40, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                       decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, max_source_positions=50,
                       max_target_positions=16, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       decoder_start_token_id=3)
    ref = WhisperModel(hf).eval()
    ref.save_pretrained(tmp_path / "whisper")
    fe = WhisperFeatureExtractor(feature_size=40, sampling_rate=RATE, hop_length=160, chunk_length=1, n_fft=400)
    fe.save_pretrained(tmp_path / "whisper")
    tower = audio_from_hf(str(tmp_path / "whisper"))
    assert (tower.sample_rate, tower.num_samples, tower.hidden_size) == (RATE, RATE, 32)
    assert not any(p.requires_grad for p in tower.parameters())
    waves = [tone(0.6, 500), tone(1.2, 1500)]  # the second is cut to the 1 s window, as the extractor does
    feats = fe(waves, sampling_rate=RATE, return_tensors="pt", padding="max_length", truncation=True).input_features
    with torch.no_grad():
        want = ref.encoder(input_features=feats).last_hidden_state
    batch = torch.zeros(2, int(1.2 * RATE))
    batch[0, : len(waves[0])], batch[1] = torch.from_numpy(waves[0]), torch.from_numpy(waves[1])
    got = tower(batch)
    assert got.shape == want.shape == (2, 50, 32)
    assert (got - want).abs().max() < 1e-4
    # as a run reads it: validated against its config.json, its shape written back into the config
    from furnace.training.build import build_model

    cfg = load_config("demo-audio", [f"model.audio.path={tmp_path / 'whisper'}", "model.audio.kind=whisper",
                                     "model.freeze_audio=true"])
    validate(cfg, 2, check_paths=True)
    model = build_model(cfg, build_word_tokenizer(audio_words(), audio=True))
    a = cfg.model.audio
    assert (a.hidden_size, a.num_layers, a.num_mel_bins, a.seconds, a.sample_rate) == (32, 2, 40, 1.0, RATE)
    assert model.audio.proj is not None and not any(p.requires_grad for p in model.audio.tower.parameters())
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ConfigError, match="model.audio.path"):
        validate(load_config("demo-audio", [f"model.audio.path={tmp_path / 'clip'}", "model.audio.kind=whisper"]), 2)


def _tiny_model(tok, **audio):
    from furnace.training.build import build_model

    cfg = load_config("demo-audio", [s for s in TINY if s.startswith("model.")] + ["model.perceiver.num_latents=4",
                                                                                "model.audio_perceiver.num_latents=4"])
    cfg.model.audio.num_layers = 1
    for k, v in audio.items():
        setattr(cfg.model.audio, k, v)
    torch.manual_seed(0)
    return build_model(cfg, tok)


def test_a_mixed_batch_trains_every_part(tok):
    """A caption image, an audio clip, and a document with both: the loss backpropagates into the
    audio branch and the image side; an image-only batch still runs the audio branch (0 gradient)."""
    model = _tiny_model(tok)
    enc = TextEncoder(tok, 16, 2)
    img = decode_image(png(draw_sample(image_rng(0, "train", 1), 32)[0]), model.vision.image_size)
    clip = tone(0.5)
    doc_ids, _ = enc.document([{"image": 0}, {"text": "a red circle"}, {"audio": 1}, {"text": "a low hum"}])
    rows = [(enc.caption("a red circle"), [img], False, False), (enc.caption("a low hum", audio=True), [clip], False, False),
            (doc_ids, [img, clip], True, False)]
    b = collate(rows, enc, max_length=16, max_images=2, image_size=model.vision.image_size, mean=CLIP_MEAN,
                std=CLIP_STD, pad_to_max=True, audio_samples=model.audio.tower.num_samples)
    loss = model(b)
    loss.backward()
    assert torch.isfinite(loss)
    for part in (model.audio.tower, model.audio.perceiver, model.perceiver, model.vision):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    # the latents of an image slot are the image side's alone
    with torch.no_grad():
        lat = model.encode_media(b["images"], b["media_valid"], b["audio"], b["audio_valid"])
        alone = model.perceiver(model.vision(b["images"][0, :1, 0])[:, None])
    assert torch.allclose(lat[0, 0], alone[0], atol=1e-5)
    assert torch.count_nonzero(lat[0, 1]) == 0
    model.zero_grad()
    only = collate(rows[:1], enc, max_length=16, max_images=2, image_size=model.vision.image_size, mean=CLIP_MEAN,
                   std=CLIP_STD, pad_to_max=True)  # no audio keys at all
    model(only).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.audio.parameters())
    with pytest.raises(ValueError, match="audio_valid"):  # an <audio> token over an image slot
        model.check_media(b["input_ids"], b["media_valid"], torch.zeros_like(b["audio_valid"]))


# ---------------------------------------------------------------------------- furnace-shards audio

def test_furnace_shards_audio_round_trip(tmp_path, tok):
    """The README's command on a WAV, a FLAC at another rate (resampled), a document mixing an
    image and a clip (interleaved), and bad inputs; the loader reads the clips back."""
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    (sounds / "a.wav").write_bytes(encode_audio(tone(0.5, 440), RATE, "wav"))
    (sounds / "b.flac").write_bytes(encode_audio(tone(0.5, 440, 22050), 22050))
    (sounds / "short.flac").write_bytes(encode_audio(tone(0.01), RATE))
    (sounds / "broken.flac").write_bytes(encode_audio(tone(0.5), RATE)[:60])
    (sounds / "text.wav").write_bytes(b"not audio at all")
    lines = [{"audio": "sounds/a.wav", "caption": "a low hum"}, {"audio": "sounds/b.flac", "caption": "a long beep"},
             {"audio": "sounds/short.flac", "caption": "x"}, {"audio": "sounds/broken.flac", "caption": "x"},
             {"audio": "sounds/text.wav", "caption": "x"}, {"audio": "sounds/missing.wav", "caption": "x"},
             {"caption": "no clip"}, {"audio": "sounds/a.wav"}]
    (tmp_path / "sounds.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    command = "furnace-shards audio --input sounds.jsonl --out data/sounds --sample-rate 16000"
    argv = [str(Path(sys.executable).parent / "furnace-shards"), *command.split()[1:], "--no-progress"]
    res = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env())
    assert res.returncode == 0, res.stderr
    stats = read_stats(str(tmp_path / "data" / "sounds"), "train")
    assert stats["samples"] == 2 and stats["inputs"] == 8
    assert stats["skipped"] == {"audio_too_short": 1, "bad_audio": 1, "unsupported_audio": 1, "missing_audio": 2,
                                "missing_caption": 1}
    img, _ = draw_sample(image_rng(0, "train", 2), 32)
    img.save(tmp_path / "sounds" / "x.png")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"segments": [{"image": "sounds/x.png"}, {"text": "a red circle"},
                                                                  {"audio": "sounds/b.flac"}, {"text": "a long beep"}]}))
    res = subprocess.run([argv[0], "interleaved", "--input", "docs.jsonl", "--out", "data/sounds", "--prefix", "docs",
                          "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env())
    assert res.returncode == 0, res.stderr
    spec = AudioSpec(RATE, 16000)
    ld = ShardLoader([str(tmp_path / "data" / "sounds" / "train-000000.tar"),
                      str(tmp_path / "data" / "sounds" / "docs-000000.tar")], tok, batch_size=4, image_size=32,
                     max_length=16, max_images=2, training=False, audio=spec)
    b = next(iter(ld))  # shards in name order: the document, then a.wav and b.flac
    assert ld.skipped == {} and b["audio_valid"].tolist() == [[False, True], [True, False], [True, False]]
    assert b["media_valid"].tolist() == [[True, True], [True, False], [True, False]]
    want = tone(0.5, 440)
    assert (b["audio"][1, 0, :8000] - torch.from_numpy(want)).abs().max() < 1e-3
    # the 22.05 kHz clip, resampled to 16 kHz: the same tone, within the resampler's error
    for got in (b["audio"][2, 0], b["audio"][0, 1]):
        assert (got[400:7600] - torch.from_numpy(want[400:7600])).abs().max() < 0.05


# ---------------------------------------------------------------------------- the synthetic set

def _peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * RATE / len(x))


def test_synthetic_clips_sound_as_their_captions_say():
    seen = Counter()
    for i in range(60):
        x, caption = draw_clip(sample_rng(0, "train", i))
        assert x.shape == (RATE,) and x.dtype == np.float32 and np.abs(x).max() <= 1.0
        env_ = np.convolve(np.abs(x), np.ones(160) / 160, mode="same") > 0.1
        edges = np.flatnonzero(np.diff(env_.astype(int)) == 1)
        on = np.flatnonzero(env_)
        first, last = x[on[0]:on[0] + 1600], x[on[-1] - 1600:on[-1]]
        if caption in ("a rising tone", "a falling tone"):
            assert (_peak_hz(last) > _peak_hz(first)) == (caption == "a rising tone"), caption
        elif caption == "a low hum":
            assert _peak_hz(x) < 350
        elif caption == "a high whistle":
            assert _peak_hz(x) > 1900
        elif caption.endswith(("beep", "beeps")) and caption != "a long beep":
            assert len(edges) + int(env_[0]) == {"one": 1, "two": 2, "three": 3}[caption.split()[0]], (i, caption)
        else:
            assert 0.4 * RATE < len(on) < 0.85 * RATE
        seen[caption] += 1
    assert set(seen) == set(CAPTIONS)
    assert np.array_equal(draw_clip(sample_rng(0, "train", 5))[0], draw_clip(sample_rng(0, "train", 5))[0])


@pytest.fixture(scope="module")
def audio_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("audio") / "set"
    meta = build(str(out), n=96, seed=0, shards=2, n_val=16)
    return {"dir": str(out), "train": meta["train_pattern"], "val": meta["val_pattern"]}


@pytest.mark.multirank
def test_demo_audio_trains_on_two_ranks(audio_set, tmp_path):
    """The demo-audio preset on 2 gloo ranks, on a tiny set, a few steps: the loss falls; the
    held-out evaluation captions clips."""
    run_dir = tmp_path / "run"
    train_preset_briefly("demo-audio", audio_set, run_dir)
    # exported and read back whole (flamingo.json keeps <audio>'s id), it captions a clip
    from furnace.data.tokenizer import load_tokenizer
    from furnace.export import export
    from furnace.model.flamingo_io import load_flamingo

    export(run_dir, tmp_path / "out", progress=False)
    model, tok = load_flamingo(tmp_path / "out" / "flamingo").eval(), load_tokenizer(tmp_path / "out" / "flamingo")
    assert model.audio is not None and model.audio_token_id == tok.convert_tokens_to_ids("<audio>")
    enc = TextEncoder(tok, 8, 1)
    clip = torch.from_numpy(draw_clip(sample_rng(0, "probe", 0))[0])[None, None]
    out = model.generate(torch.tensor([enc.prompt("<audio>")]), None, torch.zeros(1, 1, 1, 3, 8, 8),
                         torch.ones(1, 1, dtype=torch.bool), audio=clip, audio_valid=torch.ones(1, 1, dtype=torch.bool),
                         max_new_tokens=4, eos_token_id=model.eoc_token_id)
    assert out.shape[0] == 1 and model.audio_token_id not in out[0].tolist()
    # furnace-generate --audio: a 22.05 kHz WAV, resampled to the tower's rate
    from furnace.generate import generate

    (tmp_path / "clip.wav").write_bytes(encode_audio(tone(1.0, 440, 22050), 22050, "wav"))
    assert isinstance(generate(tmp_path / "out" / "flamingo", [], audio=[str(tmp_path / "clip.wav")], max_new_tokens=4),
                      str)
    with pytest.raises(ValueError, match="--audio"):
        generate(tmp_path / "out" / "flamingo", [], prompt="<audio><audio>", audio=[str(tmp_path / "clip.wav")])


# ---------------------------------------------------------------------------- parallel layouts

@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory):
    """Image captions, audio captions and documents holding an image and a clip, shuffled together
    in 4 training shards (+ a validation shard), with a tokenizer that has <audio>."""
    out = tmp_path_factory.mktemp("mixed")
    rng = random.Random(0)

    def write(prefix, n, shards):
        writer = ShardWriter(str(out), prefix, maxcount=-(-n // shards), sample_rate=RATE)
        for i in range(n):
            img, icap = draw_sample(image_rng(0, prefix, i), 32)
            clip, acap = draw_clip(sample_rng(0, prefix, i))
            kind = rng.randrange(3)
            if kind == 0:
                writer.add_caption(img, icap)
            elif kind == 1:
                writer.add_audio(encode_audio(clip, RATE), acap)
            else:
                writer.add_interleaved([{"image": img}, {"text": icap}, {"audio": encode_audio(clip, RATE)},
                                        {"text": acap}])
        return writer.close()

    write("train", 160, 4)
    write("val", 16, 1)
    save_tokenizer(build_word_tokenizer(image_words() + audio_words(), audio=True), out / "tokenizer")
    return out


MIXED = ["model.audio.kind=scratch", "model.audio.num_mel_bins=16", "model.audio.hidden_size=32",
         "model.audio.intermediate_size=64", "model.audio.num_layers=1", "model.audio.num_heads=2",
         "model.audio_perceiver.depth=1", "model.audio_perceiver.num_latents=4", "model.audio_perceiver.heads=2",
         "model.audio_perceiver.dim_head=16", "model.freeze_audio=false", "model.freeze_lm=false",
         "model.freeze_vision=false", "data.max_images=2", "data.max_length=24", "train.max_steps=4",
         "train.lr_decay_steps=4", "train.save_every=0", "model.xattn.gate_init=0.1", "data.canonical_streams=4"]


def _mixed_run(mixed_set, tmp_path_factory, name, nproc, *extra):
    run_dir = tmp_path_factory.mktemp(name) / "run"
    sets = [*TINY, f"data.train_shards={mixed_set}/train-{{000000..000003}}.tar",
            f"data.val_shards={mixed_set}/val-000000.tar", f"data.tokenizer={mixed_set}/tokenizer",
            f"train.run_dir={run_dir}", *MIXED, *extra]
    argv = [sys.executable, str(ROOT / "train.py"), "--nproc", str(nproc)] + [a for s in sets for a in ("--set", s)]
    res = run(argv)
    assert res.returncode == 0, res.stderr[-4000:]
    recs = [m for m in metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in recs] == [1, 2, 3, 4]
    assert all(m.get("skipped_samples", 0) == 0 for m in recs)
    return [m["loss"] for m in recs]


def test_the_mixed_set_mixes(mixed_set):
    """What the layouts are compared on: batches holding images and clips, some rows both."""
    from furnace.data.tokenizer import load_tokenizer

    ld = ShardLoader(f"{mixed_set}/train-{{000000..000003}}.tar", load_tokenizer(mixed_set / "tokenizer", audio=True),
                     batch_size=16, image_size=32, max_length=24, max_images=2, canonical_streams=4,
                     audio=AudioSpec(RATE, RATE))
    b = next(iter(ld))
    images = b["media_valid"] & ~b["audio_valid"]
    assert ld.skipped == {} and images.any() and b["audio_valid"].any()
    assert (images.any(1) & b["audio_valid"].any(1)).any()


@pytest.fixture(scope="module")
def mixed_reference(mixed_set, tmp_path_factory):
    return _mixed_run(mixed_set, tmp_path_factory, "ref", 1)


@pytest.mark.multirank
@pytest.mark.parametrize("layout,extra", [
    ("dp2_zero3", ()),
    ("tp2", ("parallel.tp=2",)),
    ("pp2_zero1", ("parallel.pp=2", "parallel.zero_stage=1")),
])
def test_mixed_image_audio_layouts_match_one_process(layout, extra, mixed_set, mixed_reference, tmp_path_factory):
    got = _mixed_run(mixed_set, tmp_path_factory, layout, 2, *extra)
    for step, (a, b) in enumerate(zip(mixed_reference, got), 1):
        assert abs(a - b) / abs(a) < 1e-5, (layout, step, a, b)


# ---------------------------------------------------------------------------- the tensor-parallel plan

@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipeline"])
def test_the_tp_plan_keeps_the_towers_whole_and_cuts_the_audio_resampler(pipeline, tmp_path):
    """furnace's cuts and DeepSpeed's merge (test_reshard's checks) on a model with an audio
    branch: the Whisper layers (q_proj, fc1 ... as the decoder's) stay whole, its resampler is cut
    as the image one."""
    from furnace.model.flamingo import build_flamingo
    from furnace.parallel.apply import tp_split_dim
    from test_model_flamingo import EOC, IMG, tiny_cfg
    from test_reshard import test_deepspeed_merges_furnace_cuts_into_the_parameter as merged
    from test_reshard import test_tp_shards_put_back_together_are_the_parameter as cut

    cfg = tiny_cfg(**{"audio.kind": "scratch", "audio.num_layers": 1, "audio.hidden_size": 32, "audio.num_heads": 2,
                      "audio.num_mel_bins": 16, "audio_perceiver.num_latents": 4, "audio_perceiver.depth": 1})
    cfg.lm.vocab_size = 57
    torch.manual_seed(0)
    model = build_flamingo(cfg, vocab_size=61, image_token_id=IMG, eoc_token_id=EOC, audio_token_id=60)
    names = dict(model.named_parameters())
    assert tp_split_dim("audio.perceiver.layers.0.0.to_q.weight") == 0 and "audio.perceiver.layers.0.0.to_q.weight" in names
    assert tp_split_dim("audio.perceiver.layers.0.1.fc2.weight") == 1
    whisper = [n for n in names if n.startswith("audio.tower.") and n.split(".")[-2] in ("q_proj", "fc1", "fc2")]
    assert whisper and all(tp_split_dim(n) is None for n in whisper)
    if not pipeline:
        cut(model, 2)
    merged(model, pipeline, tmp_path)


def test_packed_rows_carry_their_clips(audio_set, tmp_path):
    """data.pack: several clips' samples in one row, each clip in its slot, the loss the model's."""
    from furnace.data.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(audio_set["dir"]) / "tokenizer", audio=True)
    ld = ShardLoader(audio_set["train"], tok, batch_size=4, image_size=8, max_length=24, max_images=3, pack=True,
                     canonical_streams=2, audio=AudioSpec(RATE, RATE))
    b = next(iter(ld))
    enc = TextEncoder(tok, 24, 3)
    n_audio = (b["input_ids"] == enc.audio_id).sum(1)
    assert (n_audio >= 2).all() and torch.equal(n_audio, b["audio_valid"].sum(1))
    assert torch.equal(b["audio_valid"], b["media_valid"]) and b["segment_ids"].max() >= 2
    model = _tiny_model(tok)
    model.check_media(b["input_ids"], b["media_valid"], b["audio_valid"])
    assert torch.isfinite(model(b))
