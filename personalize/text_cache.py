"""The text side of a DreamBooth step: token ids of every distinct caption and the class prompt,
and, with a frozen text encoder, their embeddings, computed once. Caption variants of a step
(`--caption-dropout`, `--shuffle-caption`: personalize/captions.py) are tokenized, and with a frozen
encoder embedded, on first use, one caption per forward, and kept (up to `MAX_VARIANTS`): what
varies is computed, what does not is cached. A caption's embedding is the same whether it comes
from the cache or is recomputed (always the same forward), so a resumed run, whose cache starts
empty, computes exactly what the uninterrupted one did."""

from __future__ import annotations

import torch

MAX_VARIANTS = 256  # kept variant embeddings (77 x 768 floats each at SD's size); the rest are recomputed


def tokenize(tokenizer, prompt: str, device) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


class TextCache:
    """`rows`: the distinct instance captions (a photo's own, else the instance prompt); `ids` /
    `emb` their token ids / frozen embeddings (None when the text encoder trains), one row each."""

    def __init__(self, tokenizer, text_encoder, captions: list[str], class_prompt: str, device, frozen: bool,
                 extra: tuple[str, ...] = ()):
        self.tokenizer, self.text_encoder, self.device, self.frozen = tokenizer, text_encoder, device, frozen
        self.rows = list(dict.fromkeys(captions))
        self.row_of = {c: i for i, c in enumerate(self.rows)}
        self.ids = torch.cat([tokenize(tokenizer, c, device) for c in self.rows])
        self.class_ids = tokenize(tokenizer, class_prompt, device)
        with torch.no_grad():
            self.emb = text_encoder(self.ids)[0] if frozen else None
            self.class_emb = text_encoder(self.class_ids)[0] if frozen else None
        self._ids: dict[str, torch.Tensor] = {}
        self._emb: dict[str, torch.Tensor] = {}
        for c in extra:  # known variants (the empty prompt of --caption-dropout): computed up front
            self.embeddings([c]) if frozen else self.token_ids([c])

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """(B, 77) token ids of any captions."""
        out = []
        for c in captions:
            if c in self.row_of:
                out.append(self.ids[self.row_of[c]][None])
            else:
                if c not in self._ids:
                    self._ids[c] = tokenize(self.tokenizer, c, self.device)
                out.append(self._ids[c])
        return torch.cat(out)

    @torch.no_grad()
    def embeddings(self, captions: list[str]) -> torch.Tensor:
        """(B, 77, D) frozen-encoder embeddings of any captions."""
        out = []
        for c in captions:
            if c in self.row_of:
                out.append(self.emb[self.row_of[c]][None])
                continue
            e = self._emb.get(c)
            if e is None:
                e = self.text_encoder(self.token_ids([c]))[0]
                if len(self._emb) < MAX_VARIANTS:
                    self._emb[c] = e
            out.append(e)
        return torch.cat(out)
