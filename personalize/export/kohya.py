"""A LoRA run exported as one kohya-format file: the `lora_unet_*` / `lora_te_*` keys of kohya's
sd-scripts, which AUTOMATIC1111, ComfyUI and diffusers' own loader read. Written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters import ADAPTER_METHODS, LORA_WEIGHTS, LoraLayer, method_of, read_lora
from ..embeddings import kohya_bundle_of
from ..errors import UserError
from ..fileio import atomic_file
from ..outputs import check_output, output_lock
from ..runs import base_name, read_run
from ..sources import resolve_source
from .ldm_layout import kohya_name, kohya_unet_namer
from .lycoris import export_lycoris

if TYPE_CHECKING:
    import torch


def lora_run(run_dir: Path) -> dict:
    """run.json of a finished adapter run (any method of adapters.ADAPTER_METHODS)."""
    run = read_run(run_dir, finished=True)
    if run.get("method", "lora") not in ADAPTER_METHODS:
        raise UserError(f"{run_dir} is a {run.get('method')} run: it already is a complete pipeline directory "
                        f"(load it with from_pretrained); export works on adapter runs ({', '.join(ADAPTER_METHODS)})")
    return run


def _family(layers) -> str:
    """sd-v2 when any layer sees a 1024-wide input (OpenCLIP ViT-H text features), else sd-v1
    (CLIP ViT-L/14, 768): the one difference between the families an adapter's shapes show."""
    widths = {int(x.down.shape[1]) for (c, m), x in layers.items() if c == "text_encoder" or "attn2.to_k" in m
              or "attn2.to_v" in m}
    return "sd-v2" if 1024 in widths else "sd-v1"


def export_kohya(run_dir: Path, out: Path, overwrite: bool = False, names: str = "diffusers") -> Path:
    """RUN_DIR's adapter as one kohya-format safetensors file (`lora_unet_*`, `lora_te_*`, alphas).
    names="ldm": U-Net keys by the base's real ldm layout (ldm_layout), for A1111 on BK-SDM."""
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out)
    run = lora_run(run_dir)
    check_output(out, kind="file", inputs=[run_dir], overwrite=overwrite)
    if method_of(run.get("method", "lora")).storage == "peft":
        return export_lycoris(run_dir, run, out, names)
    layers = read_lora(run_dir / LORA_WEIGHTS)
    meta = kohya_metadata(layers, _family(layers))
    meta |= {"ss_output_name": out.stem, "personalize_subject": run["subject"]["name"],
             "personalize_base": base_name(run),
             "personalize_instance_prompt": str(run.get("instance_prompt", ""))}
    unet_names = None
    if names == "ldm":
        unet_names = kohya_unet_namer(resolve_source(run_dir).pipeline_dir)
    meta["personalize_names"] = names
    tensors = to_kohya(layers, unet_names) | kohya_bundle_of(run_dir, run)  # --pivotal: its embedding bundled
    with output_lock(out), atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return out


def to_kohya(layers: dict[tuple[str, str], LoraLayer], unet_names=None) -> dict[str, "torch.Tensor"]:
    """The `lora_unet_*` / `lora_te_*` key format of kohya's sd-scripts, which AUTOMATIC1111,
    ComfyUI and diffusers' own loader read: per layer `lora_down.weight`, `lora_up.weight` and a
    scalar `alpha` (the layer's output is scaled by alpha / rank, as in our diffusers file)."""
    import torch

    layers = dict(layers)
    te = [(m, x) for (c, m), x in layers.items() if c == "text_encoder"]
    dora = any(x.magnitude is not None for x in layers.values())
    # (not for DoRA: a padding layer would need the base's row norms as its magnitude)
    if te and not dora and not any(m.endswith("out_proj") for m, _ in te):
        # diffusers (0.42) recognises a kohya text-encoder part only by an out_proj layer in it; a
        # zero-valued one (up = 0: it adds exactly nothing) lets its loader read q/v-only adapters
        module, x = te[0]
        width = int(x.down.shape[1])  # q/k/v/out projections of CLIP are all width x width
        out_proj = module.rsplit(".", 1)[0] + ".out_proj"
        layers[("text_encoder", out_proj)] = LoraLayer(x.down.new_zeros((x.rank, width)),
                                                       x.up.new_zeros((width, x.rank)), x.alpha)
    out = {}
    for (comp, module), layer in layers.items():
        name = kohya_name(comp, module, unet_names)
        out[f"{name}.lora_down.weight"] = layer.down.contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=layer.down.dtype)
        if layer.magnitude is not None:
            # LyCORIS' / ComfyUI's DoRA key: the magnitude per output row, shaped (out, 1[, 1, 1])
            # (their wd_on_out layout), the norm taken over each row as peft's DoRA does
            out[f"{name}.dora_scale"] = layer.magnitude.reshape(-1, *[1] * (layer.up.ndim - 1)).contiguous()
    return out


def kohya_metadata(layers: dict[tuple[str, str], LoraLayer], family: str | None) -> dict[str, str]:
    """The sd-scripts training metadata keys that UIs read to describe a LoRA (all strings)."""
    unet = [x for (c, _), x in layers.items() if c == "unet"] or list(layers.values())
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(unet[0].rank),
            "ss_network_alpha": f"{unet[0].alpha:g}", "ss_v2": str(family == "sd-v2"),
            "ss_base_model_version": "sd_v2" if family == "sd-v2" else "sd_v1"}
    if any(x.magnitude is not None for x in layers.values()):
        meta["ss_network_args"] = '{"dora_wd": "True"}'  # how sd-scripts records a DoRA network
    return meta
