"""The audio side: a Whisper-shaped audio tower (HF's WhisperEncoder, drawn from `model.audio` or
read from a local Whisper folder) and its own Perceiver Resampler, giving each clip the same
number of latents, of the same width, as an image (`AudioBranch`); the xattn blocks read both.

The tower takes waveforms: its log-mel front end is Whisper's feature extractor written in torch
(`LogMel`: Hann-window STFT, power, Slaney mel filters, log10, floored 8 below the clip's maximum,
(x + 4) / 4), so the loader hands on samples and never depends on the tower. A clip is padded
with zeros (or cut) to the tower's window first, as Whisper's extractor pads to 30 s.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import WhisperConfig, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from furnace.config import AudioConfig, PerceiverConfig

from .perceiver import PerceiverResampler


def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """[n_fft // 2 + 1, n_mels] Slaney-scale, Slaney-normalised triangular filters (Whisper's)."""
    from transformers.audio_utils import mel_filter_bank

    return torch.from_numpy(mel_filter_bank(num_frequency_bins=1 + n_fft // 2, num_mel_filters=n_mels,
                                            min_frequency=0.0, max_frequency=sample_rate / 2.0,
                                            sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")).float()


class LogMel(nn.Module):
    """waveforms [N, S] -> Whisper's log-mel features [N, n_mels, S // hop] (float32)."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        # Fixed functions of the config, in fp32 whatever the model's precision: kept out of the
        # module's buffers, which a bf16 / fp16 cast of the model would round (Whisper's extractor
        # runs in fp32 too); a copy per device they are used on.
        self._consts = {"cpu": (mel_filters(sample_rate, n_fft, n_mels).T.contiguous(), torch.hann_window(n_fft))}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._consts:
            self._consts[key] = tuple(t.to(device) for t in self._consts["cpu"])
        return self._consts[key]

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        filters, window = self._on(wave.device)
        spec = torch.stft(wave.float(), self.n_fft, self.hop_length, window=window, return_complex=True)
        power = (spec[..., :-1].abs() ** 2).contiguous()        # Whisper drops the last frame
        mel = filters @ power
        log = mel.clamp(min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log + 4.0) / 4.0


class AudioTower(nn.Module):
    """waveforms [N, S] at `sample_rate` -> features [N, P, d]: the encoder's last hidden states
    (P = max_source_positions, one every 2 hops). Frozen by default, as the vision tower."""

    def __init__(self, encoder: WhisperEncoder, sample_rate: int, n_fft: int, hop_length: int, frozen: bool = True):
        super().__init__()
        self.model = encoder
        cfg = encoder.config
        self.sample_rate = sample_rate
        self.frames = cfg.max_source_positions * encoder.conv1.stride[0] * encoder.conv2.stride[0]
        self.num_samples = self.frames * hop_length  # the window: what the loader keeps of a clip
        self.hidden_size = cfg.d_model
        self.mel = LogMel(sample_rate, n_fft, hop_length, cfg.num_mel_bins)
        self.frozen = frozen
        self.model.requires_grad_(not frozen)
        encoder.embed_positions.requires_grad_(False)  # Whisper's fixed sinusoids, trained or not
        if frozen:
            self.model.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def _features(self, wave: torch.Tensor) -> torch.Tensor:
        s = wave.shape[-1]
        wave = F.pad(wave, (0, self.num_samples - s)) if s < self.num_samples else wave[..., : self.num_samples]
        feats = self.mel(wave).to(next(self.model.parameters()).dtype)
        return self.model(input_features=feats).last_hidden_state

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self._features(wave)
        return self._features(wave)


class AudioBranch(nn.Module):
    """audio [B, T, S], audio_valid [B, T] -> latents [B, T, n, dv] (zeros where a slot holds no
    clip): the tower, a projection to the image latents' width `dim` (when it differs), the
    audio resampler. Only the valid clips are encoded; with none, one zero clip runs and
    contributes 0, so every rank runs the same modules each step (ZeRO-3's gathers are collective)."""

    def __init__(self, tower: AudioTower, dim: int, cfg: PerceiverConfig):
        super().__init__()
        self.tower = tower
        self.proj = nn.Linear(tower.hidden_size, dim) if tower.hidden_size != dim else None
        self.perceiver = PerceiverResampler(dim, cfg)

    def forward(self, audio: torch.Tensor, audio_valid: torch.Tensor) -> torch.Tensor:
        b, t = audio_valid.shape
        idx = audio_valid.flatten().nonzero().squeeze(1)
        empty = idx.numel() == 0
        if empty:
            idx = idx.new_zeros(1)
        sel = audio.flatten(0, 1).index_select(0, idx)           # [N, S]
        feats = self.tower(sel)                                  # [N, P, da]
        if self.proj is not None:
            feats = self.proj(feats)
        lat = self.perceiver(feats[:, None])                     # one "frame" of P time steps
        if empty:
            lat = lat * 0
        out = lat.new_zeros(b * t, *lat.shape[1:]).index_copy(0, idx, lat)
        return out.view(b, t, *lat.shape[1:])


def _scratch_encoder(cfg: AudioConfig) -> WhisperEncoder:
    """A WhisperEncoder shaped by `cfg`, its window `cfg.seconds` (rounded up to 2 hops)."""
    positions = max(1, math.ceil(cfg.seconds * cfg.sample_rate / (2 * cfg.hop_length)))
    hf = WhisperConfig(num_mel_bins=cfg.num_mel_bins, d_model=cfg.hidden_size, encoder_layers=cfg.num_layers,
                       encoder_attention_heads=cfg.num_heads, encoder_ffn_dim=cfg.intermediate_size,
                       max_source_positions=positions, decoder_layers=1, decoder_attention_heads=cfg.num_heads,
                       decoder_ffn_dim=cfg.intermediate_size, dropout=0.0, attention_dropout=0.0,
                       activation_dropout=0.0, encoder_layerdrop=0.0)
    return WhisperEncoder(hf)


def front_end(path: str) -> dict:
    """A Whisper folder's feature extractor settings (preprocessor_config.json; Whisper's defaults
    without one): sample_rate, n_fft, hop_length."""
    out = {"sample_rate": 16000, "n_fft": 400, "hop_length": 160}
    f = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(f):
        with open(f) as fh:
            pre = json.load(fh)
        out = {"sample_rate": int(pre.get("sampling_rate", 16000)), "n_fft": int(pre.get("n_fft", 400)),
               "hop_length": int(pre.get("hop_length", 160))}
    return out


def audio_from_config(cfg: AudioConfig, frozen: bool = False) -> AudioTower:
    """A tower trained from scratch, shaped by `cfg`."""
    return AudioTower(_scratch_encoder(cfg), cfg.sample_rate, cfg.n_fft, cfg.hop_length, frozen)


def audio_from_hf(path: str, frozen: bool = True, dtype: torch.dtype = torch.float32) -> AudioTower:
    """The encoder of a local HF Whisper folder (WhisperModel or WhisperForConditionalGeneration),
    with its feature extractor's settings."""
    encoder = WhisperModel.from_pretrained(path, dtype=dtype, local_files_only=True).get_encoder()
    fe = front_end(path)
    return AudioTower(encoder, fe["sample_rate"], fe["n_fft"], fe["hop_length"], frozen)


def config_of(tower: AudioTower, path: str | None = None) -> AudioConfig:
    """The AudioConfig describing a built tower (for a loaded one: its checkpoint's shape)."""
    hf = tower.model.config
    return AudioConfig(kind="whisper" if path else "scratch", path=path, sample_rate=tower.sample_rate,
                       seconds=tower.num_samples / tower.sample_rate, num_mel_bins=hf.num_mel_bins,
                       n_fft=tower.mel.n_fft, hop_length=tower.mel.hop_length, hidden_size=hf.d_model,
                       intermediate_size=hf.encoder_ffn_dim, num_layers=hf.encoder_layers,
                       num_heads=hf.encoder_attention_heads)
