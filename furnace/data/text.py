"""Token layout of samples.

Caption pair:   [bos] <image> caption <|endofchunk|> eos      (bos only if the tokenizer has one)
Interleaved:    [bos] text <image> chunk <|endofchunk|> <image> chunk <|endofchunk|> ... eos
                each image's following text chunk ends with <|endofchunk|>.
An audio clip takes <audio> where an image takes <image> (a tokenizer with <audio>: runs with an
audio tower); both are media tokens, counted alike (`furnace.tokens.is_media`).
Literal "<image>" / "<|endofchunk|>" strings in sample text are removed before tokenising (in a
generation prompt they are the control tokens); any
other special token written in the text ("</s>", "<pad>") is encoded as text, never as a
control id.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer

from furnace.data.tokenizer import special_ids
from furnace.tokens import AUDIO_TOKEN, EOC_TOKEN, IMAGE_TOKEN


class SkipSample(Exception):
    """The sample is dropped; `reason` is the counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TextEncoder:
    def __init__(self, tokenizer, max_length: int, max_images: int):
        ids = special_ids(tokenizer)
        self.image_id, self.eoc_id, self.audio_id = ids["image"], ids["eoc"], ids["audio"]
        # what build_labels and text_time take: the <image> id alone unless <audio> exists
        self.media_ids = self.image_id if self.audio_id is None else (self.image_id, self.audio_id)
        self._literals = (IMAGE_TOKEN, EOC_TOKEN) + (() if self.audio_id is None else (AUDIO_TOKEN,))
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.max_length, self.max_images = max_length, max_images
        self.tokenizer = tokenizer
        # A private copy that splits special-token strings like any text (the shared tokenizer
        # keeps its own setting).
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.encode_special_tokens = True
        self._prefix = [self.bos_id] if self.bos_id is not None else []

    def encode(self, text: str) -> list[int]:
        for literal in self._literals:
            text = text.replace(literal, " ")
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def media_token(self, audio: bool) -> int:
        """<audio> for an audio clip, <image> for any other medium."""
        if not audio:
            return self.image_id
        if self.audio_id is None:
            raise SkipSample("audio_not_enabled")  # a run without an audio tower
        return self.audio_id

    def caption(self, caption: str, audio: bool = False) -> list[int]:
        ids = self._prefix + [self.media_token(audio)] + self.encode(caption) + [self.eoc_id, self.eos_id]
        if len(ids) > self.max_length:
            raise SkipSample("too_long")
        return ids

    def document(self, segments: list[dict]) -> tuple[list[int], list]:
        """segments: [{"text": str} | {"image": ref} | {"audio": ref}] -> (ids, the media refs kept,
        in order); a ref is whatever names the medium to the caller (a tar member name, an MMC4 index).

        At most `max_images` images (the document is cut before the next one); truncated to
        `max_length`, dropping images whose <image> token was cut (and a trailing <image>).
        """
        ids = list(self._prefix)
        images: list = []
        open_chunk = False
        for seg in segments:
            if "image" in seg or "audio" in seg:
                if len(images) >= self.max_images:
                    break
                if open_chunk:
                    ids.append(self.eoc_id)
                audio = "image" not in seg
                ids.append(self.media_token(audio))
                images.append(seg["audio" if audio else "image"])
                open_chunk = True
            elif isinstance(seg.get("text"), str):
                ids.extend(self.encode(seg["text"]))
            if len(ids) > self.max_length + 1:
                break
        if open_chunk:
            ids.append(self.eoc_id)
        ids.append(self.eos_id)
        media = {self.image_id, self.audio_id}
        if len(ids) > self.max_length:
            ids = ids[: self.max_length]
            while ids and ids[-1] in media:
                ids.pop()
            images = images[: sum(1 for t in ids if t in media)]
        if not images:
            raise SkipSample("too_long" if any(t in media for t in ids) or len(ids) >= self.max_length
                             else "no_images")
        return ids, images

    def filler(self) -> list[int]:
        return self._prefix + [self.eos_id]

    # -- generation helpers for caption evaluation
    def caption_prompt(self) -> list[int]:
        """Prompt for captioning one image: [bos] <image>."""
        return self._prefix + [self.image_id]

    def prompt(self, text: str) -> list[int]:
        """[bos] + `text` with each literal <image> and <|endofchunk|> as its control token (the
        text between as text): a few-shot prompt is written as it is trained, e.g.
        "<image>a red circle<|endofchunk|><image>"."""
        ids = list(self._prefix)
        for i, part in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.append(self.image_id)
            for j, chunk in enumerate(part.split(EOC_TOKEN)):
                if j:
                    ids.append(self.eoc_id)
                for k, piece in enumerate(chunk.split(AUDIO_TOKEN) if self.audio_id is not None else [chunk]):
                    if k:
                        ids.append(self.audio_id)
                    ids += self.encode(piece)
        return ids

    def reference_caption(self, ids) -> str | None:
        """The caption text of an encoded caption pair (tokens after the first media token up to
        <|endofchunk|>); None for rows without one (filler rows)."""
        ids = [int(t) for t in ids]
        first = next((i for i, t in enumerate(ids) if t in (self.image_id, self.audio_id)), None)
        if first is None:
            return None
        start = first + 1
        end = ids.index(self.eoc_id, start) if self.eoc_id in ids[start:] else len(ids)
        return self.decode(ids[start:end])

    def stop_check(self, strings):
        """`stop` for decoding: [B, t] new tokens -> [B] bool, each row done once its text holds
        one of `strings`."""
        def stopped(new):
            return torch.tensor([any(x in self.decode(row) for x in strings) for row in new.cpu()])
        return stopped

    @staticmethod
    def cut_at(text: str, strings) -> str:
        """`text` up to the first of `strings` in it."""
        return min((text[: text.index(x)] for x in strings if x in text), key=len, default=text).strip()

    def decode(self, ids) -> str:
        """Generated ids -> text, cut at the first <|endofchunk|> / eos / pad."""
        out = []
        for t in (int(x) for x in ids):
            if t in (self.eoc_id, self.eos_id, self.pad_id):
                break
            if t in (self.image_id, self.audio_id, self.bos_id):
                continue
            out.append(t)
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()
