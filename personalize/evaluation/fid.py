"""Image-quality metrics of the zero-shot MS-COCO benchmark (BK-SDM, Kim et al. 2023, Sec. 4), as
pure functions of features; no model is loaded here (see `inception.py`).

- FID (Heusel et al. 2017): the Fréchet distance between two Gaussians fitted to Inception pool
  features, ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``. The trace of the matrix square
  root is the sum of the square roots of the eigenvalues of ``S1 S2`` (as torchmetrics computes
  it), which needs no scipy and stays finite for the rank-deficient covariances of small sets.
  Statistics are the mean and the unbiased covariance (``np.cov(rowvar=False)``), in float64,
  and read/written as pytorch-fid's ``.npz`` (keys ``mu``, ``sigma``).
- IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over Inception class logits, in
  `splits` equal chunks (10 in torch-fidelity, which BK-SDM uses); mean and (unbiased) standard
  deviation over the chunks. Identical predictions give exactly 1.
- CLIP score as BK-SDM's ``eval_clip_score.py``: the mean cosine similarity between each image's
  CLIP embedding and its prompt's (0.2677 for BK-SDM-Small). torchmetrics' CLIPScore reports
  ``100 * max(cos, 0)``; the two agree up to that scale wherever the cosine is positive.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import write_atomic

STATS_KEYS = ("mu", "sigma")  # pytorch-fid's --save-stats layout


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def feature_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], unbiased covariance [d, d]) of `features` [n, d], float64; n >= 2."""
    f = _f64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"FID statistics need at least 2 feature rows [n, d], got shape {tuple(f.shape)}")
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2, sigma1, sigma2 = map(_f64, (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"FID statistics do not match: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} / {tuple(sigma2.shape)} (another feature extractor?)")
    diff = mu1 - mu2
    # eigenvalues of a product of two PSD matrices are real and >= 0 up to rounding; tiny
    # negative ones (rank-deficient sets) become imaginary under sqrt and drop out with .real
    tr_covmean = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float(diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def fid_from_features(a, b) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def save_stats(path: Path, mu: torch.Tensor, sigma: torch.Tensor) -> Path:
    """pytorch-fid's stats file (``np.savez_compressed(mu=, sigma=)``), written atomically."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, mu=_f64(mu).numpy(), sigma=_f64(sigma).numpy())
    return write_atomic(Path(path), buf.getvalue())


def load_stats(path: Path, flag: str = "--real-stats") -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) from a pytorch-fid ``.npz``; a missing, malformed or non-finite file is one
    UserError naming `flag` and the file."""
    import zipfile

    import numpy as np

    p = Path(path).expanduser()
    if p.exists() and not p.is_file():
        raise UserError(f"{flag} {path}: not a file (pytorch-fid's mu/sigma .npz)")
    if not p.is_file():
        raise UserError(f"{flag} {path}: no such file (pytorch-fid writes one with "
                        f"`python -m pytorch_fid --save-stats REAL_DIR FILE.npz`; or pass --real-images DIR)")
    try:
        # allow_pickle=False: an .npz of object arrays would unpickle
        with np.load(p, allow_pickle=False) as z:
            if not hasattr(z, "files"):  # a bare .npy array, not an archive of named ones
                raise ValueError("a single array, not an npz archive")
            missing = [k for k in STATS_KEYS if k not in z.files]
            if missing:
                raise UserError(f"{flag} {path}: no '{missing[0]}' array (expected pytorch-fid's mu/sigma npz)")
            mu, sigma = torch.from_numpy(z["mu"]).double(), torch.from_numpy(z["sigma"]).double()
    except (ValueError, TypeError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{flag} {path}: not a readable npz ({type(e).__name__})") from None
    if mu.ndim != 1 or mu.numel() == 0 or sigma.shape != (mu.numel(), mu.numel()):
        raise UserError(f"{flag} {path}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not fit "
                        f"(expected mu [d] and sigma [d, d])")
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        raise UserError(f"{flag} {path}: mu or sigma holds NaN or infinite values")
    return mu, sigma


def inception_score(logits, splits: int = 10, generator: torch.Generator | None = None) -> tuple[float, float]:
    """(mean, std) of the Inception Score of class `logits` [n, classes] over `splits` chunks
    (``torch.chunk``, as torchmetrics). With a `generator` the rows are first permuted by
    ``torch.randperm(n, generator=...)`` (torchmetrics permutes with the global RNG); without,
    the order is kept, so the score of a given image set is reproducible."""
    x = _f64(logits)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"IS needs class logits [n, classes], got shape {tuple(x.shape)}")
    if splits < 1 or splits > x.shape[0]:
        raise ValueError(f"IS splits {splits}: must be in 1..{x.shape[0]} (the number of images)")
    if generator is not None:
        x = x[torch.randperm(x.shape[0], generator=generator)]
    scores = []
    for chunk in x.chunk(splits, dim=0):
        p, log_p = chunk.softmax(dim=1), chunk.log_softmax(dim=1)
        log_marginal = p.mean(dim=0, keepdim=True).log()
        scores.append((p * (log_p - log_marginal)).sum(dim=1).mean().exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std()) if len(scores) > 1 else 0.0


def clip_scores(image_emb, text_emb) -> torch.Tensor:
    """[n] cosine similarity of image i's and prompt i's CLIP embeddings (float64)."""
    a, b = _f64(image_emb), _f64(text_emb)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"CLIP score needs matching [n, d] image and text embeddings, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a * b).sum(dim=1)


def clip_score(image_emb, text_emb) -> float:
    """BK-SDM's CLIP score: the mean of `clip_scores`."""
    s = clip_scores(image_emb, text_emb)
    v = float(s.mean())
    return v if math.isfinite(v) else math.nan
