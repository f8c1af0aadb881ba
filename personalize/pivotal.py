"""Pivotal tuning (`--pivotal`): new tokens trained as textual inversion beside the adapter, as
diffusers' advanced DreamBooth LoRA script (`--train_text_encoder_ti`, after replicate's cog-sdxl).

`--num-new-tokens` tokens `<s0><s1>...` are added to the tokenizer and the text encoder's embedding
table, each initialized from the class noun's embedding (its token embeddings spread over the new
tokens, as AUTOMATIC1111's `create_embedding` does with its initialization text), and replace the
identifier token in every prompt of the run (`TrainConfig.prompt_token`). Their rows train with
their own LR (`--ti-lr`, a parameter group of the one optimizer) for the first `--ti-steps` of the
run, then freeze; the adapter trains on.

Where the advanced script makes the whole embedding table trainable and copies the old rows back
after every step (`retract_embeddings`), the new rows here are a parameter of their own
(`NewTokenEmbedding`): the other rows never receive a gradient, so they cannot change, and the
optimizer keeps state for n x D numbers, not the table's 49408 x D. After `--ti-steps` the rows
get no gradient at all (detached), so AdamW skips them: no momentum, no weight decay, not a bit of
change. The rows are in every checkpoint with their optimizer state, so `--resume` stays exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig
from .embeddings import add_tokens, new_tokens, save_embeddings
from .errors import UserError


class NewTokenEmbedding(nn.Module):
    """A text encoder's token embedding whose last rows (the new tokens, ids `first_id`...) are the
    trainable `rows`; every other id reads the frozen table `base`, whose copies of the new rows are
    never used."""

    def __init__(self, base: nn.Embedding, first_id: int, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.rows = nn.Parameter(init.detach().float().clone())
        self.trains = True  # False after --ti-steps: the rows are read detached, AdamW skips them

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        is_new = (input_ids >= self.first_id)[..., None]
        rows = self.rows if self.trains else self.rows.detach()
        picked = rows.to(out.dtype)[(input_ids - self.first_id).clamp(min=0)]
        return torch.where(is_new, picked, out)


@dataclass
class Pivotal:
    tokens: list[str]
    identifier: str  # the --token the new tokens replace (names the A1111 file)
    first_id: int
    init: torch.Tensor
    last_step: int  # the new rows train in steps 1..last_step
    lr: float  # --ti-lr
    module: NewTokenEmbedding | None = None


def _embeddings(text_encoder):
    """The module holding `token_embedding` (CLIPTextEmbeddings; its path moved in transformers 5)."""
    return next(m for m in text_encoder.modules() if hasattr(m, "token_embedding") and hasattr(m, "position_embedding"))


def init_vectors(tokenizer, text_encoder, class_noun: str, n: int) -> torch.Tensor:
    """(n, D): new token i starts as the class noun's token i * k // n (k tokens), as A1111's
    create_embedding spreads its initialization text over the vectors."""
    ids = tokenizer(class_noun, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"--pivotal: the class noun '{class_noun}' has no tokens to initialize the new ones from")
    table = text_encoder.get_input_embeddings().weight.detach().float()
    return torch.stack([table[ids[i * len(ids) // n]] for i in range(n)]).cpu()


def add_new_tokens(cfg: TrainConfig, comps: dict, class_noun: str) -> Pivotal | None:
    """The new tokens in `comps`' tokenizer (a copy: a batch's shared base keeps its own) and
    text encoder, at their initial values, before any prompt is tokenized. None without --pivotal."""
    if not cfg.pivotal:
        return None
    comps["tokenizer"] = copy.deepcopy(comps["tokenizer"])
    tokens = new_tokens(cfg.num_new_tokens)
    init = init_vectors(comps["tokenizer"], comps["text_encoder"], class_noun, len(tokens))
    ids = add_tokens(comps["tokenizer"], comps["text_encoder"], tokens, init)
    if ids != list(range(ids[0], ids[0] + len(ids))) or ids[-1] != len(comps["tokenizer"]) - 1:
        raise UserError(f"--pivotal: the tokenizer gave the new tokens ids {ids}, not the last rows of its table")
    return Pivotal(tokens, cfg.token, ids[0], init, cfg.ti_last_step(), cfg.ti_lr)


def make_trainable(ti: Pivotal | None, text_encoder, models: dict) -> dict[str, float]:
    """Swap the text encoder's token embedding for a `NewTokenEmbedding` (after the adapter is
    attached: peft freezes every parameter but its own) and hand it to fit. Returns fit's
    per-parameter LRs: {the rows' name: --ti-lr}."""
    if ti is None:
        return {}
    emb = _embeddings(text_encoder)
    ti.module = NewTokenEmbedding(emb.token_embedding, ti.first_id, ti.init).to(emb.token_embedding.weight.device)
    emb.token_embedding = ti.module
    models.setdefault("text_encoder", text_encoder)
    name = next(f"text_encoder.{n}" for n, p in text_encoder.named_parameters() if p is ti.module.rows)
    return {name: ti.lr}


def stop_after(ti: Pivotal | None, loss_fn):
    """The loss with the new rows training only in steps 1..ti.last_step (--ti-steps)."""
    if ti is None:
        return loss_fn

    def fn(ms, step, micro, g):
        ti.module.trains = step <= ti.last_step
        return loss_fn(ms, step, micro, g)

    return fn


def trained_rows(text_encoder) -> torch.Tensor | None:
    """The new tokens' current vectors (n, D), or None when the text encoder has none training."""
    emb = _embeddings(text_encoder).token_embedding
    return emb.rows.detach() if isinstance(emb, NewTokenEmbedding) else None


def save(dest: Path, text_encoder, identifier: str) -> list[str]:
    """The new tokens' embeddings into `dest` (both formats, embeddings.py); [] when not pivotal."""
    rows = trained_rows(text_encoder)
    return [] if rows is None else save_embeddings(dest, identifier, rows)


def restore_vocab(text_encoder, rows: int) -> None:
    """Undo the new tokens on a text encoder that is used again (a batch's shared base): the plain
    embedding back, its table cut to the base's `rows`."""
    emb = _embeddings(text_encoder)
    if isinstance(emb.token_embedding, NewTokenEmbedding):
        emb.token_embedding = emb.token_embedding.base
    if emb.token_embedding.weight.shape[0] != rows:
        text_encoder.resize_token_embeddings(rows, mean_resizing=False)
