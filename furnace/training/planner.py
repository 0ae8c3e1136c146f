"""The layout planner: per-GPU memory and step time of every layout a cluster allows.

    plans = plan(cfg, Cluster(gpus=64, gpu_memory_gb=80, gpus_per_node=8))

Memory per GPU is split as DeepSpeed holds it:

    parameters    training dtype; tp-sharded layers / tp, the stage's share under pp, / dp under ZeRO-3
    gradients     trainable parameters only, training dtype, / dp under ZeRO-2/3
    optimizer     fp32 master + Adam moments (12 bytes a trainable parameter), / dp under ZeRO-1+;
                  0 on the GPU with parallel.offload_optimizer (reported as host bytes)
    activations   what autograd saves per sample, per block kind (counted tensor by tensor on the
                  CPU: `tests/test_planner.py` holds the formulas to a saved-tensor probe), times
                  the micro-batch and the micro-batches a pipeline stage holds in flight; with
                  activation checkpointing a decoder layer keeps only its input
    buffers       the loss's transient log-softmax gradient, ZeRO's buckets and a fixed 1 GB for
                  the CUDA context and allocator

Step time: FLOPs (`metrics.flamingo_flops_per_sample`, the same model as the logged MFU) at an
efficiency measured on an H100 (flamingo-1b: 29% MFU at micro-batch 32, 16% at 16, 10% at 8), checkpointing's extra forward, the pipeline bubble,
and communication at nominal bandwidths (NVLink inside a node, InfiniBand between nodes).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from furnace.config import Config, ConfigError
from furnace.model import llama, vision
from furnace.model.flamingo import build_flamingo
from furnace.model.hf_io import read_config
from furnace.parallel.apply import is_tp_sharded
from furnace.training.build import build_tokenizer
from furnace.training.metrics import StepShape, flamingo_flops_per_sample

GB = 1e9
ADAM_BYTES = 12             # fp32 master + two fp32 moments per trainable parameter
FIXED_BYTES = 1.0 * GB      # CUDA context, cuBLAS workspace, allocator slack
BUCKET_ELEMENTS = 50e6      # reduce / prefetch buckets of ds_configs/*.json
H100_MFU_AT_32 = 0.29       # benchmarks/results/throughput-h100.json mfu_recomputed (flamingo-1b, mb 32)


@dataclass
class Cluster:
    gpus: int
    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = 989.0       # dense bf16 per GPU (H100 SXM)
    intra_node_gbps: float = 400.0   # NVLink, GB/s per GPU
    inter_node_gbps: float = 50.0    # InfiniBand, GB/s per GPU


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    offload_optimizer: bool
    micro_batch: int
    checkpointing: bool


@dataclass
class ModelSizes:
    """Parameter counts of a Flamingo config, split the ways the layouts split them."""
    stage_params: list[tuple[float, float]]   # per decoder layer: (tp-sharded, replicated) elements
    first_params: tuple[float, float]         # vision, resampler, embeddings, xattn before layer 0 ...
    last_params: tuple[float, float]          # final norm and head
    trainable: dict[str, tuple[float, float]] # the same keys, trainable elements
    layer_trainable: list[tuple[float, float]]
    flops_train: float                        # per sample
    vocab: int


def model_sizes(cfg: Config, vocab: int) -> ModelSizes:
    """Counts from the model built on the meta device (no memory, any size); `vocab`: the
    tokenizer's length (the LM's own vocab_size wins when set)."""
    m = cfg.model
    if m.lm.path:  # a pretrained LM or tower: its own config.json gives the shapes (no weights read)
        m = dataclasses.replace(m, lm=dataclasses.replace(llama.config_from_hf(read_config(m.lm.path)), path=None))
    if m.vision.path:
        m = dataclasses.replace(m, vision=dataclasses.replace(vision.config_from_path(m.vision.path), path=None))
    vocab = m.lm.vocab_size or vocab
    # The audio branch (model.audio) is left out of the plan: its tower sits with the vision
    # tower on the first stage; an estimate without it undercounts that stage.
    m = dataclasses.replace(m, audio=dataclasses.replace(m.audio, kind="none", path=None))
    with torch.device("meta"):
        model = build_flamingo(m, vocab_size=vocab, image_token_id=vocab - 2, eoc_token_id=vocab - 1, eos_token_id=0)
    layers = m.lm.num_layers
    per_layer = [[0.0, 0.0] for _ in range(layers)]
    per_layer_t = [[0.0, 0.0] for _ in range(layers)]
    first, last, first_t, last_t = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    for name, p in model.named_parameters():
        col = 0 if is_tp_sharded(name) else 1
        parts = name.split(".")
        if name.startswith("lm.layers."):
            idx = int(parts[2])
        elif name.startswith("xattn."):  # the block in front of a decoder layer travels with it
            idx = min(layers - 1, int(parts[1]) * m.xattn.every + m.xattn.every - 1)
        else:
            idx = None
        if idx is not None:
            per_layer[idx][col] += p.numel()
            if p.requires_grad:
                per_layer_t[idx][col] += p.numel()
        elif name.startswith(("lm.norm", "lm.lm_head")):
            last[col] += p.numel()
            last_t[col] += p.numel() if p.requires_grad else 0
        else:
            first[col] += p.numel()
            first_t[col] += p.numel() if p.requires_grad else 0
    flops = flamingo_flops_per_sample(model, StepShape(seq_len=cfg.data.max_length, images=cfg.data.max_images, frames=cfg.data.video_frames))
    return ModelSizes([tuple(x) for x in per_layer], tuple(first), tuple(last),
                      {"first": tuple(first_t), "last": tuple(last_t)}, [tuple(x) for x in per_layer_t],
                      flops["train"], vocab)


def _elements(pair: tuple[float, float], tp: int) -> float:
    return pair[0] / tp + pair[1]


def activation_bytes_per_sample(cfg: Config, vocab: int, tp: int, layers: int, xattn_blocks: int, *,
                                checkpointing: bool, first_stage: bool, last_stage: bool) -> float:
    """What autograd keeps for one sample on a stage whose `layers` decoder layers lie on the
    gradient path (a frozen LM's layers before the first xattn block keep nothing), counted
    tensor by tensor as furnace's modules save them (tests/test_planner.py holds this to a probe)."""
    m, S, T = cfg.model, cfg.data.max_length, cfg.data.max_images
    b = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    h, inter, heads = m.lm.hidden_size, m.lm.intermediate_size, m.lm.num_heads
    q_dim = heads * (m.lm.head_dim or h // heads)
    # RMSNorms keep fp32 inputs and rstd; attention keeps q, k and v (expanded to all heads),
    # its output and log-sum-exp; SwiGLU keeps gate, up and their product's inputs
    decoder = S * (8 * h + 8) + S * b * (4 * q_dim + 3 * inter) / tp + S * heads / tp * 4
    if not m.freeze_lm:  # the linear layers' inputs, for their weight gradients
        decoder += S * b * (2 * h + (q_dim + inter) / tp)
    media = T * m.perceiver.num_latents
    dv, xi, xff, xh = m.vision.hidden_size, m.xattn.heads * m.xattn.dim_head, m.xattn.ff_mult * h, m.xattn.heads
    xattn = (S * b * (6 * h + (3 * xi + 2 * xff) / tp) + media * b * (dv + 2 * xi / tp) + S * media * b
             + S * xh / tp * 4 + S * 10)
    if checkpointing:  # a block keeps its input (recomputing one: `recompute_bytes_per_sample`)
        out = (layers + xattn_blocks) * S * b * h
    else:
        out = layers * decoder + xattn_blocks * xattn
    if first_stage:
        n, pi, pff = m.perceiver.num_latents, m.perceiver.heads * m.perceiver.dim_head, m.perceiver.ff_mult * dv
        p = (m.vision.image_size // m.vision.patch_size) ** 2 + (1 if m.vision.kind == "clip" else 0)
        per_layer = b * ((p + n) * dv + 3 * n * dv + (3 * n * pi + 2 * (p + n) * pi + 2 * n * pff) / tp) \
            + 4 * m.perceiver.heads / tp * n
        out += T * (m.perceiver.depth * per_layer + p * dv * b)
    if last_stage:
        out += S * (h + 1) * 4 + S * vocab / tp * 4   # final norm (fp32), log-softmax (fp32)
    return out


def recompute_bytes_per_sample(cfg: Config, vocab: int, tp: int) -> float:
    """With activation checkpointing, the backward pass recomputes one block at a time: the
    largest block's saved set is held on top of the kept inputs."""
    one = activation_bytes_per_sample(cfg, vocab, tp, 1, 0, checkpointing=False, first_stage=False,
                                      last_stage=False)
    xattn = activation_bytes_per_sample(cfg, vocab, tp, 0, 1, checkpointing=False, first_stage=False,
                                        last_stage=False)
    return max(one, xattn)


def _stage_elements(sizes: ModelSizes, layers, tp: int, first: bool, last: bool) -> tuple[float, float]:
    """(parameter, trainable) elements a rank holds of a stage made of `layers`, before ZeRO."""
    params = sum(_elements(sizes.stage_params[i], tp) for i in layers)
    train = sum(_elements(sizes.layer_trainable[i], tp) for i in layers)
    if first:
        params += _elements(sizes.first_params, tp)
        train += _elements(sizes.trainable["first"], tp)
    if last:
        params += _elements(sizes.last_params, tp)
        train += _elements(sizes.trainable["last"], tp)
    return params, train


def _stage_layers(layers: int, pp: int) -> list[int]:
    return [layers // pp + (1 if i < layers % pp else 0) for i in range(pp)]


def memory(cfg: Config, sizes: ModelSizes, lay: Layout) -> dict:
    """Per-GPU bytes of the fullest pipeline stage, by kind."""
    b = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    n_layers, every = cfg.model.lm.num_layers, cfg.model.xattn.every
    micro = cfg.train.global_batch_size // (lay.micro_batch * lay.dp)
    worst: dict = {}
    start = 0
    for s, count in enumerate(_stage_layers(n_layers, lay.pp)):
        idx = range(start, start + count)
        start += count
        first, last = s == 0, s == lay.pp - 1
        params, train = _stage_elements(sizes, idx, lay.tp, first, last)
        z = lay.zero_stage
        xblocks = sum(1 for i in idx if i % every == every - 1)
        # a frozen LM's layers before the first xattn block are off the gradient path
        on_path = sum(1 for i in idx if not cfg.model.freeze_lm or i >= every - 1)
        in_flight = min(lay.pp - s, micro) if lay.pp > 1 else 1   # 1F1B: stage s holds pp - s micro-batches
        act = in_flight * lay.micro_batch * activation_bytes_per_sample(
            cfg, sizes.vocab, lay.tp, on_path, xblocks, checkpointing=lay.checkpointing, first_stage=first, last_stage=last)
        if lay.checkpointing:
            act += lay.micro_batch * recompute_bytes_per_sample(cfg, sizes.vocab, lay.tp)
        loss_grad = lay.micro_batch * cfg.data.max_length * sizes.vocab / lay.tp * (4 + b) if last else 0.0
        out = {
            "parameters": params * b / (lay.dp if z == 3 else 1),
            "gradients": train * b / (lay.dp if z >= 2 else 1),
            "optimizer": 0.0 if lay.offload_optimizer else train * ADAM_BYTES / (lay.dp if z >= 1 else 1),
            "activations": act,
            "buffers": FIXED_BYTES + loss_grad + (2 if z == 3 else 1) * BUCKET_ELEMENTS * b,
        }
        out["total"] = sum(out.values())
        out["host_optimizer"] = train * ADAM_BYTES / (lay.dp if z >= 1 else 1) if lay.offload_optimizer else 0.0
        if not worst or out["total"] > worst["total"]:
            worst = out
    return worst


def step_time(cfg: Config, sizes: ModelSizes, lay: Layout, cluster: Cluster) -> float:
    """Seconds per optimizer step (an estimate: see the module docstring)."""
    t = cfg.train
    per_gpu_samples = t.global_batch_size / lay.dp
    # measured: 10.5% / 17% / 30% MFU at micro-batch 8 / 16 / 32 (the host shows through below 32)
    eff = H100_MFU_AT_32 * min(1.0, (lay.micro_batch / 32) ** 0.75)
    flops = sizes.flops_train * (4 / 3 if lay.checkpointing else 1.0)
    compute = per_gpu_samples * flops / (lay.tp * lay.pp) / (cluster.peak_tflops * 1e12 * eff)
    micro = t.global_batch_size // (lay.micro_batch * lay.dp)
    if lay.pp > 1:
        compute *= (micro + lay.pp - 1) / micro
    b = 2 if t.precision in ("bf16", "fp16") else 4
    params, train = (x / lay.pp for x in _stage_elements(sizes, range(len(sizes.stage_params)), lay.tp, True, True))
    dp_bw = cluster.intra_node_gbps if lay.tp * lay.dp <= cluster.gpus_per_node else cluster.inter_node_gbps
    comm = 2 * train * b / (dp_bw * GB) if lay.dp > 1 else 0.0               # gradient reduce-scatter + gather
    if lay.zero_stage == 3 and lay.dp > 1:
        comm += 2 * micro * params * b / (dp_bw * GB)                        # parameters gathered fwd + bwd
    if lay.tp > 1:  # two all-reduces of the activations per layer, forward and backward
        acts = per_gpu_samples * cfg.data.max_length * cfg.model.lm.hidden_size * b
        comm += 4 * cfg.model.lm.num_layers / lay.pp * acts / (cluster.intra_node_gbps * GB)
    if lay.offload_optimizer:
        comm += train * (b + 4) / lay.dp / (25 * GB)                         # PCIe both ways, CPU Adam
    return compute + comm


def layouts(cfg: Config, cluster: Cluster):
    m = cfg.model
    for tp in (1, 2, 4, 8):
        if tp > cluster.gpus_per_node or cluster.gpus % tp or m.lm.num_heads % tp or m.lm.num_kv_heads % tp \
                or m.xattn.heads % tp or m.perceiver.heads % tp:
            continue
        for pp in (1, 2, 4, 8, 16):
            if pp > m.lm.num_layers or cluster.gpus % (tp * pp):
                continue
            dp = cluster.gpus // (tp * pp)
            if cfg.data.canonical_streams % dp:
                continue
            stages = (3,) if pp == 1 and tp > 1 else (1,) if pp > 1 else (0, 1, 2, 3)
            for zero in stages:
                for mb in (1, 2, 4, 8, 16, 32):
                    if cfg.train.global_batch_size % (mb * dp):
                        continue
                    for ckpt in (False, True):
                        for off in ((False, True) if zero >= 1 else (False,)):
                            yield Layout(tp, pp, dp, zero, off, mb, ckpt)


def plan(cfg: Config, cluster: Cluster, vocab: int) -> list[dict]:
    """Every layout that fits, fastest first."""
    sizes = model_sizes(cfg, vocab)
    out = []
    budget = cluster.gpu_memory_gb * GB
    for lay in layouts(cfg, cluster):
        mem = memory(cfg, sizes, lay)
        if mem["total"] > budget:
            continue
        if lay.offload_optimizer and memory(cfg, sizes, dataclasses.replace(lay, offload_optimizer=False))["total"] <= budget:
            continue  # offloading only where it makes the layout fit
        out.append({"layout": dataclasses.asdict(lay), "step_s": step_time(cfg, sizes, lay, cluster),
                     "memory_gb": {k: round(v / GB, 2) for k, v in mem.items()}})
    return sorted(out, key=lambda r: (r["step_s"], r["memory_gb"]["total"]))


def choose_layout(cfg: Config, cluster: Cluster, vocab: int) -> dict:
    """parallel.layout=auto: set the fastest feasible layout's keys in `cfg` (deterministic, so
    every rank computing it agrees); ConfigError in one line when nothing fits."""
    plans = plan(cfg, cluster, vocab)
    if not plans:
        raise ConfigError(f"parallel.layout=auto: no layout of {cluster.gpus} x {cluster.gpu_memory_gb:.0f} GB fits "
                          "this config; start more ranks, or lower data.max_length / train.global_batch_size")
    best = plans[0]
    lay = best["layout"]
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = lay["tp"], lay["pp"], lay["zero_stage"]
    cfg.parallel.offload_optimizer = "cpu" if lay["offload_optimizer"] else "none"
    cfg.train.micro_batch_size = lay["micro_batch"]
    cfg.model.activation_checkpointing = lay["checkpointing"]
    return best


def describe(row: dict) -> str:
    lay, m = row["layout"], row["memory_gb"]
    return (f"tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} zero_stage={lay['zero_stage']} "
            f"offload_optimizer={'cpu' if lay['offload_optimizer'] else 'none'} micro_batch={lay['micro_batch']} "
            f"activation_checkpointing={str(lay['checkpointing']).lower()} (estimated {m['total']:.1f} GB a GPU, "
            f"{row['step_s']:.2f} s a step)")


def auto_layout(cfg: Config, world: int, per_node: int) -> str:
    """parallel.layout=auto for `world` ranks, `per_node` a host: set the fastest layout in `cfg`
    and describe it. Device memory: the GPU's; on a CPU host, its memory shared by the local
    ranks. Every rank computes the same choice from the same inputs."""
    if torch.cuda.is_available():
        memory_gb = torch.cuda.get_device_properties(0).total_memory / GB
    else:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB / per_node
    vocab = cfg.model.lm.vocab_size or len(build_tokenizer(cfg, loaders=False))
    cluster = Cluster(gpus=world, gpu_memory_gb=memory_gb, gpus_per_node=min(per_node, world))
    return describe(choose_layout(cfg, cluster, vocab))
