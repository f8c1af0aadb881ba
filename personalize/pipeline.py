"""Loading Stable Diffusion components from a resolved base, and generating images with metadata.

Weights load from safetensors only; a base that ships only pickles (.bin/.ckpt) is refused unless
the user passes --allow-pickle. Images are written with their generation settings in the PNG text
chunks, to a temp file first and then renamed.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
from pathlib import Path

import torch

from .defaults import DEFAULT_SCHEDULER, SCHEDULERS
from .errors import UserError
from .fileio import atomic_file, write_atomic, write_json

WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")


def check_safetensors(base_path: Path, allow_pickle: bool) -> None:
    for sub in WEIGHT_FOLDERS:
        d = Path(base_path) / sub
        if not d.is_dir():
            raise UserError(f"{base_path}: missing {sub}/; not a complete Stable Diffusion pipeline directory")
        if any(d.glob("*.safetensors")):
            continue
        pickles = [p.name for p in d.iterdir() if p.suffix in {".bin", ".ckpt", ".pt", ".pth"}]
        if pickles and not allow_pickle:
            raise UserError(f"{d}: only pickle weights ({pickles[0]}); convert them to safetensors or pass "
                            f"--allow-pickle if you trust the source")
        if not pickles:
            raise UserError(f"{d}: no weights found")


def load_cast(cls, folder: Path, dtype: torch.dtype, **pretrained_kw):
    """Load a model straight into `dtype` holding at most one fp32 tensor at a time.

    `from_pretrained(torch_dtype=...)` materialises the whole fp32 checkpoint before casting
    (peak = fp32 + half copy: 1.9 GB for a 0.32B U-Net); here the model is built on the meta device
    and filled tensor by tensor from the safetensors files (peak = half copy + one tensor). Any
    mismatch with the model's own keys (an older checkpoint layout that diffusers converts on load)
    falls back to `from_pretrained`.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    files = sorted(Path(folder).glob("*.safetensors"))
    config = cls.load_config(folder) if hasattr(cls, "load_config") else None
    if dtype == torch.float32 or not files or config is None and not hasattr(cls, "config_class"):
        return cls.from_pretrained(folder, torch_dtype=dtype, **pretrained_kw)
    with init_empty_weights():
        model = cls.from_config(config) if config is not None else cls(cls.config_class.from_pretrained(folder))
    expected = set(model.state_dict())
    seen: set[str] = set()
    try:
        for f in files:
            for key, tensor in iter_safetensors(f):
                if key not in expected and key.startswith(TEXT_MODEL_PREFIX) and key[len(TEXT_MODEL_PREFIX):] in expected:
                    key = key[len(TEXT_MODEL_PREFIX):]  # transformers 4.x naming of a transformers 5 model
                if key not in expected:
                    raise KeyError(key)
                set_module_tensor_to_device(model, key, "cpu", value=tensor, dtype=dtype)
                seen.add(key)
    except KeyError:
        return cls.from_pretrained(folder, torch_dtype=dtype, **pretrained_kw)
    missing = {k for k in expected - seen if any(t.is_meta for n, t in model.state_dict(keep_vars=True).items() if n == k)}
    if missing:
        return cls.from_pretrained(folder, torch_dtype=dtype, **pretrained_kw)
    return model.eval()


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def iter_safetensors(path: Path):
    """(name, tensor) pairs of a safetensors file, read one tensor at a time with plain reads.
    Unlike a memory map, nothing of the file stays resident once a tensor has been consumed.
    The format: 8-byte little-endian header size, a JSON header (dtype, shape, data offsets), data."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            f.seek(8 + n + start)
            buf = bytearray(f.read(end - start))
            t = torch.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]) if buf else torch.empty(0, dtype=_ST_DTYPES[info["dtype"]])
            yield name, t.reshape(info["shape"])


@contextlib.contextmanager
def loading(folder: Path):
    """A component folder that does not load (truncated or garbage weights, a broken config) is
    one line naming the file at fault (else the folder), not a traceback from deep inside
    safetensors or diffusers."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        if e.errno is not None:  # the OS refusing (disk, permissions): the boundary words those
            raise
        raise UserError(f"{damaged_file(folder)}: does not load ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - only what reading these files raises reaches here
        if type(e).__name__ not in ("SafetensorError", "JSONDecodeError", "ValueError", "HeaderTooLarge",
                                    "EnvironmentError", "RuntimeError", "KeyError", "UnicodeDecodeError") \
                and not isinstance(e, struct.error):  # pipeline.iter_safetensors on a file under 8 bytes
            raise
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"{damaged_file(folder)}: damaged or not a {folder.name} ({type(e).__name__}: {first})") from None


def damaged_file(folder: Path) -> Path:
    """The first file below `folder` that does not parse (a JSON file, or a safetensors file whose
    header or size is wrong), else `folder` itself: which file a loader choked on, whatever it said."""
    for f in sorted(Path(folder).rglob("*.json")):
        try:
            json.loads(f.read_text())
        except (OSError, ValueError):
            return f
    for f in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with open(f, "rb") as h:
                (n,) = struct.unpack("<Q", h.read(8))
                header = json.loads(h.read(n)) if n <= f.stat().st_size - 8 else None
            header.pop("__metadata__", None)
            if 8 + n + max((v["data_offsets"][1] for v in header.values()), default=0) != f.stat().st_size:
                return f
        except (OSError, ValueError, AttributeError, TypeError, KeyError, IndexError, struct.error):
            return f
    return Path(folder)


def make_scheduler(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}'; choose from {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **extra)


def build_pipeline(components: dict, scheduler: str = DEFAULT_SCHEDULER):
    """A StableDiffusionPipeline sharing the given modules (no copy, no reload)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=components["unet"], scheduler=make_scheduler(scheduler, components["noise_scheduler"].config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.inference_mode()
def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float, resolution: int,
             negative_prompt: str | None = None, cross_attention_kwargs: dict | None = None):
    """One image per (prompt, seed); each image has its own CPU generator, so an image depends only
    on its prompt and seed, not on the batch it was generated in."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(prompts, generator=gens, num_inference_steps=steps, guidance_scale=guidance_scale,
               height=resolution, width=resolution,
               negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
               cross_attention_kwargs=cross_attention_kwargs)
    return out.images


def save_png(img, path: Path, metadata: dict) -> Path:
    """PNG with each metadata entry as a text chunk (plus all of it as JSON under 'personalize'),
    written to a temp name and renamed."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    info.add_text("personalize", json.dumps(metadata))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return write_atomic(path, buf.getvalue())


def save_pipeline(dest: Path, base_path: Path, comps: dict) -> None:
    """A complete fp32 diffusers pipeline directory of `comps` with the base's own inference
    scheduler, written into `dest` (callers make that atomic: fileio.atomic_dir / scratch_dir)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    index = json.loads((Path(base_path) / "model_index.json").read_text())
    sched_cls = getattr(diffusers, index.get("scheduler", [None, "PNDMScheduler"])[1])
    scheduler = sched_cls.from_pretrained(base_path, subfolder="scheduler")
    unet = comps["unet"]
    unet.disable_gradient_checkpointing()
    pipe = StableDiffusionPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    save_pretrained(pipe.to(torch.float32), dest)


TEXT_MODEL_PREFIX = "text_model."


def save_pretrained(pipe, dest: Path) -> None:
    """`pipe.save_pretrained` (safetensors), with the text encoder's tensors under transformers 4.x
    names. transformers 5 saves CLIPTextModel without the `text_model.` prefix that 4.x (and
    ComfyUI's CLIP loader) require, and loads either; so every pipeline we write carries it."""
    pipe.save_pretrained(dest, safe_serialization=True)
    prefix_text_encoder(Path(dest) / "text_encoder")


def prefix_text_encoder(folder: Path) -> None:
    """Rewrite the safetensors of a saved CLIP text encoder to `text_model.*` keys (and its shard
    index, if any); files already in that naming are left alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def named(k: str) -> str:
        return k if k.startswith(TEXT_MODEL_PREFIX) or k.startswith("text_projection") else TEXT_MODEL_PREFIX + k

    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            meta, keys = h.metadata() or {"format": "pt"}, list(h.keys())
        if all(named(k) == k for k in keys):
            continue
        tensors = {named(k): v for k, v in load_file(str(f)).items()}
        with atomic_file(f) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {named(k): v for k, v in data.get("weight_map", {}).items()}
        write_json(index, data)
