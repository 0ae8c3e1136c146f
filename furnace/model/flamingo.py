"""Flamingo: frozen vision tower -> Perceiver Resampler -> gated xattn blocks interleaved with a
Llama-family decoder. `forward(batch) -> loss`.

One forward path: the plain model below and the pipeline stages (`furnace.parallel.pipeline`)
run the same functions, each taking the modules it needs:

    media_context   images -> latents, their segment ids, and each token's text_time
    embed_tokens    ids -> hidden states (the LM's rows and the new-token rows)
    decoder_block   [gated xattn block] + decoder layer i, positions and segments as arguments
    output_logits   hidden states -> logits (the LM's head and the new-token rows)

With an audio tower (`model.audio`), `model.audio` is an `AudioBranch` (tower + its own
resampler): a batch's `audio` [B, T, S] / `audio_valid` [B, T] mark the slots that hold clips,
whose latents replace the image side's in those slots; an <audio> token starts a medium as an
<image> does, so the xattn blocks and text_time are the same for both.

New tokens (<image>, <|endofchunk|>) that the LM's vocabulary lacks get their own embedding
(and, for untied heads, output) rows, so a frozen LM trains exactly those rows and nothing of
its own. Nothing per-batch is stored on a module: latents, text_time and caches are arguments.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from furnace.config import ModelConfig
from furnace.tokens import AUDIO_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, build_labels, is_media, positions, text_time

from . import decoding, llama
from .audio import AudioBranch, AudioTower, audio_from_config, audio_from_hf
from .contrastive import ContrastiveHeads
from .fused import HeadLoss, fused_ops, use_fused
from .layers import run_block
from .llama import KVCache, Llama
from .lora import add_lora
from .perceiver import PerceiverResampler
from .vision import VisionTower, vision_from_config, vision_from_hf
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


def check_media(input_ids: torch.Tensor, media_valid: torch.Tensor, image_token_id, audio_valid=None,
                audio_token_id: int | None = None) -> None:
    """Every <image> token needs exactly one valid image (every media token one medium: with
    `audio_token_id`, the k-th media token of a row is <audio> exactly when its slot k holds a
    clip in `audio_valid`). Checked where the batch is still on the CPU: on an accelerator the
    comparison would stall the host once per micro-batch, so there the trainer and the
    benchmarks call this on the loader's batch before the copy."""
    if input_ids.device.type != "cpu":
        return
    media = image_token_id if audio_token_id is None else (image_token_id, audio_token_id)
    word = IMAGE_TOKEN if audio_token_id is None else f"media ({IMAGE_TOKEN}, {AUDIO_TOKEN})"
    marked = is_media(input_ids, media)
    n_tokens = marked.sum(1)
    n_images = media_valid.sum(1)
    if not torch.equal(n_tokens, n_images):
        row = int((n_tokens != n_images).nonzero()[0, 0])
        raise ValueError(f"batch row {row} has {int(n_tokens[row])} {word} tokens but "
                         f"{int(n_images[row])} valid images; every {word} token needs exactly one "
                         "image marked in media_valid")
    if audio_token_id is None:
        return
    clips = audio_valid.bool() if audio_valid is not None else torch.zeros_like(media_valid)
    slot = (marked.long().cumsum(1) - 1).clamp(0, media_valid.shape[1] - 1)  # each media token's slot k
    wrong = marked & ((input_ids == audio_token_id) != clips.gather(1, slot))
    if wrong.any():
        row, pos = (int(x) for x in wrong.nonzero()[0])
        k, audio = int(slot[row, pos]), bool(input_ids[row, pos] == audio_token_id)
        raise ValueError(f"batch row {row}: media token {k} (position {pos}) is {AUDIO_TOKEN if audio else IMAGE_TOKEN} "
                         f"but audio_valid marks slot {k} as {'an image' if audio else 'an audio clip'}; the k-th media "
                         f"token is {AUDIO_TOKEN} exactly when slot k holds an audio clip")


# ------------------------------------------------------------------ the forward path

def encode_media(vision: VisionTower, perceiver: PerceiverResampler, images: torch.Tensor,
                 media_valid: torch.Tensor) -> torch.Tensor:
    """images [B, T, F, C, H, W] -> latents [B, T, n, dv]; only valid media are encoded."""
    b, t, f = images.shape[:3]
    # The one host sync of the forward: the number of valid images sets the tower's batch.
    idx = media_valid.flatten().nonzero().squeeze(1)
    empty = idx.numel() == 0
    if empty:
        # Keep every parameter in the graph (ZeRO and DDP expect gradients), contributing 0.
        idx = idx.new_zeros(1)
    sel = images.flatten(0, 1).index_select(0, idx)       # [N, F, C, H, W]
    feats = vision(sel.flatten(0, 1))                     # [N*F, P, dv]
    feats = feats.view(sel.shape[0], f, *feats.shape[1:])
    lat = perceiver(feats)                                # [N, n, dv]
    if empty:
        lat = lat * 0
    out = lat.new_zeros(b * t, *lat.shape[1:]).index_copy(0, idx, lat)
    return out.view(b, t, *lat.shape[1:])


def encode_all(vision: VisionTower, perceiver: PerceiverResampler, images: torch.Tensor, media_valid: torch.Tensor,
               audio_branch: AudioBranch | None = None, audio=None, audio_valid=None) -> torch.Tensor:
    """latents [B, T, n, dv] of every medium: the images' (`encode_media`), and with an audio
    branch the clips' in the slots `audio_valid` marks (a batch without audio: an empty selection,
    the branch still runs)."""
    if audio_branch is None:
        return encode_media(vision, perceiver, images, media_valid)
    if audio is None:
        audio = images.new_zeros(media_valid.shape + (1,))
        audio_valid = torch.zeros_like(media_valid)
    audio_valid = audio_valid & media_valid
    from_images = encode_media(vision, perceiver, images, media_valid & ~audio_valid)
    from_audio = audio_branch(audio, audio_valid).to(from_images.dtype)
    return torch.where(audio_valid[:, :, None, None], from_audio, from_images)


def media_context(vision: VisionTower, perceiver: PerceiverResampler, input_ids: torch.Tensor,
                  images: torch.Tensor, media_valid: torch.Tensor, image_token_id, segment_ids=None,
                  reset_id: int | None = None, audio_branch: AudioBranch | None = None, audio=None,
                  audio_valid=None):
    """What every xattn block reads: (latents [B, T*n, dv], media_segment [B, T*n], text_time [B, L]);
    `segment_ids`: a packed row's samples (each sees only its own images); `reset_id`: the token
    after which text sees no image until the next (`text_time`); `image_token_id`: the media
    ids (`is_media`); `audio_branch`, `audio`, `audio_valid`: the clips (`encode_all`)."""
    latents = encode_all(vision, perceiver, images, media_valid, audio_branch, audio, audio_valid)
    seg = media_segments(media_valid, latents.shape[2])
    return latents.flatten(1, 2), seg, text_time(input_ids, image_token_id, segment_ids, reset_id)


def embed_tokens(input_ids: torch.Tensor, embed: nn.Module, new_embed: nn.Module | None, base_vocab: int):
    """Hidden states of input_ids: ids >= base_vocab look up the new-token rows."""
    if new_embed is None:
        return embed(input_ids)
    is_new = input_ids >= base_vocab
    base = embed(input_ids.masked_fill(is_new, 0))
    new = new_embed((input_ids - base_vocab).clamp(min=0))
    return torch.where(is_new[..., None], new.to(base.dtype), base)


def decoder_block(layer: nn.Module, xattn: GatedCrossAttentionBlock | None, h, cos, sin, latents, media_segment,
                  text_times, segment_ids=None, kv_segment_ids=None, media_kv=None, cache: KVCache | None = None):
    """Decoder layer i, preceded by its gated xattn block when it has one."""
    if xattn is not None:
        h = xattn(h, latents, text_times, media_segment, media_kv)
    return layer(h, cos, sin, segment_ids, kv_segment_ids, cache)


def output_logits(h: torch.Tensor, lm_head: nn.Module, new_head: nn.Module | None) -> torch.Tensor:
    """[B, L, vocab]: the LM's logits (this rank's slice under TP), then the new-token rows'."""
    logits = lm_head(h)
    if new_head is not None:
        logits = torch.cat([logits, new_head(h)], dim=-1)
    return logits


# ------------------------------------------------------------------ the model

class NewTokens(nn.Module):
    """Embedding (and, for an untied LM, output) rows of tokens the LM's vocabulary lacks.
    `embed` and `head` are modules so ZeRO-3 gathers their weights when they run."""

    def __init__(self, lm: Llama, count: int, mean_row: torch.Tensor | None = None):
        """`mean_row`: the mean of the LM's embedding rows (fp32), when the caller has it; else taken
        from a real `lm` (a decoder filled in later calls start_at itself)."""
        super().__init__()
        self.count = count
        d = lm.cfg.hidden_size
        self.embed = nn.Embedding(count, d)
        self.head = nn.Linear(d, count, bias=False)
        w = lm.embed_tokens.weight.detach()
        if mean_row is None and w.device.type != "meta":
            mean_row = w.float().mean(0)
        if mean_row is not None:
            self.start_at(mean_row)
        self.tie_weights(lm.cfg.tie_word_embeddings)

    def tie_weights(self, tied: bool) -> None:
        if tied:
            self.head.weight = self.embed.weight

    def start_at(self, mean_row: torch.Tensor) -> None:
        """Every new row at the mean of the LM's embedding rows: a neutral point."""
        with torch.no_grad():  # each real one (under pipeline parallelism embed and head may be on other stages)
            for w in {id(w): w for w in (self.embed.weight, self.head.weight)}.values():
                if not w.is_meta:
                    w.copy_(mean_row.to(w.dtype).expand_as(w))


class FlamingoModel(nn.Module):
    """`cfg` supplies the resampler, the xattn blocks, the LM's LoRA adapters, freezing and
    activation checkpointing; `lm` and `vision` are built (or loaded) already. `vocab_size`: the
    tokenizer's."""

    def __init__(self, lm: Llama, vision: VisionTower, cfg: ModelConfig, *, vocab_size: int, image_token_id: int,
                 eoc_token_id: int, eos_token_id: int | None = None, drawn=llama.whole,
                 embed_mean: torch.Tensor | None = None, audio: AudioTower | None = None,
                 audio_token_id: int | None = None):
        """`drawn(name, module)`: called with each freshly drawn piece (the resampler, each xattn
        block, the audio branch, the new-token rows, each adapted linear, the contrastive heads) as
        soon as its weights are final, under its name in this model; what it returns takes the
        piece's place (a parallel build keeps its share and passes a shape on). Each piece draws its
        own weights in its constructor, in this order, so the numbers are those of a whole build.
        `embed_mean`: the mean of the LM's embedding rows, where the new rows start (else taken
        from a real `lm`). `eos_token_id`: the tokenizer's, needed by `model.xattn.reset_after_eos`.
        `audio`: the audio tower (built already, as `vision`), with `audio_token_id` (<audio>'s id)
        and `cfg.audio_perceiver`."""
        super().__init__()
        d, dv = lm.cfg.hidden_size, vision.hidden_size
        self.lm = lm
        self.vision = vision
        self.image_token_id = image_token_id
        self.eoc_token_id = eoc_token_id
        if (audio is None) != (audio_token_id is None):
            raise ValueError("an audio tower needs the tokenizer's <audio> id, and <audio> an audio tower")
        self.audio_token_id = audio_token_id
        # What text_time, the labels and decoding take as media tokens: <image> alone without audio.
        self.media_ids = image_token_id if audio_token_id is None else (image_token_id, audio_token_id)
        self.num_latents = cfg.perceiver.num_latents
        self.xattn_every = cfg.xattn.every
        self.xattn_first = cfg.xattn.placement == "first"
        if cfg.xattn.reset_after_eos and eos_token_id is None:
            raise ValueError("model.xattn.reset_after_eos needs the tokenizer's EOS token, and it has none: "
                             "use a tokenizer with an eos_token or set model.xattn.reset_after_eos=false")
        self.eos_token_id = eos_token_id
        self.media_reset_id = eos_token_id if cfg.xattn.reset_after_eos else None
        self.perceiver = drawn("perceiver", PerceiverResampler(dv, cfg.perceiver))
        self.xattn = nn.ModuleList(drawn(f"xattn.{j}", GatedCrossAttentionBlock(d, dv, cfg.xattn, lm.cfg.rms_norm_eps,
                                                                             self.num_latents))
                                   for j in range(lm.cfg.num_layers // cfg.xattn.every))
        self.audio = None
        if audio is not None:
            if cfg.audio_perceiver.num_latents != cfg.perceiver.num_latents:
                raise ValueError("model.audio_perceiver.num_latents must equal model.perceiver.num_latents")
            # one piece: the tower (built already) with its projection and resampler, drawn here
            self.audio = drawn("audio", AudioBranch(audio, dv, cfg.audio_perceiver))
        self.base_vocab = lm.cfg.vocab_size
        n_extra = max(0, vocab_size - self.base_vocab)
        if max(image_token_id, eoc_token_id, audio_token_id or 0) >= self.base_vocab + n_extra:
            raise ValueError(f"token ids {image_token_id}/{eoc_token_id}/{audio_token_id} exceed the vocabulary "
                             f"({self.base_vocab + n_extra})")
        self.new_tokens = drawn("new_tokens", NewTokens(lm, n_extra, embed_mean)) if n_extra else None
        self.activation_checkpointing = cfg.activation_checkpointing
        # The loss over the head's logits; tensor parallelism swaps in the vocab-parallel CE
        # (furnace.parallel.apply), which reads this rank's vocabulary slice of the logits.
        self.loss_fn = causal_lm_loss
        # Decoding needs every row of the vocabulary: tensor parallelism sets a gather here.
        self.gather_logits = None
        # model.fused_kernels; with linear_cross_entropy the training loss comes from the hidden
        # states (`head_loss`), while logits() and decoding keep the head and loss_fn.
        self.fused = fused_ops(cfg.fused_kernels)
        self.head_loss = HeadLoss(self.base_vocab) if "linear_cross_entropy" in self.fused else None
        self.lm.requires_grad_(not cfg.freeze_lm)
        # After everything else is drawn: the other weights are those of the same run without LoRA
        # or contrastive heads.
        add_lora(self.lm, cfg.lora, lambda name, module: drawn("lm." + name, module))
        self.contrastive = None
        if cfg.contrastive.dim:
            self.contrastive = drawn("contrastive", ContrastiveHeads(d, dv, cfg.contrastive))
        use_fused(self, self.fused)
        # The contrastive loss's weight (train.contrastive_weight, set by the builder) and the
        # gather of every data-parallel rank's rows for its negatives (set by furnace.parallel).
        self.contrastive_weight = 0.0
        self.gather_batch = None

    # -------------------------------------------------------------- pieces

    @property
    def vocab_size(self) -> int:
        return self.base_vocab + (0 if self.new_tokens is None else self.new_tokens.count)

    def xattn_index(self, layer: int) -> int | None:
        """Which xattn block runs before decoder layer i: open_flamingo's placement (`last`) puts
        one before layer i when (i + 1) % every == 0, IDEFICS' (`first`) when i % every == 0."""
        k = self.xattn_every
        if self.xattn_first:
            return layer // k if layer % k == 0 and layer // k < len(self.xattn) else None
        return (layer + 1) // k - 1 if (layer + 1) % k == 0 else None

    def xattn_for(self, layer: int) -> GatedCrossAttentionBlock | None:
        j = self.xattn_index(layer)
        return None if j is None else self.xattn[j]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        new = None if self.new_tokens is None else self.new_tokens.embed
        return embed_tokens(input_ids, self.lm.embed_tokens, new, self.base_vocab)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return output_logits(h, self.lm.lm_head, None if self.new_tokens is None else self.new_tokens.head)

    def tie_weights(self) -> None:
        """Tie the tied heads to their embeddings again (a module built under
        `furnace.model.empty.empty()` gets a new parameter at every assignment)."""
        self.lm.tie_weights()
        if self.new_tokens is not None:
            self.new_tokens.tie_weights(self.lm.cfg.tie_word_embeddings)

    def check_media(self, input_ids: torch.Tensor, media_valid: torch.Tensor, audio_valid=None) -> None:
        check_media(input_ids, media_valid, self.image_token_id, audio_valid, self.audio_token_id)

    def encode_media(self, images: torch.Tensor, media_valid: torch.Tensor, audio=None, audio_valid=None) -> torch.Tensor:
        return encode_all(self.vision, self.perceiver, images, media_valid, self.audio, audio, audio_valid)

    def decoder(self, input_ids, latents, media_segment, text_times, **kw) -> torch.Tensor:
        """Logits of the decoder with xattn blocks; latents [B, T*n, dv] (`hidden` for the rest)."""
        return self.head(self.hidden(input_ids, latents, media_segment, text_times, **kw))

    def hidden(self, input_ids, latents, media_segment, text_times, *, position_ids=None,
               segment_ids=None, kv_segment_ids=None, caches=None, media_kvs=None, embedded=None) -> torch.Tensor:
        """The final hidden states (after the LM's norm) of the decoder with xattn blocks;
        `embedded`: the ids' embeddings when the caller has them already."""
        h = self.embed(input_ids) if embedded is None else embedded
        if position_ids is None:
            position_ids = positions(input_ids)
        cos, sin = self.lm.rope(position_ids, h.dtype)
        for i, layer in enumerate(self.lm.layers):
            j = self.xattn_index(i)
            xattn = None if j is None else self.xattn[j]
            media_kv = None if media_kvs is None or j is None else media_kvs[j]
            h = run_block(self, decoder_block, layer, xattn, h, cos, sin, latents, media_segment, text_times,
                          segment_ids, kv_segment_ids, media_kv, cache=None if caches is None else caches[i])
        return self.lm.norm(h)

    # -------------------------------------------------------------- training

    def logits(self, batch: dict) -> torch.Tensor:
        """batch: input_ids, images, media_valid; optional position_ids and segment_ids (packed rows)."""
        return self.head(self._forward(batch)[0])

    def _forward(self, batch: dict):
        """(the final hidden states, the contrastive loss or None)."""
        input_ids, media_valid = batch["input_ids"], batch["media_valid"]
        self.check_media(input_ids, media_valid, batch.get("audio_valid"))
        latents, seg, tt = media_context(self.vision, self.perceiver, input_ids, batch["images"], media_valid,
                                         self.media_ids, batch.get("segment_ids"), self.media_reset_id,
                                         self.audio, batch.get("audio"), batch.get("audio_valid"))
        h = self.embed(input_ids)
        aux = None
        if self.contrastive is not None and self.contrastive_weight:
            aux = self.contrastive(h, latents, seg, self.text_mask(input_ids, batch.get("attention_mask")),
                                   self.gather_batch)
        h = self.hidden(input_ids, latents, seg, tt, position_ids=batch.get("position_ids"),
                        segment_ids=batch.get("segment_ids"), embedded=h)
        return h, aux

    def text_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, L] the tokens a text embedding pools: not padding, not a media token."""
        keep = ~is_media(input_ids, self.media_ids)
        return keep if attention_mask is None else keep & attention_mask.bool()

    def image_embeddings(self, images: torch.Tensor, media_valid: torch.Tensor) -> torch.Tensor:
        """[B, dim] unit vectors of each sample's images ([B, T, F, C, H, W]) in the contrastive space."""
        latents = self.encode_media(images, media_valid).flatten(1, 2)
        return self.contrastive.embed_images(latents, media_segments(media_valid, self.num_latents))[0]

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, dim] unit vectors of each row's text in the contrastive space."""
        return self.contrastive.embed_texts(self.embed(input_ids), self.text_mask(input_ids, attention_mask))

    def forward(self, batch: dict) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is None:
            labels = build_labels(batch["input_ids"], batch.get("attention_mask"),
                                  image_token_id=self.media_ids, eoc_token_id=self.eoc_token_id)
        h, aux = self._forward(batch)
        if self.head_loss is not None:
            loss = self.head_loss(h, labels, self.lm.lm_head, None if self.new_tokens is None else self.new_tokens.head)
        else:
            loss = self.loss_fn(self.head(h), labels)
        return loss if aux is None else loss + self.contrastive_weight * aux

    # -------------------------------------------------------------- generation

    def media(self, input_ids, images, media_valid, audio=None, audio_valid=None):
        """(latents, media_segment, text_time) for decoding."""
        return media_context(self.vision, self.perceiver, input_ids, images, media_valid, self.media_ids,
                             reset_id=self.media_reset_id, audio_branch=self.audio, audio=audio, audio_valid=audio_valid)

    def next_logits(self, input_ids, latents, media_segment, text_times, **kw) -> torch.Tensor:
        """[B, whole vocabulary]: the logits after the last position, gathered under TP."""
        logits = self.decoder(input_ids, latents, media_segment, text_times, **kw)[:, -1]
        return logits if self.gather_logits is None else self.gather_logits(logits)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, images=None, media_valid=None, **kw) -> torch.Tensor:
        """Greedy decoding, sampling or beam search with this model (`decoding.generate`; `audio`,
        `audio_valid` among `kw`)."""
        return decoding.generate(self, input_ids, attention_mask, images, media_valid, **kw)


# ------------------------------------------------------------------ building from the config

def build_flamingo(cfg: ModelConfig, *, vocab_size: int, image_token_id: int, eoc_token_id: int,
                   eos_token_id: int | None = None, lm: Llama | None = None, vision: VisionTower | None = None,
                   drawn=llama.whole, audio_token_id: int | None = None,
                   audio: AudioTower | None = None) -> FlamingoModel:
    """FlamingoModel from a `ModelConfig`; vocab ids come from the tokenizer (len, <image>, <|endofchunk|>, EOS,
    and <audio> with `model.audio`). `lm`/`vision`/`audio` replace the config's (used when
    reloading a saved model). Draws the fresh weights from torch's global RNG, in module order:
    seed it first for identical replicas. `drawn(name, module)` sees each fresh piece as soon as
    it is drawn (`llama.draw`, `FlamingoModel`; a fresh tower is one piece, "vision") and returns
    what takes its place."""
    mean = None
    if lm is None:
        if cfg.lm.path:
            lm = llama.from_hf(cfg.lm.path)
        else:
            lm, mean = llama.draw(lm_config(cfg, vocab_size), lambda name, module: drawn("lm." + name, module))
    if vision is None:
        vision = (vision_from_hf(cfg.vision.path, frozen=cfg.freeze_vision) if cfg.vision.path
                  else drawn("vision", vision_from_config(cfg.vision, frozen=cfg.freeze_vision)))
    vision.features = cfg.vision.features
    if audio is None and cfg.audio.kind != "none":
        audio = (audio_from_hf(cfg.audio.path, frozen=cfg.freeze_audio) if cfg.audio.path
                 else audio_from_config(cfg.audio, frozen=cfg.freeze_audio))
    return FlamingoModel(lm, vision, cfg, vocab_size=vocab_size, image_token_id=image_token_id,
                         eoc_token_id=eoc_token_id, eos_token_id=eos_token_id, drawn=drawn, embed_mean=mean,
                         audio=audio, audio_token_id=audio_token_id if audio is not None else None)


def lm_config(cfg: ModelConfig, vocab_size: int):
    """The LMConfig of a fresh decoder: the tokenizer's vocabulary unless `model.lm.vocab_size` is set."""
    return dataclasses.replace(cfg.lm, vocab_size=cfg.lm.vocab_size or vocab_size)

