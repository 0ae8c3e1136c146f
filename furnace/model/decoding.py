"""Decoding for FlamingoModel and anything with its decoding interface (`check_media`, `media`,
`next_logits`, `media_ids`: a pipeline's stages run eagerly, `parallel.staged`): greedy,
sampling (temperature, top-k, top-p), a repetition penalty, and beam search with a length
penalty; batched over prompts that are right- or left-padded, with the KV cache. Latents and
their xattn keys/values are computed once per sample. <image> (and <audio>) is never generated:
no medium could stand behind it. Audio clips come as `audio` / `audio_valid` (the batch's).

`synced_group`: ranks that must run the same number of forwards (ZeRO-3 gathers weights
collectively): decoding goes on until every one of them is done.
"""
from __future__ import annotations

import collections

import torch

from .llama import KVCache
from .xattn import MediaKV


def left_align(input_ids: torch.Tensor, mask: torch.Tensor, pad_id: int):
    """Move each row's real tokens to the right end (left padding) so decoding appends in step."""
    lengths = mask.sum(1)
    l = input_ids.shape[1]
    order = torch.argsort(mask, dim=1, stable=True)  # pads (0) first, real tokens keep their order
    ids = torch.gather(input_ids, 1, order)
    new_mask = (torch.arange(l, device=ids.device)[None, :] >= (l - lengths)[:, None]).to(mask.dtype)
    return ids.masked_fill(new_mask == 0, pad_id), new_mask


def all_done(done: torch.Tensor, group=None) -> bool:
    """Every row finished, on this rank and, with `group`, on every rank of it (one host sync)."""
    left = (~done).sum().reshape(1)  # on the rows' device: NCCL reduces device tensors only
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(left, group=group)
    return int(left.item()) == 0


def shape_logits(logits: torch.Tensor, seen: torch.Tensor, *, image_token_id, repetition_penalty: float = 1.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """fp32 logits [N, V] with <image> (every media id of `image_token_id`: an id or a tuple) ruled out; a token already in `seen` [N, S] has its logit
    divided (positive) or multiplied (negative) by `repetition_penalty` (CTRL's rule, as
    transformers applies it); then temperature, and top-k / top-p (nucleus) filtering to -inf."""
    logits = logits.float().clone()
    logits[:, list(image_token_id) if isinstance(image_token_id, tuple) else image_token_id] = float("-inf")
    if repetition_penalty != 1.0 and seen.numel():
        picked = logits.gather(1, seen)
        logits.scatter_(1, seen, torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty))
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability mass ahead of each token
        drop = (before >= top_p).scatter(1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class _State:
    """The prompt's media and positions, and the caches, for `rows` decoding rows per sample."""

    def __init__(self, model, input_ids, attention_mask, images, media_valid, pad_token_id: int, rows: int,
                 audio=None, audio_valid=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = left_align(input_ids, attention_mask, pad_token_id)
        if audio is None:  # an image-only model's interface, as it was
            model.check_media(ids, media_valid)
            latents, seg, tt = model.media(ids, images, media_valid)
        else:
            model.check_media(ids, media_valid, audio_valid)
            latents, seg, tt = model.media(ids, images, media_valid, audio, audio_valid)
        if rows > 1:  # each sample's beams side by side
            ids, mask, latents, seg, tt = (t.repeat_interleave(rows, 0) for t in (ids, mask, latents, seg, tt))
        self.model, self.ids, self.latents, self.seg = model, ids, latents, seg
        self.caches = {"caches": collections.defaultdict(KVCache), "media_kvs": collections.defaultdict(MediaKV)}
        self.pos = (mask.cumsum(1) - 1).clamp(min=0)
        self.kv_seg, self.tt = mask, tt
        self.one = torch.ones(ids.shape[0], 1, dtype=mask.dtype, device=ids.device)

    def first(self) -> torch.Tensor:
        return self.model.next_logits(self.ids, self.latents, self.seg, self.tt, position_ids=self.pos,
                                      segment_ids=self.kv_seg, kv_segment_ids=self.kv_seg, **self.caches)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        self.pos = self.pos[:, -1:] + 1
        self.tt = self.tt[:, -1:]
        self.kv_seg = torch.cat([self.kv_seg, self.one], dim=1)
        return self.model.next_logits(tokens[:, None], self.latents, self.seg, self.tt, position_ids=self.pos,
                                      segment_ids=self.one, kv_segment_ids=self.kv_seg, **self.caches)

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i continues from row rows[i]."""
        for cache in self.caches["caches"].values():
            if cache.k is not None:
                cache.k, cache.v = cache.k.index_select(0, rows), cache.v.index_select(0, rows)


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, images=None, media_valid=None, *, max_new_tokens: int = 20,
             eos_token_id: int | None = None, pad_token_id: int = 0, num_beams: int = 1, length_penalty: float = 1.0,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
             stop=None, synced_group=None, audio=None, audio_valid=None) -> torch.Tensor:
    """[B, new tokens]; rows that end early are padded with `pad_token_id` after their EOS.
    Greedy by default; `do_sample` draws from the shaped distribution (with `generator`, the
    same draws every time); `num_beams` > 1 runs beam search (scores: summed log-probabilities
    over length ** `length_penalty`). `stop(new tokens [B, t]) -> [B] bool`: rows that are done
    (a stop string written), checked after every token of greedy and sampled decoding.
    `audio`, `audio_valid`: the prompts' audio clips (a model with an audio tower)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: decoding needs at least 1 new token")
    if num_beams > 1:
        if do_sample:
            raise ValueError("beam search with sampling is not supported: use num_beams=1 or do_sample=False")
        return _beam_search(model, input_ids, attention_mask, images, media_valid, max_new_tokens=max_new_tokens,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id, num_beams=num_beams,
                            length_penalty=length_penalty, repetition_penalty=repetition_penalty,
                            synced_group=synced_group, audio=audio, audio_valid=audio_valid)
    state = _State(model, input_ids, attention_mask, images, media_valid, pad_token_id, 1, audio, audio_valid)
    logits = state.first()
    b = state.ids.shape[0]
    seen, out = state.ids, []
    done = torch.zeros(b, dtype=torch.bool, device=seen.device)
    for _ in range(max_new_tokens):
        shaped = shape_logits(logits, seen, image_token_id=model.media_ids,
                              repetition_penalty=repetition_penalty, temperature=temperature if do_sample else 1.0,
                              top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0)
        if do_sample:
            nxt = torch.multinomial(shaped.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            nxt = shaped.argmax(-1)
        nxt = nxt.masked_fill(done, pad_token_id)
        out.append(nxt)
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        if stop is not None:
            done |= stop(torch.stack(out, dim=1)).to(done.device)
        if (eos_token_id is not None or stop is not None or synced_group is not None) and all_done(done, synced_group):
            break
        logits = state.next(nxt)
    return torch.stack(out, dim=1)


def _beam_search(model, input_ids, attention_mask, images, media_valid, *, max_new_tokens, eos_token_id,
                 pad_token_id, num_beams, length_penalty, repetition_penalty, synced_group, audio=None,
                 audio_valid=None) -> torch.Tensor:
    """Keeps the `num_beams` best unfinished prefixes of each sample; one that emits EOS among the
    best is finished with its score (summed log-probabilities / length ** length_penalty). Stops
    when no unfinished prefix can beat a sample's `num_beams` best finished ones (`_settled`),
    or at max_new_tokens, where the live beams compete with the finished ones."""
    k = num_beams
    state = _State(model, input_ids, attention_mask, images, media_valid, pad_token_id, k, audio, audio_valid)
    b = state.ids.shape[0] // k
    dev = state.ids.device
    scores = torch.zeros(b, k, device=dev)
    scores[:, 1:] = float("-inf")  # the first step expands one beam per sample, not k copies of it
    tokens = torch.empty(b * k, 0, dtype=torch.long, device=dev)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    logits = state.first()
    for step in range(max_new_tokens):
        seen = torch.cat([state.ids, tokens], dim=1)
        logp = shape_logits(logits, seen, image_token_id=model.media_ids,
                            repetition_penalty=repetition_penalty).log_softmax(-1)
        v = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(b, k * v)
        top_scores, top_idx = cand.topk(min(2 * k, k * v), dim=1)
        rows, new_tokens, new_scores = [], [], []
        for s in range(b):
            taken = 0
            for rank, (score, idx) in enumerate(zip(top_scores[s].tolist(), top_idx[s].tolist())):
                beam, tok = divmod(idx, v)
                if score == float("-inf"):
                    break
                if eos_token_id is not None and tok == eos_token_id:
                    if rank < k:  # an EOS among the k best: a finished hypothesis
                        seq = tokens[s * k + beam].tolist() + [tok]
                        finished[s].append((score / len(seq) ** length_penalty, seq))
                    continue
                rows.append(s * k + beam)
                new_tokens.append(tok)
                new_scores.append(score)
                taken += 1
                if taken == k:
                    break
            while taken < k:  # fewer live candidates than beams: dead rows
                rows.append(s * k)
                new_tokens.append(pad_token_id)
                new_scores.append(float("-inf"))
                taken += 1
        rows_t = torch.tensor(rows, device=dev)
        nxt = torch.tensor(new_tokens, device=dev)
        scores = torch.tensor(new_scores, device=dev).reshape(b, k)
        tokens = torch.cat([tokens.index_select(0, rows_t), nxt[:, None]], dim=1)
        state.reorder(rows_t)
        n = step + 1
        done = torch.tensor([_settled(finished[s], scores[s], n, k, length_penalty, max_new_tokens)
                             for s in range(b)], device=dev)
        if all_done(done, synced_group) or n == max_new_tokens:
            break
        logits = state.next(nxt)
    for s in range(b):  # the live beams compete with the finished ones
        for j in range(k):
            if scores[s, j] > float("-inf"):
                seq = tokens[s * k + j].tolist()
                finished[s].append((float(scores[s, j]) / len(seq) ** length_penalty, seq))
    best = [max(f, key=lambda h: h[0])[1] for f in finished]
    width = max(len(seq) for seq in best)
    return torch.tensor([seq + [pad_token_id] * (width - len(seq)) for seq in best], device=dev)


def _settled(finished, live: torch.Tensor, n: int, k: int, length_penalty: float, max_new_tokens: int) -> bool:
    """No live beam of this sample can still beat its k best finished hypotheses: log-probability
    sums only fall, so the best a live beam can reach is its score now over the most favourable
    length it could end at."""
    if len(finished) < k:
        return False
    worst_kept = sorted(h[0] for h in finished)[-k]
    best_live = float(live.max())
    if best_live == float("-inf"):
        return True
    reach = max(best_live / n ** length_penalty, best_live / max_new_tokens ** length_penalty)
    return reach <= worst_kept
