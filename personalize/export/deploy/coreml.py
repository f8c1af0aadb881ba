"""Core ML export in the layout of Apple's ml-stable-diffusion (python_coreml_stable_diffusion/
torch2coreml.py; Swift StableDiffusionPipeline+Resources.swift): TextEncoder.mlpackage,
Unet.mlpackage, VAEDecoder.mlpackage (ML programs, fp16, macOS 13 / iOS 16), vocab.json and
merges.txt beside them, with Apple's input/output names, shapes and dtypes:

- TextEncoder: input_ids float32 (1, 77) -> last_hidden_state (1, 77, D), pooled_outputs (1, D)
- Unet: sample fp16 (2, 4, h, w), timestep fp16 (2,), encoder_hidden_states fp16 (2, D, 1, 77)
  -> noise_pred float32 (batch 2: classifier-free guidance, as the Swift pipeline calls it)
- VAEDecoder: z fp16 (1, 4, h, w) (latents / scaling factor) -> image float32 (1, 3, 8h, 8w)
- VAEEncoder (optional, image-to-image): x fp16 (1, 3, 8h, 8w) in [-1, 1] -> latent float32
  (1, 8, h, w), the mean and log-variance

The diffusers U-Net is converted as it is (Apple's stock converter rebuilds it and asserts on a
missing mid block; BK-SDM-Small/Tiny have none). `split_einsum` attention is Apple's Neural
Engine formulation (one einsum per head, no head reshapes). Palettization: k-means on each weight
(coremltools.optimize.coreml, `nbits` bits, embedding tables left alone), text encoder and U-Net,
as Apple's `--quantize-nbits`. Conversion and palettization run on Linux; prediction and
compiling to .mlmodelc need macOS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from ...errors import UserError
from .trace import example_inputs, wrappers

PACKAGES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder"}
VAE_ENCODER = "VAEEncoder"  # optional: image-to-image (Swift's Encoder.swift), `--vae-encoder`
NAMES = {"text_encoder": (["input_ids"], ["last_hidden_state", "pooled_outputs"]),
         "unet": (["sample", "timestep", "encoder_hidden_states"], ["noise_pred"]),
         "vae_decoder": (["z"], ["image"]), "vae_encoder": (["x"], ["latent"])}
PALETTIZED = ("text_encoder", "unet")  # Apple's quantize_weights leaves the VAE in fp16


class SplitEinsumAttnProcessor:
    """Attention as Apple's SPLIT_EINSUM (ml-stable-diffusion `unet.py`): each head its own pair
    of einsums on slices of q/k/v, so no (B, heads, S, d) reshape/transposes reach the Neural
    Engine. Numerically the same as scaled dot-product attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        import torch

        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        d = q.shape[-1] // attn.heads
        heads = []
        for i in range(attn.heads):
            s = slice(i * d, (i + 1) * d)
            weights = torch.einsum("bqc,bkc->bqk", q[..., s], k[..., s]) * attn.scale
            heads.append(torch.einsum("bqk,bkc->bqc", weights.softmax(dim=-1), v[..., s]))
        out = attn.to_out[1](attn.to_out[0](torch.cat(heads, dim=-1)))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _fix_int_cast() -> None:
    """coremltools 9's `int` op folds a length-1 array with int(array), which numpy 2 refuses
    (diffusers' up-sampling shape checks trace to one); registered over it, same semantics."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    @register_torch_op(torch_alias=["int"], override=True)
    def _int(context, node):
        x = _get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const():
            res = mb.const(val=int(np.asarray(x.val).reshape(-1)[0]), name=node.name)
        else:
            res = mb.cast(x=mb.squeeze(x=x) if len(x.shape) else x, dtype="int32", name=node.name)
        context.add(res, node.name)


def write_coreml(comps: dict, out: Path, resolution: int, settings: dict) -> str:
    import coremltools as ct
    import torch

    _fix_int_cast()
    if settings["attention"] == "split_einsum":
        comps["unet"].set_attn_processor(SplitEinsumAttnProcessor())
    mods = wrappers(comps, channels_first_text=True)
    ex = example_inputs(comps, resolution, channels_first_text=True, ids_dtype=torch.int32)
    ex["text_encoder"] = (ex["text_encoder"][0].float(),)
    nbits = settings["quantize_nbits"]
    packages = {**PACKAGES, **({"vae_encoder": VAE_ENCODER} if settings.get("vae_encoder") else {})}
    for name, package in packages.items():
        inputs, outputs = NAMES[name]
        trace_args = (ex[name][0].to(torch.int32),) if name == "text_encoder" else ex[name]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(mods[name], trace_args)
            in_dtype = np.float32 if name == "text_encoder" else np.float16  # float ids: coremltools#1423, as Apple
            model = ct.convert(traced, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS13,
                               inputs=[ct.TensorType(name=n, shape=tuple(v.shape), dtype=in_dtype)
                                       for n, v in zip(inputs, ex[name])],
                               outputs=[ct.TensorType(name=n, dtype=np.float32) for n in outputs],
                               compute_units=ct.ComputeUnit.CPU_AND_NE, skip_model_load=True)
        if nbits is not None and name in PALETTIZED:
            model = palettize(model, nbits)
        model.short_description = f"{package} of a personalize export (Stable Diffusion, {resolution} px)"
        model.save(str(Path(out) / f"{package}.mlpackage"))
    added = _tokenizer_files(comps, Path(out))
    if settings.get("bundle_resources"):
        compile_resources(Path(out))
    return README.format(nbits="fp16 (no palettization)" if nbits is None else f"{nbits}-bit k-means palettized "
                         "text encoder and U-Net", attention=settings["attention"], res=resolution) + (
        ADDED.format(tokens=", ".join(f"`{t}` = {i}" for t, i in added.items())) if added else "")


def palettize(model, nbits: int):
    import coremltools as ct

    op = ct.optimize.coreml.OpPalettizerConfig(mode="kmeans", nbits=nbits)
    config = ct.optimize.coreml.OptimizationConfig(global_config=op, op_type_configs={"gather": None})
    return ct.optimize.coreml.palettize_weights(model, config=config)


def _tokenizer_files(comps: dict, out: Path) -> dict[str, int]:
    """vocab.json + merges.txt (what Swift's BPETokenizer reads), from the tokenizer's own model;
    tokens added beyond them (--pivotal's) into added_tokens.json, returned."""
    import tempfile

    added = {t: i for t, i in comps["tokenizer"].get_added_vocab().items() if i >= comps["tokenizer"].vocab_size}
    if added:
        (out / "added_tokens.json").write_text(json.dumps(added))
    with tempfile.TemporaryDirectory() as d:
        comps["tokenizer"].save_pretrained(d)
        vocab_file, merges_file = Path(d) / "vocab.json", Path(d) / "merges.txt"
        if vocab_file.is_file() and merges_file.is_file():
            shutil.copyfile(vocab_file, out / "vocab.json")
            shutil.copyfile(merges_file, out / "merges.txt")
            return added
        model = json.loads((Path(d) / "tokenizer.json").read_text())["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return added


MAC_HINT = ("compiling .mlmodelc resources needs a Mac with Xcode; there run "
            "`xcrun coremlcompiler compile X.mlpackage Resources/` for each package and copy vocab.json and "
            "merges.txt into Resources/")


def check_bundle_tools() -> None:
    if sys.platform != "darwin" or shutil.which("xcrun") is None:
        raise UserError(f"--bundle-resources: {MAC_HINT}")


def compile_resources(out: Path) -> None:
    res = out / "Resources"
    res.mkdir()
    for package in [p.name[:-len(".mlpackage")] for p in sorted(out.glob("*.mlpackage"))]:
        subprocess.run(["xcrun", "coremlcompiler", "compile", str(out / f"{package}.mlpackage"), str(res)], check=True,
                       capture_output=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(out / f, res / f)


README = """Weights: {nbits}. Attention: {attention}. Image size fixed at {res} px.

## Load it (Swift, Apple's ml-stable-diffusion)

Compile the packages once on a Mac (`xcrun coremlcompiler compile Unet.mlpackage Resources/`, same
for TextEncoder and VAEDecoder; copy vocab.json and merges.txt into Resources/), or export with
`--bundle-resources` on a Mac, then:

```swift
let pipeline = try StableDiffusionPipeline(resourcesAt: resourcesURL, controlNet: [], disableSafety: true)
let images = try pipeline.generateImages(configuration: .init(prompt: "a sks dog on the beach"))
```

## Load it (Python, macOS)

```python
import coremltools as ct
unet = ct.models.MLModel("Unet.mlpackage", compute_units=ct.ComputeUnit.CPU_AND_NE)
```

Apple's `python_coreml_stable_diffusion.pipeline` looks for
`Stable_Diffusion_version_<name>_{{text_encoder,unet,vae_decoder}}.mlpackage`: link these packages
under those names (`-i DIR --model-version <name>`)."""

ADDED = """

## Added tokens (pivotal tuning)

The text encoder's embedding table has rows for {tokens} (`added_tokens.json`), the run's prompts'
`{{token}}`. Apple's Swift `BPETokenizer` reads only vocab.json and merges.txt and never yields an
added token: tokenize the prompt with the `tokenizer/` of a merged export (`transformers`), or
load the run's `embeddings/<token>.safetensors` in AUTOMATIC1111 or ComfyUI instead."""
