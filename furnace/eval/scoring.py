"""What the evaluation asks of a model: text generated after a prompt with images, the
log-likelihood of candidate continuations (captions, class names) after one, and, for a model
trained with the contrastive objective, image and text embeddings.

Works on a FlamingoModel in this process (loaded whole: `furnace.model.flamingo_io`, or a
run's checkpoint through `furnace.export.load_run_model`). A prompt's images are encoded once
however many continuations are scored against it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from furnace.data.images import decode_image, normalize
from furnace.data.text import TextEncoder
from furnace.tokens import EOC_TOKEN, IMAGE_TOKEN, text_time


class UnreadableImage(ValueError):
    pass


class ModelScorer:
    def __init__(self, model, tokenizer, device, *, max_images: int = 64):
        self.model, self.device = model, torch.device(device)
        self.text = TextEncoder(tokenizer, max_length=0, max_images=max_images)
        self.pad_id = tokenizer.pad_token_id or 0
        self._prefix_len = len(self.text.prompt(""))  # the BOS the tokenizer puts before a prompt
        self.size = model.vision.image_size
        self.mean, self.std = model.vision.image_stats
        self._pixels: dict = {}
        self.dtype = next(model.parameters()).dtype

    # ---------------------------------------------------------------- inputs

    def pixels(self, image) -> torch.Tensor:
        """uint8 [H, W, 3] of an image file or encoded bytes; raises UnreadableImage."""
        key = image  # a path, or a shard member's bytes (hashed once, by Python)
        if key in self._pixels:
            return self._pixels[key]
        try:
            data = image.read_bytes() if isinstance(image, Path) else image
            px = torch.from_numpy(decode_image(data, self.size).copy())
        except Exception as e:  # PIL's many errors on damaged or foreign bytes; OSError on a file
            raise UnreadableImage(f"{image if isinstance(image, Path) else 'a shard image'}: {type(e).__name__}") from None
        if len(self._pixels) >= 512:  # each image is checked, then batched; demonstrations repeat: a bounded few
            self._pixels.pop(next(iter(self._pixels)))
        self._pixels[key] = px
        return px

    def images(self, rows: list[list]) -> torch.Tensor:
        """[B, T, 1, C, H, W] normalised, from each row's T images."""
        px = torch.stack([torch.stack([self.pixels(im) for im in row]) for row in rows])
        return normalize(px, self.mean, self.std)[:, :, None].to(self.device, self.dtype)

    def _ids(self, texts: list[str], prefix: bool = True):
        """Right-padded ids and mask of texts (each <image>/<|endofchunk|> as its token)."""
        rows = [self.text.prompt(t)[0 if prefix else self._prefix_len:] for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompts: list[str], images: list[list], *, max_new_tokens: int, **decoding) -> list[str]:
        """The text each prompt continues with (cut at <|endofchunk|>)."""
        ids, mask = self._ids(prompts)
        pix = self.images(images)
        valid = torch.ones(pix.shape[:2], dtype=torch.bool, device=self.device)
        out = self.model.generate(ids.to(self.device), mask.to(self.device), pix, valid, max_new_tokens=max_new_tokens,
                                  eos_token_id=self.model.eoc_token_id, pad_token_id=self.pad_id, **decoding)
        return [self.text.decode(row) for row in out.cpu()]

    # ---------------------------------------------------------------- contrastive embeddings

    @property
    def has_embeddings(self) -> bool:
        return getattr(self.model, "contrastive", None) is not None

    @torch.no_grad()
    def embed_images(self, images: list) -> torch.Tensor:
        """[N, dim] of single images, in the model's contrastive space."""
        pix = self.images([[im] for im in images])
        valid = torch.ones(pix.shape[:2], dtype=torch.bool, device=self.device)
        return self.model.image_embeddings(pix, valid).float().cpu()

    @torch.no_grad()
    def embed_texts(self, captions: list[str], *, batch_size: int = 64) -> torch.Tensor:
        """[N, dim] of captions written as training writes them (<image>caption<|endofchunk|> EOS)."""
        out = []
        for start in range(0, len(captions), batch_size):
            rows = [self.text.prompt(f"{IMAGE_TOKEN}{c}{EOC_TOKEN}") + [self.text.eos_id]
                    for c in captions[start: start + batch_size]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
            out.append(self.model.text_embeddings(ids.to(self.device), mask.to(self.device)).float().cpu())
        return torch.cat(out)

    # ---------------------------------------------------------------- likelihood

    @torch.no_grad()
    def loglik(self, prompt: str, images: list, continuations: list[str], *, batch_size: int = 16,
               reduce: str = "mean") -> torch.Tensor:
        """[K] log p(continuation | prompt, images) of each continuation: summed over its tokens
        (`reduce="sum"`) or their mean (`"mean"`, the default: no bias toward short candidates)."""
        model = self.model
        p_ids, _ = self._ids([prompt])
        p_len = p_ids.shape[1]
        pix = self.images([images])
        valid = torch.ones(pix.shape[:2], dtype=torch.bool, device=self.device)
        latents, seg, _ = model.media(p_ids.to(self.device), pix, valid)
        out = []
        for start in range(0, len(continuations), batch_size):
            chunk = continuations[start: start + batch_size]
            c_ids, c_mask = self._ids(chunk, prefix=False)
            k = len(chunk)
            ids = torch.cat([p_ids.expand(k, -1), c_ids], dim=1).to(self.device)
            logits = model.decoder(ids, latents.expand(k, -1, -1), seg.expand(k, -1),
                                   text_time(ids, model.image_token_id, reset_id=model.media_reset_id))
            if model.gather_logits is not None:  # tensor parallel: this rank holds a slice of the vocabulary
                logits = model.gather_logits(logits)
            # the logits before each continuation token predict it
            logp = logits[:, p_len - 1: -1].float().log_softmax(-1)
            tok = logp.gather(-1, c_ids.to(self.device)[..., None]).squeeze(-1)
            m = c_mask.to(self.device, tok.dtype)
            total = (tok * m).sum(1)
            out.append(total / m.sum(1).clamp(min=1) if reduce == "mean" else total)
        return torch.cat(out).cpu()
