"""Flamingo: frozen vision tower -> Perceiver Resampler -> gated xattn blocks interleaved with a
Llama-family decoder. `forward(batch) -> loss`.

New tokens (<image>, <|endofchunk|>) that the LM's vocabulary lacks get their own embedding
(and, for untied heads, output) rows, so a frozen LM trains exactly those rows and nothing of
its own. Nothing per-batch is stored on a module: latents, text_time and caches are arguments.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import llama as llama_mod
from .hf_io import load_weights, save_weights
from .llama import KVCache, Llama, LlamaArgs
from .perceiver import PerceiverResampler
from .tokens import EOC_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, build_labels, text_time
from .vision import KINDS, VisionTower, vision_from_config, vision_from_hf
from .xattn import GatedCrossAttentionBlock


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (fp32); 0 when none are labelled."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


def media_segments(media_valid: torch.Tensor, num_latents: int) -> torch.Tensor:
    """[B, T*n]: the k-th valid image's latents carry k (matching text_time), padding media -1."""
    seg = torch.where(media_valid, media_valid.long().cumsum(1), torch.full_like(media_valid, -1, dtype=torch.long))
    return seg.repeat_interleave(num_latents, dim=1)


class NewTokens(nn.Module):
    """Embedding (and, for an untied LM, output) rows of tokens the LM's vocabulary lacks.
    `embed` and `head` are modules so ZeRO-3 gathers their weights when they run."""

    def __init__(self, lm: Llama, count: int):
        super().__init__()
        self.count = count
        d = lm.args.hidden_size
        self.embed = nn.Embedding(count, d)
        self.head = nn.Linear(d, count, bias=False)
        w = lm.embed_tokens.weight.detach()
        if w.device.type != "meta":  # start at the mean of the existing rows: a neutral point
            with torch.no_grad():
                self.embed.weight.copy_(w.float().mean(0, keepdim=True).to(w.dtype).expand(count, -1))
                self.head.weight.copy_(self.embed.weight)
        if lm.args.tie_word_embeddings:
            self.head.weight = self.embed.weight


class FlamingoModel(nn.Module):
    def __init__(self, lm: Llama, vision: VisionTower, *, image_token_id: int, eoc_token_id: int,
                 vocab_size: int | None = None, xattn_every: int = 4, xattn_heads: int = 8,
                 xattn_dim_head: int = 64, xattn_ff_mult: int = 4, perceiver_depth: int = 6,
                 perceiver_heads: int = 8, perceiver_dim_head: int = 64, num_latents: int = 64,
                 max_frames: int = 8, perceiver_ff_mult: int = 4, freeze_lm: bool = True,
                 xattn_gate_init: float = 0.0):
        super().__init__()
        d, dv = lm.args.hidden_size, vision.hidden_size
        self.lm = lm
        self.vision = vision
        self.image_token_id = image_token_id
        self.eoc_token_id = eoc_token_id
        self.num_latents = num_latents
        self.xattn_every = xattn_every
        self.perceiver = PerceiverResampler(dv, depth=perceiver_depth, heads=perceiver_heads,
                                            dim_head=perceiver_dim_head, num_latents=num_latents,
                                            max_frames=max_frames, ff_mult=perceiver_ff_mult)
        self.xattn = nn.ModuleList(
            GatedCrossAttentionBlock(d, dv, heads=xattn_heads, dim_head=xattn_dim_head, ff_mult=xattn_ff_mult,
                                     gate_init=xattn_gate_init)
            for _ in range(lm.args.num_layers // xattn_every))
        self.base_vocab = lm.args.vocab_size
        n_extra = max(0, (vocab_size or self.base_vocab) - self.base_vocab)
        if max(image_token_id, eoc_token_id) >= self.base_vocab + n_extra:
            raise ValueError(f"token ids {image_token_id}/{eoc_token_id} exceed the vocabulary ({self.base_vocab + n_extra})")
        self.new_tokens = NewTokens(lm, n_extra) if n_extra else None
        self.activation_checkpointing = False
        # The loss over the head's logits; tensor parallelism swaps in the vocab-parallel CE
        # (furnace.parallel.apply), which reads this rank's vocabulary slice of the logits.
        self.loss_fn = causal_lm_loss
        self.lm.requires_grad_(not freeze_lm)

    # -------------------------------------------------------------- pieces

    @property
    def vocab_size(self) -> int:
        return self.base_vocab + (0 if self.new_tokens is None else self.new_tokens.count)

    def xattn_index(self, layer: int) -> int | None:
        """open_flamingo's placement: a block before layer i when (i + 1) % every == 0."""
        return (layer + 1) // self.xattn_every - 1 if (layer + 1) % self.xattn_every == 0 else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.new_tokens is None:
            return self.lm.embed_tokens(input_ids)
        is_new = input_ids >= self.base_vocab
        base = self.lm.embed_tokens(input_ids.masked_fill(is_new, 0))
        new = self.new_tokens.embed((input_ids - self.base_vocab).clamp(min=0))
        return torch.where(is_new[..., None], new.to(base.dtype), base)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm.lm_head(h)
        if self.new_tokens is not None:
            logits = torch.cat([logits, self.new_tokens.head(h)], dim=-1)
        return logits

    def check_media(self, input_ids: torch.Tensor, media_valid: torch.Tensor) -> None:
        """Every <image> token needs exactly one valid image. Checked where the batch is still on
        the CPU: on an accelerator the comparison would stall the host once per micro-batch, so
        there the trainer and the benchmarks call this on the loader's batch before the copy."""
        if input_ids.device.type != "cpu":
            return
        n_tokens = (input_ids == self.image_token_id).sum(1)
        n_images = media_valid.sum(1)
        if not torch.equal(n_tokens, n_images):
            row = int((n_tokens != n_images).nonzero()[0, 0])
            raise ValueError(f"batch row {row} has {int(n_tokens[row])} {IMAGE_TOKEN} tokens but "
                             f"{int(n_images[row])} valid images; every {IMAGE_TOKEN} token needs exactly one "
                             "image marked in media_valid")

    def encode_media(self, images: torch.Tensor, media_valid: torch.Tensor) -> torch.Tensor:
        """images [B, T, F, C, H, W] -> latents [B, T, n, dv]; only valid media are encoded."""
        b, t, f = images.shape[:3]
        # The one host sync of the forward: the number of valid images sets the tower's batch.
        idx = media_valid.flatten().nonzero().squeeze(1)
        empty = idx.numel() == 0
        if empty:
            # Keep every parameter in the graph (ZeRO and DDP expect gradients), contributing 0.
            idx = idx.new_zeros(1)
        sel = images.flatten(0, 1).index_select(0, idx)       # [N, F, C, H, W]
        feats = self.vision(sel.flatten(0, 1))                # [N*F, P, dv]
        feats = feats.view(sel.shape[0], f, *feats.shape[1:])
        lat = self.perceiver(feats)                           # [N, n, dv]
        if empty:
            lat = lat * 0
        out = lat.new_zeros(b * t, *lat.shape[1:]).index_copy(0, idx, lat)
        return out.view(b, t, *lat.shape[1:])

    def decoder(self, input_ids, latents, media_segment, text_times, *, position_ids=None,
                segment_ids=None, kv_segment_ids=None, caches=None, media_kvs=None) -> torch.Tensor:
        """Logits of the decoder with xattn blocks; latents [B, T*n, dv]."""
        h = self.embed(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        cos, sin = self.lm.rope(position_ids, h.dtype)
        ckpt = self.activation_checkpointing and self.training and caches is None and torch.is_grad_enabled()
        for i in range(len(self.lm.layers)):
            cache = None if caches is None else caches[i]
            if ckpt:
                h = checkpoint(self._block, i, h, cos, sin, latents, media_segment, text_times,
                               segment_ids, kv_segment_ids, None, None, use_reentrant=False)
            else:
                h = self._block(i, h, cos, sin, latents, media_segment, text_times, segment_ids, kv_segment_ids,
                                cache, media_kvs)
        return self.head(self.lm.norm(h))

    def _block(self, i, h, cos, sin, latents, media_segment, text_times, segment_ids, kv_segment_ids, cache, media_kvs):
        j = self.xattn_index(i)
        if j is not None:
            h = self.xattn[j](h, latents, text_times, media_segment, None if media_kvs is None else media_kvs[j])
        return self.lm.layers[i](h, cos, sin, segment_ids, kv_segment_ids, cache)

    # -------------------------------------------------------------- training

    def logits(self, batch: dict) -> torch.Tensor:
        input_ids, media_valid = batch["input_ids"], batch["media_valid"]
        self.check_media(input_ids, media_valid)
        latents = self.encode_media(batch["images"], media_valid).flatten(1, 2)
        seg = media_segments(media_valid, self.num_latents)
        return self.decoder(input_ids, latents, seg, text_time(input_ids, self.image_token_id),
                            segment_ids=batch.get("segment_ids"))

    def forward(self, batch: dict) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is None:
            labels = build_labels(batch["input_ids"], batch.get("attention_mask"),
                                  image_token_id=self.image_token_id, eoc_token_id=self.eoc_token_id)
        return self.loss_fn(self.logits(batch), labels)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    # -------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, images=None, media_valid=None, *,
                 max_new_tokens: int = 20, eos_token_id: int | None = None, pad_token_id: int = 0) -> torch.Tensor:
        """Greedy decoding with a KV cache; latents and their xattn keys/values are computed once
        per sample. Prompts may be right- or left-padded (attention_mask); returns [B, new].
        <image> is never generated: no image could stand behind it."""
        b = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = left_align(input_ids, attention_mask, pad_token_id)
        self.check_media(ids, media_valid)
        latents = self.encode_media(images, media_valid).flatten(1, 2)
        seg = media_segments(media_valid, self.num_latents)
        media_kvs = [blk.attn.media_kv(latents) for blk in self.xattn]
        caches = [KVCache() for _ in self.lm.layers]
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        tt = text_time(ids, self.image_token_id)
        kv_seg = mask
        logits = self.decoder(ids, latents, seg, tt, position_ids=pos, segment_ids=mask, kv_segment_ids=kv_seg,
                              caches=caches, media_kvs=media_kvs)[:, -1]
        out = []
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        one = torch.ones(b, 1, dtype=mask.dtype, device=ids.device)
        for _ in range(max_new_tokens):
            logits[:, self.image_token_id] = float("-inf")
            nxt = logits.argmax(-1).masked_fill(done, pad_token_id)
            out.append(nxt)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
            pos = pos[:, -1:] + 1
            tt = tt[:, -1:]
            kv_seg = torch.cat([kv_seg, one], dim=1)
            logits = self.decoder(nxt[:, None], latents, seg, tt, position_ids=pos, segment_ids=one,
                                  kv_segment_ids=kv_seg, caches=caches, media_kvs=media_kvs)[:, -1]
        return torch.stack(out, dim=1)

    # -------------------------------------------------------------- export

    def lm_with_new_tokens(self) -> Llama:
        """The decoder alone with the new token rows merged into its vocabulary (for to_hf)."""
        if self.new_tokens is None:
            return self.lm
        a = dataclasses.replace(self.lm.args, vocab_size=self.vocab_size)
        lm = Llama(a)
        state = dict(self.lm.state_dict())
        state["embed_tokens.weight"] = torch.cat([state["embed_tokens.weight"], self.new_tokens.embed.weight.detach()])
        state["lm_head.weight"] = torch.cat([state["lm_head.weight"], self.new_tokens.head.weight.detach()])
        lm.load_state_dict(state)
        lm.tie_weights()
        return lm


def left_align(input_ids: torch.Tensor, mask: torch.Tensor, pad_id: int):
    """Move each row's real tokens to the right end (left padding) so decoding appends in step."""
    lengths = mask.sum(1)
    l = input_ids.shape[1]
    order = torch.argsort(mask, dim=1, stable=True)  # pads (0) first, real tokens keep their order
    ids = torch.gather(input_ids, 1, order)
    new_mask = (torch.arange(l, device=ids.device)[None, :] >= (l - lengths)[:, None]).to(mask.dtype)
    return ids.masked_fill(new_mask == 0, pad_id), new_mask


# ------------------------------------------------------------------ building from the config

def lm_args_from_config(lmc, vocab_size: int) -> LlamaArgs:
    return LlamaArgs(vocab_size=lmc.vocab_size or vocab_size, hidden_size=lmc.hidden_size,
                     intermediate_size=lmc.intermediate_size, num_layers=lmc.num_layers, num_heads=lmc.num_heads,
                     num_kv_heads=lmc.num_kv_heads, rms_norm_eps=lmc.rms_norm_eps, rope_theta=lmc.rope_theta,
                     max_position_embeddings=lmc.max_position_embeddings,
                     tie_word_embeddings=lmc.tie_word_embeddings)


def build_flamingo(mcfg, *, vocab_size: int, image_token_id: int, eoc_token_id: int,
                   lm: Llama | None = None, vision: VisionTower | None = None) -> FlamingoModel:
    """FlamingoModel from a `ModelConfig`; vocab ids come from the tokenizer (len, <image>, <|endofchunk|>).
    `lm`/`vision` override the config's (used when reloading a saved model)."""
    if lm is None:
        lm = (llama_mod.from_hf(mcfg.lm.path) if mcfg.lm.path
              else llama_mod.from_config(lm_args_from_config(mcfg.lm, vocab_size)))
    v = mcfg.vision
    if vision is None:
        vision = (vision_from_hf(v.path, frozen=mcfg.freeze_vision) if v.path else
                  vision_from_config(v.kind, image_size=v.image_size, patch_size=v.patch_size,
                                     hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                     num_layers=v.num_layers, num_heads=v.num_heads, frozen=mcfg.freeze_vision,
                                     sincos_positions=v.sincos_positions))
    p, x = mcfg.perceiver, mcfg.xattn
    model = FlamingoModel(lm, vision, image_token_id=image_token_id, eoc_token_id=eoc_token_id,
                          vocab_size=vocab_size, xattn_every=x.every, xattn_heads=x.heads, xattn_dim_head=x.dim_head,
                          xattn_ff_mult=x.ff_mult, perceiver_depth=p.depth, perceiver_heads=p.heads,
                          perceiver_dim_head=p.dim_head, num_latents=p.num_latents, max_frames=p.max_frames,
                          perceiver_ff_mult=p.ff_mult, freeze_lm=mcfg.freeze_lm, xattn_gate_init=x.gate_init)
    model.activation_checkpointing = mcfg.activation_checkpointing
    return model


def build_from_tokenizer(mcfg, tokenizer) -> FlamingoModel:
    return build_flamingo(mcfg, vocab_size=len(tokenizer),
                          image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                          eoc_token_id=tokenizer.convert_tokens_to_ids(EOC_TOKEN))


def save_flamingo(model: FlamingoModel, path, model_config: dict) -> None:
    """The whole model as one safetensors folder plus what rebuilds it without the original
    checkpoints: furnace's model config, the decoder's HF config and the vision tower's config."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "flamingo.json").write_text(json.dumps({
        "model": model_config, "vocab_size": model.vocab_size, "image_token_id": model.image_token_id,
        "eoc_token_id": model.eoc_token_id, "lm_config": llama_mod.hf_config_from_args(model.lm.args),
        "vision_kind": model.vision.kind, "vision_config": model.vision.model.config.to_dict()}, indent=2))
    save_weights(flamingo_state_dict(model), p)


def flamingo_state_dict(model: FlamingoModel) -> dict[str, torch.Tensor]:
    """state_dict without the tied duplicates (safetensors stores each tensor once)."""
    state = model.state_dict()
    if model.lm.args.tie_word_embeddings:
        state.pop("lm.lm_head.weight", None)
        state.pop("new_tokens.head.weight", None)
    return state


def load_flamingo(path) -> FlamingoModel:
    from furnace.config import ModelConfig, _apply

    meta = json.loads((Path(path) / "flamingo.json").read_text())
    mcfg = ModelConfig()
    _apply(mcfg, meta["model"], "model.")
    lm = Llama(llama_mod.args_from_hf_config(meta["lm_config"]))
    cfg_cls, cls = KINDS[meta["vision_kind"]]
    vision = VisionTower(cls(cfg_cls(**meta["vision_config"])), meta["vision_kind"], mcfg.freeze_vision)
    model = build_flamingo(mcfg, vocab_size=meta["vocab_size"], image_token_id=meta["image_token_id"],
                           eoc_token_id=meta["eoc_token_id"], lm=lm, vision=vision)
    load_flamingo_state(model, load_weights(path))
    return model


def load_flamingo_state(model: FlamingoModel, state: dict[str, torch.Tensor]) -> None:
    """Strict load that accepts the tied duplicates being absent."""
    tied = {"lm.lm_head.weight", "new_tokens.head.weight"} if model.lm.args.tie_word_embeddings else set()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"weights do not match this Flamingo: missing {missing[:5]}, unexpected {unexpected[:5]}")
