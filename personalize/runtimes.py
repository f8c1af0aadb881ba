"""Generation with an exported ONNX or OpenVINO folder on CPU.

The diffusers `StableDiffusionPipeline` runs unchanged (prompt encoding, classifier-free guidance,
the scheduler loop, latents from the same per-image generators, post-processing); only its text
encoder, U-Net and VAE decoder are stand-ins that call the exported models. So an exported folder
gives the torch pipeline's images for the same prompt, seed, scheduler and steps, up to the
runtimes' float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .defaults import INFERENCE_PRECISIONS
from .errors import UserError
from .extras import require_extra

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
EXPORT_JSON = "export.json"  # what every export folder records about itself (export/, deploy/common.py)


def read_export(path: Path) -> dict | None:
    """export.json of an export folder, or None when `path` is not one (no file, not JSON, no format)."""
    try:
        rec = json.loads((Path(path) / EXPORT_JSON).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "format" in rec else None


def check_inference_precision(runtime: str | None, precision: str | None, what: str) -> str | None:
    """`precision` for a source of `runtime` (None: not an export), or a one-line UserError."""
    if precision is None:
        return None
    if precision not in INFERENCE_PRECISIONS:
        raise UserError(f"--inference-precision {precision}: choose from {', '.join(INFERENCE_PRECISIONS)}")
    if runtime != "openvino":
        raise UserError(f"--inference-precision: only for OpenVINO exports; {what} is "
                        f"{'an ' + runtime + ' export' if runtime else 'a torch run/base'} (it computes in fp32)")
    if precision == "bf16":
        from .precision import cpu_bf16_is_native

        if not cpu_bf16_is_native():
            raise UserError("--inference-precision bf16: this CPU has no native bf16 (AVX512-BF16/AMX); "
                            "emulated bf16 is slower than fp32 here, use fp32")
    return precision


class _Session:
    """One exported model: named numpy inputs -> list of numpy outputs."""

    def __init__(self, runtime: str, folder: Path, precision: str = "fp32"):
        if runtime == "onnx":
            import onnxruntime as ort

            self._s = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
            self.run = lambda feeds: self._s.run(None, feeds)
        else:
            import openvino as ov

            # the CPU plugin computes in bf16 by default where the CPU has it; f32 matches torch
            self._m = ov.Core().compile_model(str(folder / "openvino_model.xml"), "CPU",
                                              {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS.get(precision, precision)})
            self.run = lambda feeds: list(self._m(feeds).values())


class _Stub(torch.nn.Module):
    """What diffusers' pipeline reads from a model besides calling it: config, dtype, device."""

    def __init__(self, config: dict, session: _Session):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(config)
        self.session = session
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class TextEncoderStub(_Stub):
    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, **_):
        if output_hidden_states:
            raise UserError("clip skip is not supported by exported text encoders")
        outs = self.session.run({"input_ids": input_ids.cpu().numpy().astype(np.int64)})
        return tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in outs)


class UNetStub(_Stub):
    def forward(self, sample, timestep, encoder_hidden_states, *_, return_dict=False, **__):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        out = self.session.run({"sample": sample.float().numpy(), "timestep": t.contiguous().numpy(),
                                "encoder_hidden_states": encoder_hidden_states.float().numpy()})[0]
        return (torch.from_numpy(np.ascontiguousarray(out)),)


class VAEDecoderStub(_Stub):
    def decode(self, z, return_dict=False, generator=None):
        out = self.session.run({"latent_sample": z.float().numpy()})[0]
        return (torch.from_numpy(np.ascontiguousarray(out)),)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def runtime_components(export_dir: Path, runtime: str, precision: str = "fp32") -> dict:
    """The components of a diffusers pipeline whose three models run on `runtime` (CPU), ready for
    pipeline.build_pipeline. `precision`: OpenVINO's inference precision (fp32, or bf16 on CPUs
    with native bf16)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    export_dir = Path(export_dir)
    require_extra(runtime, f"{export_dir} (an {runtime} export)")
    comps = {"tokenizer": CLIPTokenizer.from_pretrained(str(export_dir / "tokenizer")),
             "noise_scheduler": DDPMScheduler.from_pretrained(str(export_dir / "scheduler"))}
    for name, cls in (("text_encoder", TextEncoderStub), ("unet", UNetStub), ("vae_decoder", VAEDecoderStub)):
        folder = export_dir / name
        comps["vae" if name == "vae_decoder" else name] = cls(_config(folder), _Session(runtime, folder, precision))
    return comps
