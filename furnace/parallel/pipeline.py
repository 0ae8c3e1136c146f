"""FlamingoModel -> DeepSpeed PipelineModule (layout B: ZeRO-1 x TP x PP x DP).

The pipeline is a list of LayerSpecs; every layer takes and returns a tuple of tensors:

    media    (input_ids, images, media_valid)         -> (input_ids, latents, media_segment, text_time)
    embed    (input_ids, latents, media_segment, tt)  -> (h, latents, media_segment, tt)
    block i  (h, latents, media_segment, tt)          -> same: [xattn block] + decoder layer i
    norm     (h, ...)                                 -> same
    head     (h, latents, ...)                        -> logits   (then loss_fn(logits, labels))

so stage 0 holds the vision tower, the resampler and the embeddings, the decoder and xattn
layers are partitioned by trainable parameters, and the last stage holds norm, head and loss.
Latents and text_time travel with the hidden states (no module keeps per-batch state). With
tied embeddings, embed and head are one TiedLayerSpec ("embed"): DeepSpeed keeps a copy on the
first and the last stage and all-reduces its gradient between them.

The specs wrap modules of an already built (and, with tp > 1, already sharded) FlamingoModel:
building the full model with the run's seed on every rank reproduces the 1-rank weights
exactly, which the parity tests rely on. A model too big for one host would instead build each
stage's modules from its own LayerSpecs; the layer classes here take modules, so that change
is confined to `flamingo_pipeline`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from furnace.model.flamingo import media_segments
from furnace.model.llama import rope_cos_sin
from furnace.model.tokens import text_time


class MediaLayer(nn.Module):
    """Vision tower + Perceiver Resampler: images -> latents [B, T*n, dv]."""

    def __init__(self, model):
        super().__init__()
        self.vision, self.perceiver = model.vision, model.perceiver
        self.image_token_id, self.num_latents = model.image_token_id, model.num_latents
        self._model = [model]  # for check_media / encode_media; a list so no parameter registers twice

    def forward(self, inputs):
        input_ids, images, media_valid = inputs
        m = self._model[0]
        media_valid = media_valid.bool()
        m.check_media(input_ids, media_valid)
        latents = m.encode_media(images, media_valid).flatten(1, 2)
        seg = media_segments(media_valid, self.num_latents)
        return input_ids, latents, seg, text_time(input_ids, self.image_token_id)


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

    def forward(self, inputs):
        input_ids, latents, seg, tt = inputs
        if self.new_embed is None:
            h = self.embed_tokens(input_ids)
        else:
            is_new = input_ids >= self.base_vocab
            base = self.embed_tokens(input_ids.masked_fill(is_new, 0))
            new = self.new_embed((input_ids - self.base_vocab).clamp(min=0))
            h = torch.where(is_new[..., None], new.to(base.dtype), base)
        return h, latents, seg, tt

    def head(self, inputs):
        h, latents = inputs[0], inputs[1]
        # A zero-valued use of the travelling latents: the pipeline engine sends a gradient back
        # for every floating-point input of a stage, so each must be part of the graph.
        h = h + latents.sum() * 0
        logits = self.lm_head(h)
        if self.new_head is not None:
            logits = torch.cat([logits, self.new_head(h)], dim=-1)
        return logits


def head_fn(module: EmbedHead, inputs):
    return module.head(inputs)


class BlockLayer(nn.Module):
    """Decoder layer i, preceded by its gated xattn block when it has one."""

    def __init__(self, model, i: int):
        super().__init__()
        j = model.xattn_index(i)
        self.xattn = model.xattn[j] if j is not None else None
        self.layer = model.lm.layers[i]
        self.register_buffer("inv_freq", model.lm.inv_freq.clone(), persistent=False)

    def forward(self, inputs):
        h, latents, seg, tt = inputs
        pos = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        cos, sin = rope_cos_sin(self.inv_freq, pos, h.dtype)
        if self.xattn is not None:
            h = self.xattn(h, latents, tt, seg)
        return self.layer(h, cos, sin), latents, seg, tt


class NormLayer(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm = model.lm.norm

    def forward(self, inputs):
        return (self.norm(inputs[0]), *inputs[1:])


def flamingo_pipeline(model, topology, *, activation_checkpoint_interval: int = 0,
                      partition_method: str = "parameters"):
    """A deepspeed.pipe.PipelineModule over `model` for the (pp, dp, tp) grid of `topology`."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    tied_attrs = []
    if model.lm.args.tie_word_embeddings:
        tied_attrs = [a for a, p in (("embed_tokens.weight", model.lm.embed_tokens.weight),
                                     ("new_embed.weight",
                                      None if model.new_tokens is None else model.new_tokens.embed.weight))
                      if p is not None and p.requires_grad]
    specs = [LayerSpec(MediaLayer, model)]
    if tied_attrs:
        specs.append(TiedLayerSpec("embed", EmbedHead, model, tied_weight_attr=tied_attrs))
    else:
        specs.append(LayerSpec(EmbedHead, model, True, False))
    specs += [LayerSpec(BlockLayer, model, i) for i in range(len(model.lm.layers))]
    specs.append(LayerSpec(NormLayer, model))
    if tied_attrs:
        specs.append(TiedLayerSpec("embed", EmbedHead, model, forward_fn=head_fn, tied_weight_attr=tied_attrs))
    else:
        specs.append(LayerSpec(_HeadOnly, model))
    topo = PipeModelDataParallelTopology(num_pp=topology.pp, num_mp=topology.tp, num_dp=topology.dp)
    c = topology.coord
    if topo.get_rank(pipe=c.pp, data=c.dp, model=c.tp) != topology.rank:  # same grid, same order
        raise RuntimeError(f"DeepSpeed's pipeline grid disagrees with {topology}")
    pipe = PipelineModule(layers=specs, topology=topo, loss_fn=model.loss_fn, partition_method=partition_method,
                          activation_checkpoint_interval=activation_checkpoint_interval,
                          checkpointable_layers=["BlockLayer"])
    return pipe


class _HeadOnly(EmbedHead):
    def __init__(self, model):
        super().__init__(model, with_embed=False, with_head=True)

    def forward(self, inputs):
        return self.head(inputs)


def batch_to_pipe(batch: dict):
    """The batch dict as the PipelineEngine wants it: ((stage-0 inputs), labels)."""
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("pipeline batches need labels")
    return (batch["input_ids"], batch["images"], batch["media_valid"]), labels

