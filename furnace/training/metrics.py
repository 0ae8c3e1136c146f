"""FLOP model, MFU, throughput meter and metric writers (JSONL + TensorBoard).

FLOP model (matmuls only; norms, softmax and elementwise work are ignored), counting what runs:
  forward        = 2 x (multiply-adds) of every linear layer and attention product;
  backward       = 2 x forward for a matmul whose weight trains (activation + weight gradient),
                   1 x forward for a frozen matmul that gradients still flow through
                   (activation gradient only, no weight-gradient GEMM),
                   0 for work upstream of every trainable parameter: a frozen vision tower, and
                   the decoder layers before the first xattn block when neither they, the LM's
                   embedding nor new token rows train (autograd never runs them backward).
  A trained vision tower's patch embedding gets its weight gradient only (pixels need none).
  The head: activation gradient over the whole vocabulary; weight gradient for the rows that
  train (the LM's head unless frozen; new token rows, tied to their trainable embedding or not).
  Attention products (QK^T, PV) have no weights: 2 x forward in backward when on the gradient path.
  Causal self-attention counts half the L x L products; xattn counts each token x its image's latents.
  Model FLOPs: activation-checkpointing recompute is not counted.
  Per step (`step_flops`): the per-row count, the tower and resampler once per image the
  batches held, the audio branch once per clip (`batch_counts`).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from furnace.parallel.tensor import ColumnParallelLinear, RowParallelLinear
from furnace.system import usable_cores

# Dense bf16 peak TFLOP/s by device name fragment (vendor datasheets).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def device_peak_tflops(device: torch.device | None = None) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756.0
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def _linear_params(module: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) weight elements of the linear layers in `module`: nn.Linear and the
    tensor-parallel ones, counted at full size (in x out) even when sharded or ZeRO-3 partitioned."""
    frozen = trainable = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
            n = m.in_features * m.out_features
            if m.weight.requires_grad:
                trainable += n
            else:
                frozen += n
    return frozen, trainable


@dataclass
class StepShape:
    """What one sample looks like on average: text tokens and media."""
    seq_len: int
    images: float          # valid media per sample
    frames: int = 1


def flamingo_flops_per_sample(model, shape: StepShape) -> dict:
    """Forward and training (fwd + bwd) FLOPs of one sample through a FlamingoModel."""
    L, T, F = shape.seq_len, shape.images, shape.frames
    lm, vis = model.lm, model.vision
    a = lm.cfg
    d, dv, n = a.hidden_size, vis.hidden_size, model.num_latents
    vcfg = vis.model.config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    vtok = patches + (1 if vis.kind == "clip" else 0)
    fwd: dict[str, float] = {}
    bwd: dict[str, float] = {}

    def part(name: str, lin: float, att: float, trains: bool, on_path: bool) -> None:
        """Linear work `lin` and attention products `att`; backward per the module docstring."""
        fwd[name] = lin + att
        bwd[name] = ((2 if trains else 1) * lin + 2 * att) if on_path else 0.0

    # vision tower (per frame); its patch embedding is added below (weight gradient only)
    vf, vt = _linear_params(vis.model)
    v_trains = not vis.frozen
    part("vision", T * F * 2 * vtok * (vf + vt), T * F * 4 * vtok * vtok * dv * vcfg.num_hidden_layers,
         v_trains, v_trains)
    v_patch = T * F * 2 * patches * 3 * vcfg.patch_size ** 2 * dv
    fwd["vision"] += v_patch
    bwd["vision"] += v_patch if v_trains else 0.0

    # perceiver resampler (always trains in Flamingo; count as trainable when any weight is)
    s = F * (vtok if vis.features == "hidden" else patches)  # the tokens the tower hands on
    p_lin, p_att, pt = _resampler_flops(model.perceiver, s, n, dv)
    p_path = pt > 0 or v_trains
    part("perceiver", T * p_lin, T * p_att, pt > 0, p_path)

    # decoder layers before the first xattn block (open_flamingo's placement: the k-th layer's,
    # k = every; IDEFICS': the first) see no media: only the LM's embedding, new token rows or
    # their own weights put them on the gradient path
    attn_dim = a.num_heads * a.attention_head_dim()
    blocks = len(model.xattn)
    n_early = next((i for i in range(a.num_layers) if model.xattn_index(i) is not None), a.num_layers)
    new = model.new_tokens

    def layers(name: str, group, on_path: bool) -> bool:
        """Every linear here sees the L tokens: each weight's own gradient counts (LoRA adapters)."""
        f, t = _linear_params(group)
        att = 4 * L * L * attn_dim * len(group) * 0.5  # causal: half of the L x L products
        fwd[name] = 2 * L * (f + t) + att
        bwd[name] = 2 * L * (f + 2 * t) + 2 * att if on_path or t else 0.0
        return t > 0

    e_trains = any(p.requires_grad for p in lm.layers[:n_early].parameters())
    upstream = (lm.embed_tokens.weight.requires_grad or e_trains
                or (new is not None and new.embed.weight.requires_grad))
    layers("decoder_before_xattn", lm.layers[:n_early], upstream)

    # gated xattn blocks
    xf, xt = _linear_params(model.xattn)
    if blocks:
        xin = model.xattn[0].attn.to_q.out_features
        kv = 2 * dv * xin
        per_tok = (xf + xt) / blocks - kv
        x_lin = blocks * (2 * L * per_tok + 2 * T * n * kv)
        x_att = blocks * 4 * L * n * xin
    else:
        x_lin = x_att = 0.0
    x_path = xt > 0 or p_path or upstream
    part("xattn", x_lin, x_att, xt > 0, x_path)

    # decoder layers from the first xattn block on
    on_path = layers("decoder", lm.layers[n_early:], x_path) or x_path

    # head: activation gradient over every row; weight gradient for the rows that train (the
    # new rows' head is a Linear of its own, or their trainable embedding when tied)
    head_row = 2 * L * d
    fwd["head"] = head_row * model.vocab_size
    bwd["head"] = 0.0
    if on_path:
        bwd["head"] = head_row * (model.vocab_size + model.base_vocab * lm.lm_head.weight.requires_grad
                                  + (new.count * new.head.weight.requires_grad if new is not None else 0))
    total_fwd = sum(fwd.values())
    # The tower and the resampler run on the valid images only, the audio branch on the clips
    # (the rest is per row): a step's count follows the media its batches held (`step_flops`).
    per_image = sum(f[p] for f in (fwd, bwd) for p in ("vision", "perceiver")) / T if T else 0.0
    return {"forward": total_fwd, "train": total_fwd + sum(bwd.values()), "forward_by_part": fwd,
            "backward_by_part": bwd, "images": T, "train_per_image": per_image,
            "train_per_clip": _audio_flops_per_clip(model)}


def _resampler_flops(perceiver, s: float, n: int, dv: int) -> tuple[float, float, int]:
    """(linear, attention) forward FLOPs of one medium through a resampler reading `s` tokens
    into `n` latents of width `dv`, and its trainable linear weights."""
    pf, pt = _linear_params(perceiver)
    depth = len(perceiver.layers)
    inner = perceiver.layers[0][0].to_q.out_features if depth else 0
    kv_w = 2 * dv * inner                                   # to_k + to_v: see s media + n latents
    other_w = (pf + pt) / max(depth, 1) - kv_w              # to_q, to_out, ff: see n latents
    return depth * (2 * n * other_w + 2 * (s + n) * kv_w), 4 * n * (s + n) * inner * depth, pt


def _audio_flops_per_clip(model) -> float:
    """Training FLOPs of one clip through the audio branch (0 without one): the log-mel
    filterbank (a matmul; the STFT is not counted), the encoder's two convolutions, its layers
    (non-causal attention over its P positions), the projection and the audio resampler. A
    frozen tower runs forward only; the first convolution's input (the log-mel) needs no gradient."""
    branch = getattr(model, "audio", None)
    if branch is None:
        return 0.0
    tower, enc = branch.tower, branch.tower.model
    cfg = enc.config
    d, p_out = cfg.d_model, cfg.max_source_positions
    frames = tower.frames
    n_freq = tower.mel.n_fft // 2 + 1
    mel = 2 * cfg.num_mel_bins * n_freq * frames
    c1 = 2 * frames * d * cfg.num_mel_bins * enc.conv1.kernel_size[0]
    c2 = 2 * p_out * d * d * enc.conv2.kernel_size[0]
    lf, lt = _linear_params(enc)
    lin = 2 * p_out * (lf + lt)
    att = 4 * p_out * p_out * d * cfg.encoder_layers
    trains = not tower.frozen
    fwd = mel + c1 + c2 + lin + att
    bwd = (c1 + 2 * c2 + 2 * lin + 2 * att) if trains else 0.0
    dim = branch.perceiver.latents.shape[1]
    if branch.proj is not None:  # its weight trains; its input's gradient only for a training tower
        proj = 2 * p_out * branch.proj.in_features * branch.proj.out_features
        fwd += proj
        bwd += proj * (2 if trains else 1)
    r_lin, r_att, r_trains = _resampler_flops(branch.perceiver, p_out, branch.perceiver.latents.shape[0], dim)
    fwd += r_lin + r_att
    bwd += (2 if r_trains else 1) * r_lin + 2 * r_att
    return fwd + bwd


def step_flops(flops: dict, samples: int, images: int, clips: int = 0) -> float:
    """Training FLOPs of `samples` rows whose media held `images` encoded images and `clips`
    encoded audio clips in all (`flops`: the model's per-sample count, `flamingo_flops_per_sample`,
    at its shape's image count): the per-row part for every row, the tower and resampler for
    each image that ran, the audio branch for each clip."""
    per_image = flops["train_per_image"]
    return (samples * (flops["train"] - per_image * flops["images"]) + per_image * images
            + flops["train_per_clip"] * clips)


def batch_counts(batch: dict) -> tuple[int, int, int, int]:
    """(tokens, rows, images, clips) of a batch as the loader hands it on (on the CPU), media as
    the model encodes them: the valid slots without an audio clip go through the vision tower,
    the clips through the audio branch, and a batch with none of either still runs one (zero)
    medium through it, so that every rank runs the same modules."""
    media = batch["media_valid"].bool()
    clips = batch.get("audio_valid")
    clips = media & clips.bool() if clips is not None else None
    images = media & ~clips if clips is not None else media
    n_clips = 0 if clips is None else max(int(clips.sum()), 1)
    return int(batch["attention_mask"].sum()), int(batch["input_ids"].shape[0]), max(int(images.sum()), 1), n_clips


class ThroughputMeter:
    """Tokens, samples and FLOPs per second over the steps since the last `read()`."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.tokens = self.samples = 0
        self.flops = 0.0

    def add(self, tokens: int, samples: int, flops: float) -> None:
        self.tokens += tokens
        self.samples += samples
        self.flops += flops

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"tokens_per_s": self.tokens / dt, "samples_per_s": self.samples / dt, "tflops": self.flops / dt / 1e12}
        self.reset()
        return out


class MetricsWriter:
    """`<run_dir>/metrics.jsonl` and TensorBoard events, continued across resumes: records past
    `resume_step` (written after the checkpoint the run resumes from) are moved to
    `metrics.discarded.jsonl`, and TensorBoard purges its events past that step, so every step
    appears once."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._cut(resume_step)
            try:  # tensorboard is optional
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard missing: JSONL only
                self.tb = None

    def _cut(self, step: int) -> None:
        if not self.path.exists():
            return
        keep, drop = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                past = json.loads(line).get("step", 0) > step
            except (ValueError, AttributeError):  # a line cut short by a crash
                past = True
            (drop if past else keep).append(line)
        if drop:
            with open(self.path.with_name("metrics.discarded.jsonl"), "a") as f:
                f.writelines(drop)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory_gb() -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def run_info(argv: list[str] | None = None) -> dict:
    """What every benchmark JSON records: device, library versions, the command line, the time,
    and the machine's load (numbers taken on a shared machine say so)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    # read from the installed metadata: importing DeepSpeed only to print its version costs seconds
    for key, dist in (("triton", "triton"), ("deepspeed", "deepspeed"), ("transformers", "transformers"),
                      ("webdataset", "webdataset"), ("tokenizers", "tokenizers"), ("numpy", "numpy"),
                      ("pil", "pillow"), ("pycocoevalcap", "pycocoevalcap")):
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # not installed here
            versions[key] = None
    cpu = {"model": _cpu_model(), "logical_cores": os.cpu_count(),
           "usable_cores": usable_cores(),
           "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        device, count = torch.cuda.get_device_name(), torch.cuda.device_count()
    else:
        device, count = f"cpu ({cpu['model']}, {cpu['usable_cores']} cores)", 0
    args = sys.argv if argv is None else [sys.argv[0], *argv]
    return {"device": device, "gpu_count": count, "cpu": cpu, "versions": versions,
            "command": " ".join([sys.executable.rsplit("/", 1)[-1], *args]),
            "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def percentiles(values, qs=(10, 50, 90)) -> dict:
    t = torch.tensor(sorted(values), dtype=torch.float64)
    return {f"p{q}": float(torch.quantile(t, q / 100)) for q in qs}
