"""A pipelined Flamingo run eagerly, stage by stage, outside DeepSpeed's pipeline schedule: for
evaluation and generation, so that no rank needs the other stages' weights.

Each rank runs only the modules its stage holds (the PipelineModule's `parts`), in the layer
order of `pipeline._layer_specs` (media, embed, blocks, norm, head), through the model's own
forward functions. The media stage broadcasts the latents to its pipeline peers (each computes
the segments and text_time from the ids it has too); hidden states go from stage to stage point
to point; the head's stage computes the logits, gathers the vocabulary under tensor parallelism
and broadcasts what the others need (the loss, or the next-token logits). Every rank of a
pipeline group calls the same methods with the same batch (the trainer hands all stages the
same micro-batches).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from furnace.model.decoding import generate
from furnace.model.flamingo import check_media, decoder_block, media_segments
from furnace.model.layers import run_block
from furnace.tokens import positions, text_time


class StagedFlamingo:
    """`loss = staged(batch)`, `staged.generate(...)`: FlamingoModel's evaluation interface over
    this rank's pipeline stage."""

    def __init__(self, model, pipe, topology):
        self.model = model
        self.image_token_id, self.eoc_token_id = model.image_token_id, model.eoc_token_id
        self.media_ids = model.media_ids
        n_layers = len(model.lm.layers)
        parts = list(pipe.parts)
        stage_of = lambda spec: next(s for s in range(topology.pp) if parts[s] <= spec < parts[s + 1])  # noqa: E731
        self.stage = topology.coord.pp
        mine = range(parts[self.stage], parts[self.stage + 1])
        self.has_media, self.has_embed = 0 in mine, 1 in mine
        self.has_norm, self.has_head = n_layers + 2 in mine, n_layers + 3 in mine
        self.blocks = [spec - 2 for spec in mine if 2 <= spec < n_layers + 2]
        self.media_stage, self.embed_stage, self.head_stage = stage_of(0), stage_of(1), stage_of(n_layers + 3)
        c = topology.coord
        self.ranks = [topology.rank_of(s, c.dp, c.tp) for s in range(topology.pp)]
        self.group = topology.get_pipe_parallel_group()
        self.dtype = next(pipe.parameters()).dtype
        self.width = model.lm.cfg.hidden_size

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def check_media(self, input_ids, media_valid, audio_valid=None) -> None:
        check_media(input_ids, media_valid, self.image_token_id, audio_valid, self.model.audio_token_id)

    # ---------------------------------------------------------------- the stages

    def media(self, input_ids, images, media_valid, audio=None, audio_valid=None, segment_ids=None):
        """(latents, media_segment, text_time) on every stage: the media stage's latents, broadcast."""
        m = self.model
        b, t = media_valid.shape
        shape = (b, t * m.num_latents, m.vision.hidden_size)
        if self.has_media:
            latents = m.encode_media(images, media_valid, audio, audio_valid).flatten(1, 2).to(self.dtype).contiguous()
        else:
            latents = torch.empty(shape, dtype=self.dtype, device=input_ids.device)
        dist.broadcast(latents, src=self.ranks[self.media_stage], group=self.group)
        return latents, media_segments(media_valid, m.num_latents), text_time(input_ids, self.media_ids,
                                                                               segment_ids, m.media_reset_id)

    def _hidden(self, input_ids, latents, media_segment, text_times, *, position_ids=None, segment_ids=None,
                kv_segment_ids=None, caches=None, media_kvs=None):
        """This stage's part of the decoder: the head's stage returns the logits, the others None."""
        m = self.model
        if position_ids is None:
            position_ids = positions(input_ids)
        h = None
        if self.has_embed:
            h = m.embed(input_ids)
        elif self.stage > self.embed_stage:
            h = torch.empty((*input_ids.shape, self.width), dtype=self.dtype, device=input_ids.device)
            dist.recv(h, src=self.ranks[self.stage - 1], group=self.group)
        if self.blocks:
            cos, sin = m.lm.rope(position_ids, h.dtype)
        for i in self.blocks:
            j = m.xattn_index(i)
            h = run_block(m, decoder_block, m.lm.layers[i], None if j is None else m.xattn[j], h, cos, sin, latents,
                          media_segment, text_times, segment_ids, kv_segment_ids,
                          None if media_kvs is None or j is None else media_kvs[j],
                          cache=None if caches is None else caches[i])
        if self.has_norm:
            h = m.lm.norm(h)
        if self.has_head:
            return m.head(h)
        if self.embed_stage <= self.stage < self.head_stage:
            dist.send(h.to(self.dtype).contiguous(), dst=self.ranks[self.stage + 1], group=self.group)
        return None

    def next_logits(self, input_ids, latents, media_segment, text_times, **kw) -> torch.Tensor:
        """[B, whole vocabulary] after the last position, on every stage."""
        logits = self._hidden(input_ids, latents, media_segment, text_times, **kw)
        if logits is not None:
            logits = logits[:, -1].float()
            if self.model.gather_logits is not None:
                logits = self.model.gather_logits(logits)
            logits = logits.contiguous()
        else:
            logits = torch.empty((input_ids.shape[0], self.model.vocab_size), device=input_ids.device)
        dist.broadcast(logits, src=self.ranks[self.head_stage], group=self.group)
        return logits

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        """The loss of a batch (labels included), on every stage."""
        ids = batch["input_ids"]
        latents, seg, tt = self.media(ids, batch["images"], batch["media_valid"], batch.get("audio"),
                                      batch.get("audio_valid"), batch.get("segment_ids"))
        logits = self._hidden(ids, latents, seg, tt, position_ids=batch.get("position_ids"),
                              segment_ids=batch.get("segment_ids"))
        loss = (self.model.loss_fn(logits, batch["labels"]).float().reshape(1) if logits is not None
                else torch.empty(1, device=ids.device))
        dist.broadcast(loss, src=self.ranks[self.head_stage], group=self.group)
        return loss[0]

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, images=None, media_valid=None, **kw) -> torch.Tensor:
        return generate(self, input_ids, attention_mask, images, media_valid, **kw)
