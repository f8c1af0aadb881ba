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

from .defaults import EXPORT_FORMATS, INFERENCE_PRECISIONS
from .errors import UserError, one_line
from .extras import require_extra
from .pipeline import loading

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
EXPORT_JSON = "export.json"  # what every export folder records about itself (export/, deploy/common.py)


def read_export(path: Path) -> dict | None:
    """export.json of an export folder, or None when `path` has none; a one-line UserError naming the
    file when it is there but is not a JSON object with one of our formats (what the other fields
    must be: sources.check_export_record)."""
    f = Path(path) / EXPORT_JSON
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError; the OS refusing is the boundary's
        raise UserError(f"{f}: damaged ({one_line(e)}); export it again") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("format"), str):
        raise UserError(f"{f}: no format field; not a personalize export.json")
    if rec["format"] not in EXPORT_FORMATS:
        raise UserError(f"{f}: unknown format '{rec['format'][:40]}' (this personalize writes {', '.join(EXPORT_FORMATS)})")
    return rec


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


MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("openvino_model.xml", "openvino_model.bin")}
# the inputs each stub feeds (export/deploy/trace.py's ONNX_NAMES: what every exporter writes)
INPUTS = {"text_encoder": ("input_ids",), "unet": ("sample", "timestep", "encoder_hidden_states"),
          "vae_decoder": ("latent_sample",)}


def _why(e: BaseException) -> str:
    """errors.one_line, but for OpenVINO, whose messages start with the source locations they
    passed through: its reason is the last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1][:200]}" if lines and lines[0].startswith("Exception from ") else one_line(e)


class _Session:
    """One exported model: named numpy inputs -> list of numpy outputs. A model file that is
    missing, damaged or another model's is a one-line UserError naming it."""

    def __init__(self, runtime: str, folder: Path, precision: str = "fp32"):
        files = [folder / n for n in MODEL_FILES[runtime]]
        for f in files:
            if not f.is_file():
                raise UserError(f"{f}: missing; not a complete {runtime} export, export it again")
        try:
            names = self._open(runtime, files[0], precision)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - each runtime's own error types for a file that does not parse
            # OpenVINO says which of its two files it choked on only for a bin of the wrong size
            what = (files[-1] if "bin file" in str(e) else files[0] if len(files) == 1 or "pars" in str(e)
                    else f"{files[0]} or its {files[1].name}")
            raise UserError(f"{what}: damaged or not a {folder.name} model ({_why(e)}); export it again") from None
        want = INPUTS.get(folder.name)
        if want is not None and (len(names) != len(want) or not all(any(w in n for n in names) for w in want)):
            shown = ", ".join(sorted(next((x for x in sorted(n) if not x.isdigit()), min(n)) for n in names if n))
            raise UserError(f"{files[0]}: takes inputs ({shown}), not a {folder.name}'s ({', '.join(want)}); "
                            f"export it again")

    def _open(self, runtime: str, path: Path, precision: str) -> list[set[str]]:
        """Opens the model; returns the names of each of its inputs."""
        if runtime == "onnx":
            import onnxruntime as ort

            self._s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.run = lambda feeds: self._s.run(None, feeds)
            return [{i.name} for i in self._s.get_inputs()]
        import openvino as ov

        with open(path, "rb") as f:  # anything else goes to OpenVINO's other frontends (TF's logs to stderr)
            if b"<net" not in f.read(4096):
                raise UserError(f"{path}: damaged or not an OpenVINO IR (no <net> element); export it again")
        # the CPU plugin computes in bf16 by default where the CPU has it; f32 matches torch
        self._m = ov.Core().compile_model(str(path), "CPU",
                                          {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS.get(precision, precision)})
        self.run = lambda feeds: list(self._m(feeds).values())
        return [set(i.get_names()) for i in self._m.inputs]


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


# what diffusers' pipeline reads of each model's config (a missing key is an AttributeError deep inside it)
CONFIG_KEYS = {"unet": {"in_channels": (int, "an integer"), "sample_size": ((int, list), "an integer or a list")},
               "vae_decoder": {"block_out_channels": (list, "a list"), "scaling_factor": ((int, float), "a number")}}


def _config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.is_file():
        raise UserError(f"{f}: missing; not a complete export, export it again")
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise UserError(f"{f}: damaged ({one_line(e)}); export it again") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{f}: not a model config (a JSON {type(cfg).__name__}, not an object); export it again")
    for key, (kind, what) in CONFIG_KEYS.get(folder.name, {}).items():
        if not isinstance(cfg.get(key), kind) or isinstance(cfg.get(key), bool):
            shown = json.dumps(cfg[key])[:40] if key in cfg else "missing"
            raise UserError(f"{f}: field {key} is {shown}, not {what}; export it again")
    if folder.name == "unet":
        cfg.setdefault("time_cond_proj_dim", None)  # older diffusers configs lack it
    return cfg


def runtime_components(export_dir: Path, runtime: str, precision: str = "fp32") -> dict:
    """The components of a diffusers pipeline whose three models run on `runtime` (CPU), ready for
    pipeline.build_pipeline. `precision`: OpenVINO's inference precision (fp32, or bf16 on CPUs
    with native bf16)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    export_dir = Path(export_dir)
    require_extra(runtime, f"{export_dir} (an {runtime} export)")
    with loading(export_dir / "tokenizer"):
        comps = {"tokenizer": CLIPTokenizer.from_pretrained(str(export_dir / "tokenizer"))}
    with loading(export_dir / "scheduler"):
        comps["noise_scheduler"] = DDPMScheduler.from_pretrained(str(export_dir / "scheduler"))
    configs = {name: _config(export_dir / name) for name in COMPONENTS}
    n, want = comps["tokenizer"].model_max_length, configs["text_encoder"].get("max_position_embeddings")
    if isinstance(want, int) and n != want:  # the text encoder was traced for `want` tokens exactly
        raise UserError(f"{export_dir / 'tokenizer'}: pads prompts to {n} tokens, the text encoder takes {want} "
                        f"(tokenizer_config.json missing or damaged); export it again")
    for name, cls in (("text_encoder", TextEncoderStub), ("unet", UNetStub), ("vae_decoder", VAEDecoderStub)):
        folder = export_dir / name
        comps["vae" if name == "vae_decoder" else name] = cls(configs[name], _Session(runtime, folder, precision))
    return comps
