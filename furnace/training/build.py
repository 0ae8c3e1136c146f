"""The one builder: a config and a rank grid -> everything a run needs. train.py, the benchmarks
and the tests all build through it, so a new capability is wired once.

    init_distributed()
    topology = Topology(cfg.parallel.tp, cfg.parallel.pp)
    run = build(cfg, topology)          # tokenizer -> seeded model -> TP -> PP -> engine -> loader
    loss = run.engine(batch)

Each step is also usable alone: `build_tokenizer`, `build_model` (one process, whole), `build_weights`
(this rank's share), `build_loader`.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

import furnace_kernels
from furnace.config import FUSED_OPS, Config, gradient_accumulation_steps, split_sources
from furnace.data.demo import ensure_demo_data
from furnace.data.lengths import longest_sample
from furnace.data.loader import ShardLoader
from furnace.data.synthetic import demo_tokenizer
from furnace.data.tokenizer import audio_token_id, load_tokenizer, tokenizer_dir
from furnace.model import llama
from furnace.model.flamingo import FlamingoModel, build_flamingo, lm_config
from furnace.model.empty import empty
from furnace.model.compile import compile_media, compile_parts
from furnace.model.llama import skeleton_from_hf
from furnace.model.start_from import start_config, start_tensors
from furnace.model.audio import config_of as audio_config_of
from furnace.model.vision import config_of, vision_skeleton, vision_skeleton_from_hf
from furnace.parallel.apply import parallelize
from furnace.parallel.fresh import keep_drawn
from furnace.parallel.materialize import load_pretrained_lm, load_pretrained_tower, load_start
from furnace.parallel.batch_gather import BatchGather
from furnace.parallel.pipeline import flamingo_pipeline, stage_parameters
from furnace.parallel.topology import Topology
from furnace.parallel.zero3 import gather_head_weights, partitioner, place, zero3_placement
from furnace.tokens import EOC_TOKEN, IMAGE_TOKEN
from furnace.training import engine as eng
from furnace.training.metrics import StepShape, flamingo_flops_per_sample


@dataclass
class Components:
    cfg: Config
    topology: Topology
    dp: int
    grad_accum: int
    tokenizer: Any
    model: FlamingoModel     # with this rank's tensor-parallel shards; under PP its modules live in `pipe`
    pipe: Any                # the deepspeed PipelineModule (layout B), else None
    engine: Any
    flops: dict              # FLOPs of one sample at (max_length, max_images) of the whole model
    train_loader: Any        # None when built with loaders=False

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def val_loader(self, batch_size: int) -> ShardLoader | None:
        """This dp rank's share of the validation set, one pass, decoded in this process; None
        without data.val_shards."""
        if not split_sources(self.cfg.data.val_shards):
            return None
        return build_loader(self.cfg, self.tokenizer, self.model, self.topology, split="val",
                            batch_size=batch_size, num_workers=0)


def build_tokenizer(cfg: Config, *, loaders: bool = True):
    """The run's tokenizer (`tokenizer_dir`), with <audio> when the model has an audio tower.
    Without data (benchmarks on random tensors) and no tokenizer of its own, the demo's
    word-level one (the synthetic set's, not drawn)."""
    audio = cfg.model.audio.kind != "none"
    if not loaders and not (cfg.data.tokenizer or cfg.model.lm.path):
        return demo_tokenizer(audio=audio)
    return load_tokenizer(tokenizer_dir(cfg), audio=audio)


def build_model(cfg: Config, tokenizer, *, lm=None, vision=None, drawn=llama.whole) -> FlamingoModel:
    """The whole (unsharded) model, its fresh weights drawn from torch's global RNG. `lm`,
    `vision`: a decoder, a tower to use instead of the configured ones; `drawn`: `build_flamingo`'s
    hook on each fresh piece. A loaded LM or tower writes its checkpoint's shape back into
    `cfg.model`, so logs, checkpoints and exports describe the model built."""
    model = build_flamingo(cfg.model, vocab_size=len(tokenizer),
                           image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                           eoc_token_id=tokenizer.convert_tokens_to_ids(EOC_TOKEN),
                           eos_token_id=tokenizer.eos_token_id, lm=lm, vision=vision, drawn=drawn,
                           audio_token_id=audio_token_id(tokenizer))
    model.contrastive_weight = cfg.train.contrastive_weight
    if cfg.model.lm.path:
        cfg.model.lm = dataclasses.replace(model.lm.cfg, path=cfg.model.lm.path)
    if cfg.model.vision.path:
        cfg.model.vision = config_of(model.vision, cfg.model.vision.path)
    if cfg.model.audio.path:
        cfg.model.audio = audio_config_of(model.audio.tower, cfg.model.audio.path)
    return model


def build_shape(cfg: Config, tokenizer) -> FlamingoModel:
    """The model's shape: parameters on the meta device (buffers real), nothing drawn or read."""
    m = cfg.model
    lm = skeleton_from_hf(m.lm.path) if m.lm.path else llama.skeleton(lm_config(m, len(tokenizer)))
    vision = (vision_skeleton_from_hf(m.vision.path, m.freeze_vision) if m.vision.path
              else vision_skeleton(m.vision, m.freeze_vision))
    with empty():
        model = build_model(cfg, tokenizer, lm=lm, vision=vision)
    model.tie_weights()  # (under `empty` every assignment of a parameter makes a new one)
    return model


def build_weights(cfg: Config, tokenizer, topology: Topology, *, zero3: dict | None = None) -> FlamingoModel:
    """This rank's model (collective): its tensor-parallel cuts, under pipeline parallelism its
    stage's parameters only (the rest meta), under ZeRO-3 (`zero3`: the DeepSpeed config)
    partitioned over the data-parallel group; the weights those of `build_model` from
    `cfg.train.seed`. No rank builds the whole model: fresh weights are drawn piece by piece and
    cut at once (`furnace.parallel.fresh`), a pretrained LM and tower read per rank
    (`furnace.parallel.materialize`)."""
    lm_path, tower_path = cfg.model.lm.path, cfg.model.vision.path
    partition = partitioner(zero3, topology) if zero3 is not None else None
    model = build_shape(cfg, tokenizer)
    dtype, device = zero3_placement(zero3) if zero3 is not None else (torch.float32, None)
    if topology.tp > 1:
        parallelize(model, topology)  # the meta shapes take this rank's tensor-parallel cuts
    stage = stage_parameters(model, topology) if topology.pp > 1 else None
    keep = None if stage is None else (lambda p: id(p) in stage)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    build_model(cfg, tokenizer, lm=skeleton_from_hf(lm_path) if lm_path else None,  # a meta twin: dropped
                vision=vision_skeleton_from_hf(tower_path, cfg.model.freeze_vision) if tower_path else None,
                drawn=keep_drawn(model, topology, keep=keep, partition=partition, dtype=dtype, device=device))
    if zero3 is not None:
        place(model, dtype, device)  # the buffers
    if lm_path:
        load_pretrained_lm(model, lm_path, topology, keep=keep, partition=partition, dtype=dtype, device=device)
    if tower_path:
        load_pretrained_tower(model, tower_path, keep=keep, partition=partition, dtype=dtype, device=device)
    return model


def build_loader(cfg: Config, tokenizer, model: FlamingoModel, topology: Topology, *, split: str,
                 batch_size: int, num_workers: int | None = None) -> ShardLoader:
    """This rank's loader of `split`, normalising images as the model's tower expects (and reading
    audio clips at the audio tower's rate, up to its window); tp and pp peers share their dp rank's stream."""
    mean, std = model.vision.image_stats
    tower = None if model.audio is None else model.audio.tower
    return ShardLoader.from_config(cfg.data, tokenizer, split=split, batch_size=batch_size,
                                   dp_rank=topology.coord.dp, dp_size=topology.dp, seed=cfg.train.seed,
                                   image_size=model.vision.image_size, mean=mean, std=std, num_workers=num_workers,
                                   audio_rate=0 if tower is None else tower.sample_rate,
                                   audio_samples=0 if tower is None else tower.num_samples,
                                   pin_memory=torch.cuda.is_available())


def build(cfg: Config, topology: Topology, *, loaders: bool = True, progress: bool = False,
          tokenizer=None) -> Components:
    """Everything a run needs on this rank (collective: every rank calls it). `loaders=False`
    skips the data (benchmarks on random tensors); `tokenizer` replaces the configured one."""
    for op in ("attention", "media_attention", *FUSED_OPS):  # one choice for every kernel the model runs
        furnace_kernels.set_backend(op, cfg.model.attention_backend)
    dp = topology.dp
    grad_accum = gradient_accumulation_steps(cfg, dp)
    if loaders:
        ensure_demo_data(cfg.data, progress=progress)  # the synthetic set, when its shards are missing
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, loaders=loaders)
    lm_path, tower_path = cfg.model.lm.path, cfg.model.vision.path
    if cfg.model.start_from:  # the pretrained Flamingo decides its parts' shapes, as lm.path the LM's
        layers = skeleton_from_hf(lm_path).cfg.num_layers if lm_path else cfg.model.lm.num_layers
        cfg.model = start_config(cfg.model, layers)
    shape = build_shape(cfg, tokenizer)  # (writes a pretrained LM's and tower's shapes into cfg.model)
    if cfg.data.max_length == 0:  # from the data, within the LM's positions
        cfg.data.max_length = longest_sample(cfg.data, tokenizer, cap=shape.lm.cfg.max_position_embeddings)
    d = cfg.data
    flops = flamingo_flops_per_sample(shape, StepShape(seq_len=d.max_length, images=d.max_images,
                                                      frames=d.video_frames))
    del shape
    zero3 = eng.build_ds_config(cfg, dp, grad_accum) if cfg.parallel.zero_stage == 3 and topology.pp == 1 else None
    model = build_weights(cfg, tokenizer, topology, zero3=zero3)
    if cfg.model.start_from:
        with empty():  # the plain model's names and shapes, to map the source onto
            plain = build_model(copy.deepcopy(cfg), tokenizer, lm=skeleton_from_hf(lm_path) if lm_path else None,
                                vision=vision_skeleton_from_hf(tower_path, cfg.model.freeze_vision) if tower_path else None)
        tensors, drawn = start_tensors(cfg.model, plain)
        load_start(model, tensors, topology)
        if drawn and topology.rank == 0:
            print(f"model.start_from={cfg.model.start_from} holds no {', '.join(drawn)}: they start as drawn",
                  flush=True)
    if model.contrastive is not None and dp > 1:  # the contrastive loss's negatives: every dp rank's rows
        model.gather_batch = BatchGather(topology.get_data_parallel_group())
    compile_media(model, compile_parts(cfg.model.compile))  # after TP: the split blocks are what runs
    if zero3 is not None:
        gather_head_weights(model)
    pipe = flamingo_pipeline(model, topology) if topology.pp > 1 else None
    engine, _ = eng.initialize(cfg, pipe if pipe is not None else model, topology, dp, grad_accum)
    train_loader = None
    if loaders:
        train_loader = build_loader(cfg, tokenizer, model, topology, split="train",
                                    batch_size=cfg.train.micro_batch_size)
    return Components(cfg=cfg, topology=topology, dp=dp, grad_accum=grad_accum, tokenizer=tokenizer, model=model,
                      pipe=pipe, engine=engine, flops=flops, train_loader=train_loader)
