"""Subject-fidelity and prompt-fidelity metrics of the DreamBooth paper (Ruiz et al. 2023, §4.1),
as pure functions of embedding tensors. No model is loaded here (see `evaluators.py`).

- DINO / CLIP-I: mean pairwise cosine similarity between the embeddings of generated images and
  of the subject's real images (DINO ViT-S/16 CLS token, resp. CLIP image embedding).
- CLIP-T: mean cosine similarity between each generated image's CLIP image embedding and the CLIP
  text embedding of the prompt it was generated from (with the identifier token removed, see
  `strip_identifier`).
- Real-images reference: DINO / CLIP-I between every real image and the subject's *other* real
  images (self pairs excluded), the paper's upper bound (0.774 / 0.885 with its models).

All similarities are computed in float64 so that an image scored against itself gives 1.0 to
within 1e-12 whatever dtype the evaluator ran in, and means do not depend on summation order
beyond rounding.
"""

from __future__ import annotations

import math
import re

import torch


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of `x` ([n, d]) scaled to unit L2 norm, in float64. A zero row stays zero (its cosine
    with anything is then 0) instead of becoming NaN."""
    x = x.detach().to(torch.float64)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n_a, n_b] cosine similarities between the rows of `a` and the rows of `b`."""
    _check_pair(a, b)
    return l2_normalize(a) @ l2_normalize(b).T


def mean_cosine_to_set(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n_a]: for each row of `a` (a generated image), its mean cosine similarity to all rows of
    `b` (the real images). The per-image DINO / CLIP-I score of DreamBooth §4.1."""
    return cosine_matrix(a, b).mean(dim=1)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all (row of a, row of b) pairs: DreamBooth's DINO / CLIP-I
    between a set of generated and a set of real images. Invariant to the order of either set."""
    return float(cosine_matrix(a, b).mean())


def real_vs_real(x: torch.Tensor) -> torch.Tensor:
    """[n]: for each real image, its mean cosine similarity to the subject's *other* real images.
    Self pairs (always 1.0) are excluded, else the reference would be inflated by 1/n. With a
    single image there is no other image to compare with, so the score is NaN (undefined), not 1."""
    if x.ndim != 2:
        raise ValueError(f"expected a [n, d] embedding matrix, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < 2:
        return torch.full((n,), math.nan, dtype=torch.float64)
    sim = cosine_matrix(x, x)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    return (sim * off_diagonal).sum(dim=1) / (n - 1)


def mean_real_vs_real(x: torch.Tensor) -> float:
    """Mean over all ordered pairs (i, j), i != j, of real images: the "Real images" reference row
    of DreamBooth Table 1. NaN with fewer than two images."""
    scores = real_vs_real(x)
    return float(scores.mean()) if scores.numel() and not torch.isnan(scores).any() else math.nan


def clip_t(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """[n]: cosine similarity between row i of the image embeddings and row i of the text
    embeddings (the prompt each image was generated from): per-image CLIP-T."""
    _check_pair(image_emb, text_emb)
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} images but {text_emb.shape[0]} prompt embeddings")
    return (l2_normalize(image_emb) * l2_normalize(text_emb)).sum(dim=1)


def strip_identifier(prompt: str, token: str) -> str:
    """The prompt CLIP-T is scored against: `prompt` with the identifier `token` removed.

    CLIP-T is computed on "a dog in the snow", not "a sks dog in the snow": the rare identifier
    was chosen precisely because it means nothing to CLIP's text encoder (the paper picks tokens
    with weak priors), so keeping it only adds noise to the text embedding, and the noise differs
    between identifiers, which would make runs with different tokens incomparable. The class noun
    stays, so the score measures "is this a dog in the snow". Only whole-word occurrences are
    removed ("sks" in "sksx" is kept) and whitespace is collapsed. An empty token changes nothing.
    """
    token = token.strip()
    if not token:
        return prompt
    # word-boundary lookarounds instead of \b so tokens like "<new1>" (non-word edges) also match
    stripped = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt)
    stripped = re.sub(r"\s+([,.;:!?])", r"\1", stripped)  # "a sks, dog" -> "a , dog" -> "a, dog"
    return " ".join(stripped.split())


def nanmean(values: list[float]) -> float:
    """Mean of the finite values (NaN if none): subject means over prompts, report means over
    subjects, where an undefined entry (a 1-image real reference) must not poison the rest."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"expected [n, d] embedding matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]} (different evaluators?)")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError("cannot score an empty set of embeddings")
