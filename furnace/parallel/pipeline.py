"""FlamingoModel -> DeepSpeed PipelineModule (layout B: ZeRO-1 x TP x PP x DP).

The stages are thin adapters over the model's own forward path (`furnace.model.flamingo`):
each holds the modules its function needs and passes one tuple of tensors on:

    media    (ids, images, media_valid[, audio, audio_valid][, pos, seg]) -> media_context -> (ids, latents, media_segment, tt, pos[, seg])
    embed    (ids, latents, media_segment, tt, pos[, seg]) -> embed_tokens -> (h, latents, media_segment, tt, pos[, seg])
    block i  (h, ...) -> decoder_block (xattn block i's + decoder layer i) -> same
    norm     (h, ...) -> same
    head     (h, latents, ...) -> output_logits                -> logits   (then loss_fn(logits, labels))

With model.fused_kernels' linear_cross_entropy the head stage passes the hidden states on
instead, and the loss is the model's `head_loss` over the head's weights (no logits).

With the contrastive loss on (`model.contrastive`, train.contrastive_weight > 0; never with packed
rows) the stage-0 inputs end in each row's text mask, and a contrastive stage after embed turns
it into the loss of that micro-batch (embeddings and latents are both there):

    contrastive (h, latents, media_segment, tt, pos, text_mask) -> (h, latents, media_segment, tt, pos, aux)

`aux` travels to the head, which returns (logits, aux); the loss adds weight x aux.

`pos` (position_ids) and `seg` (segment_ids) flow with the hidden states, so packed rows run
under PP as they do without it; `seg` is there only when the batch has one (its presence is
fixed for a run: DeepSpeed sizes the stage buffers from the first micro-batch). Stage 0 holds
the vision tower, the resampler (and the audio branch: its inputs, audio and audio_valid,
travel with a model that has one, a batch without clips getting an empty selection) and the
embeddings; the decoder and xattn layers are
partitioned by trainable parameters; the last stage holds norm, head and loss. With tied
embeddings, embed and head are one TiedLayerSpec ("embed"): DeepSpeed keeps a copy on the first
and the last stage and all-reduces its gradient between them. Activation checkpointing is the
model's own (`model.activation_checkpointing`, applied per block by `run_block`).

The specs wrap modules of an already built (and, with tp > 1, already sharded) FlamingoModel in
which only this rank's stage is real (`stage_parameters`): fresh weights are drawn piece by piece
with the run's seed and kept only for the stage (`furnace.parallel.fresh`: the 1-rank numbers,
which the parity tests rely on), a pretrained decoder is read only for it
(`furnace.parallel.materialize`); the other stages' parameters stay meta shapes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from furnace.model.flamingo import check_media, decoder_block, embed_tokens, media_context, output_logits
from furnace.model.layers import run_block
from furnace.model.llama import rope_cos_sin
from furnace.tokens import positions


class MediaStage(nn.Module):
    """Vision tower + Perceiver Resampler (+ the audio branch): images (and clips) -> latents [B, T*n, dv]."""

    def __init__(self, model):
        super().__init__()
        self.vision, self.perceiver, self.audio = model.vision, model.perceiver, model.audio
        self.image_token_id, self.media_reset_id = model.image_token_id, model.media_reset_id
        self.audio_token_id, self.media_ids = model.audio_token_id, model.media_ids
        self.with_aux = carries_aux(model)

    def forward(self, inputs):
        input_ids, images, media_valid, *pos_seg = inputs
        media_valid = media_valid.bool()
        audio = audio_valid = None
        if self.audio is not None:
            audio, audio_valid, *pos_seg = pos_seg
            audio_valid = audio_valid.bool()
        check_media(input_ids, media_valid, self.image_token_id, audio_valid, self.audio_token_id)
        segment_ids = pos_seg[1] if len(pos_seg) > 1 and not self.with_aux else None  # else: the text mask
        latents, seg, tt = media_context(self.vision, self.perceiver, input_ids, images, media_valid,
                                         self.media_ids, segment_ids, self.media_reset_id, self.audio, audio,
                                         audio_valid)
        if not pos_seg:
            pos_seg = [positions(input_ids).contiguous()]  # sends need contiguous tensors
        return (input_ids, latents, seg, tt, *pos_seg)


class EmbedHead(nn.Module):
    """The token embedding and the output head (LM rows + new-token rows). As a tied layer the
    same module serves as the first layer (forward) and, through `head_fn`, as the last."""

    def __init__(self, model, with_embed: bool = True, with_head: bool = True):
        super().__init__()
        lm, new = model.lm, model.new_tokens
        self.base_vocab = model.base_vocab
        self.embed_tokens = lm.embed_tokens if with_embed else None
        self.new_embed = new.embed if with_embed and new is not None else None
        self.lm_head = lm.lm_head if with_head else None
        self.new_head = new.head if with_head and new is not None else None
        self.with_aux = carries_aux(model)
        self.fused_loss = model.head_loss is not None

    def forward(self, inputs):
        input_ids, *rest = inputs
        return (embed_tokens(input_ids, self.embed_tokens, self.new_embed, self.base_vocab), *rest)

    def head(self, inputs):
        h, latents = inputs[0], inputs[1]
        # A zero-valued use of the travelling latents: the pipeline engine sends a gradient back
        # for every floating-point input of a stage, so each must be part of the graph.
        h = h + latents.sum() * 0
        out = h if self.fused_loss else output_logits(h, self.lm_head, self.new_head)
        return (out, inputs[-1]) if self.with_aux else out


def head_fn(module: EmbedHead, inputs):
    return module.head(inputs)


class HeadStage(EmbedHead):
    """The output head alone (untied embeddings)."""

    def __init__(self, model):
        super().__init__(model, with_embed=False, with_head=True)

    def forward(self, inputs):
        return self.head(inputs)


class ContrastiveStage(nn.Module):
    """The contrastive loss of the micro-batch, from the embeddings and the latents."""

    def __init__(self, model):
        super().__init__()
        self.heads = model.contrastive
        self.gather = model.gather_batch

    def forward(self, inputs):
        h, latents, seg, tt, pos, text_mask = inputs
        aux = self.heads(h, latents, seg, text_mask, self.gather)
        return h, latents, seg, tt, pos, aux.reshape(1)  # 1-element: what the pipeline's sends carry


def carries_aux(model) -> bool:
    """Whether the pipeline carries the contrastive loss (and, before it, the text mask)."""
    return model.contrastive is not None and bool(model.contrastive_weight)


class BlockStage(nn.Module):
    """Decoder layer i, preceded by its gated xattn block when it has one."""

    def __init__(self, model, i: int):
        super().__init__()
        self.xattn = model.xattn_for(i)
        self.layer = model.lm.layers[i]
        self._model = [model]  # a list: its parameters belong to the stages, not to this one twice
        self.register_buffer("inv_freq", model.lm.inv_freq.clone(), persistent=False)
        self.with_aux = carries_aux(model)

    @property
    def activation_checkpointing(self) -> bool:  # the model's own setting, read where it is decided
        return self._model[0].activation_checkpointing

    def forward(self, inputs):
        h, latents, seg, tt, position_ids, *segments = inputs
        segment_ids = segments[0] if segments and not self.with_aux else None  # else: the contrastive loss
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, h.dtype)
        h = run_block(self, decoder_block, self.layer, self.xattn, h, cos, sin, latents, seg, tt, segment_ids,
                      None, None)
        return (h, *inputs[1:])


class NormStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm = model.lm.norm

    def forward(self, inputs):
        return (self.norm(inputs[0]), *inputs[1:])


def _layer_specs(model) -> list:
    """The pipeline's layers, in order: the same list on every stage (DeepSpeed builds its share)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    tied_attrs = []
    if model.lm.cfg.tie_word_embeddings:
        tied_attrs = [a for a, p in (("embed_tokens.weight", model.lm.embed_tokens.weight),
                                     ("new_embed.weight",
                                      None if model.new_tokens is None else model.new_tokens.embed.weight))
                      if p is not None and p.requires_grad]
    specs = [LayerSpec(MediaStage, model)]
    if tied_attrs:
        specs.append(TiedLayerSpec("embed", EmbedHead, model, tied_weight_attr=tied_attrs))
    else:
        specs.append(LayerSpec(EmbedHead, model, True, False))
    if carries_aux(model):
        specs.append(LayerSpec(ContrastiveStage, model))
    specs += [LayerSpec(BlockStage, model, i) for i in range(len(model.lm.layers))]
    specs.append(LayerSpec(NormStage, model))
    if tied_attrs:
        specs.append(TiedLayerSpec("embed", EmbedHead, model, forward_fn=head_fn, tied_weight_attr=tied_attrs))
    else:
        specs.append(LayerSpec(HeadStage, model))
    return specs


def pipeline_param_names(model) -> dict[str, str]:
    """{DeepSpeed's name for a parameter in a PipelineModule over `model`: the model's own name},
    for every stage: layer i's parameters are "i.<name in its stage module>", a tied layer's
    "tied_modules.<key>.<name>" (the names checkpoints of any pipeline size use)."""
    from deepspeed.pipe import TiedLayerSpec

    own = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, str] = {}
    for i, spec in enumerate(_layer_specs(model)):
        prefix = f"tied_modules.{spec.key}." if isinstance(spec, TiedLayerSpec) else f"{i}."
        for n, p in spec.build().named_parameters():
            out.setdefault(prefix + n, own[id(p)])
    return out


def pipeline_layer_files(model) -> dict[str, tuple[int, str]]:
    """{model parameter name: (pipeline layer index, its name in that layer's state_dict)}: where
    a pipeline checkpoint's `layer_XX-model_TT-model_states.pt` files hold each parameter (a tied
    layer is saved where it first appears)."""
    own = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[int, str]] = {}
    for i, spec in enumerate(_layer_specs(model)):
        for n, p in spec.build().named_parameters():
            out.setdefault(own[id(p)], (i, n))
    return out


def stage_parameters(model, topology) -> set[int]:
    """ids of the parameters this rank's pipeline stage will hold, found before the pipeline is
    built (a meta decoder is filled in for its own stage only): DeepSpeed's own balancing of the
    layers' trainable parameter counts ("parameters" partitioning)."""
    from deepspeed.runtime import utils as ds_utils

    built = [spec.build() for spec in _layer_specs(model)]
    counts = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in built]
    parts = ds_utils.partition_balanced(weights=counts, num_parts=topology.pp)
    stage = topology.coord.pp
    return {id(p) for m in built[parts[stage]:parts[stage + 1]] for p in m.parameters()}


def flamingo_pipeline(model, topology, *, partition_method: str = "parameters"):
    """A deepspeed.pipe.PipelineModule over `model` for the (pp, dp, tp) grid of `topology`."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    specs = _layer_specs(model)
    topo = PipeModelDataParallelTopology(num_pp=topology.pp, num_mp=topology.tp, num_dp=topology.dp)
    c = topology.coord
    if topo.get_rank(pipe=c.pp, data=c.dp, model=c.tp) != topology.rank:  # same grid, same order
        raise RuntimeError(f"DeepSpeed's pipeline grid disagrees with {topology}")
    def lm_loss(out, labels):  # the model's loss_fn at call time (tensor parallelism swaps it)
        if model.head_loss is None:
            return model.loss_fn(out, labels)
        new_head = None if model.new_tokens is None else model.new_tokens.head
        return model.head_loss(out, labels, model.lm.lm_head, new_head)  # out: the hidden states

    def loss_fn(outputs, labels):
        if isinstance(outputs, tuple):
            out, aux = outputs
            return lm_loss(out, labels) + model.contrastive_weight * aux.sum()
        return lm_loss(outputs, labels)

    return PipelineModule(layers=specs, topology=topo, loss_fn=loss_fn, partition_method=partition_method,
                          activation_checkpoint_interval=0)


def batch_to_pipe(batch: dict, model=None):
    """The batch dict as the PipelineEngine wants it: ((stage-0 inputs), labels), with the
    batch's position_ids and segment_ids (packed rows) when it has them, and with `model`'s
    contrastive loss on, the positions and the text mask; with its audio branch, audio and
    audio_valid after media_valid."""
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("pipeline batches need labels")
    inputs = (batch["input_ids"], batch["images"], batch["media_valid"])
    if model is not None and model.audio is not None:
        audio = batch.get("audio")
        if audio is None:  # no clip in this batch: one zero sample per slot, none valid
            audio = batch["images"].new_zeros(batch["media_valid"].shape + (1,))
        inputs += (audio, batch.get("audio_valid", torch.zeros_like(batch["media_valid"])))
    if model is not None and carries_aux(model):
        pos = batch.get("position_ids")
        pos = positions(batch["input_ids"]).contiguous() if pos is None else pos
        return inputs + (pos, model.text_mask(batch["input_ids"], batch.get("attention_mask"))), labels
    pos, segments = batch.get("position_ids"), batch.get("segment_ids")
    if pos is not None or segments is not None:
        if pos is None:
            pos = positions(batch["input_ids"]).contiguous()
        inputs += (pos,) if segments is None else (pos, segments)
    return inputs, labels
