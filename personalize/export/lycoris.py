"""A LoHa, LoKr or OFT run exported as one LyCORIS-format file (kohya's `lora_unet_*` / `lora_te_*`
module names), the layout AUTOMATIC1111, ComfyUI and kohya's sd-scripts (through the `lycoris-lora`
package) load:

- LoHa: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `alpha`; delta = (w1a w1b) * (w2a w2b) alpha/r,
  peft's own factors and scale.
- LoKr: `lokr_w1` (or `lokr_w1_a`/`_b`), `lokr_w2` (or `lokr_w2_a`/`_b`), `alpha`; delta = kron(w1, w2) alpha/r.
  The readers scale by alpha / (the rank of a decomposed factor), and by 1 when neither factor is
  decomposed, while peft always scales by alpha/r: then the scale is folded into `lokr_w1`.
- OFT: peft's OFT rotates each layer's *input* in blocks (W R), LyCORIS' diag-OFT its *output*
  (R W); one is not the other, so an OFT exports as LyCORIS' `full` algorithm, the exact weight
  difference `diff` = W R - W per layer (larger, but every reader applies it as W + diff). BOFT
  and HRA (rotations of the input too, in layouts of peft's own) export the same way.

Per-module ranks and alphas (rank_pattern / alpha_pattern) are carried: each layer's tensors have
its own shapes and its `alpha` is its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters import ADAPTER_DIR, COMPONENTS
from ..embeddings import kohya_bundle_of
from ..errors import UserError
from ..fileio import atomic_file
from ..outputs import output_lock
from ..peft_adapters import adapter_components, load_peft_adapter, read_peft
from ..runs import base_name, read_run
from ..sources import load_components, resolve_source
from .ldm_layout import kohya_name, kohya_unet_namer

FULL_DIFF = ("oft", "boft", "hra")  # rotations of the input: exported as their exact weight change
LYCORIS_PARAMS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                  "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


def export_lycoris(run_dir: Path, run: dict, out: Path, names: str = "diffusers") -> Path:
    from safetensors.torch import save_file

    method = run.get("method")
    unet_names = None
    if names == "ldm":
        unet_names = kohya_unet_namer(resolve_source(run_dir).pipeline_dir)
    layers = oft_diffs(run_dir, method) if method in FULL_DIFF else lycoris_layers(run_dir, method)
    tensors = {f"{kohya_name(comp, module, unet_names)}.{k}": v.contiguous()
               for (comp, module), params in layers.items() for k, v in params.items()}
    tensors |= kohya_bundle_of(run_dir, run)  # --pivotal: its embedding bundled, as kohya does
    algo = "full" if method in FULL_DIFF else method
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": algo}),
            "ss_output_name": out.stem, "personalize_method": str(method), "personalize_names": names,
            "personalize_subject": run["subject"]["name"], "personalize_base": base_name(run),
            "personalize_instance_prompt": str(run.get("instance_prompt", ""))}
    with output_lock(out), atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return out


def lycoris_layers(run_dir: Path, method: str) -> dict[tuple[str, str], dict]:
    """{(component, module): {LyCORIS key: tensor}} of a LoHa/LoKr run's peft folders."""
    import torch
    from peft.utils.other import get_pattern_key

    layers: dict[tuple[str, str], dict] = {}
    for comp in adapter_components(run_dir, method):
        config, sd = read_peft(Path(run_dir) / ADAPTER_DIR / comp, method)
        for key, t in sd.items():
            module, _, param = key.rpartition(".")
            if param not in LYCORIS_PARAMS:
                raise UserError(f"{run_dir}: unexpected {method} tensor '{key}' in {comp}; the adapter is damaged")
            layers.setdefault((comp, module), {})[param] = t.float()
        for (c, module), p in layers.items():
            if c != comp:
                continue
            # the layer's own rank and alpha (peft's rank_pattern / alpha_pattern, matched as peft does)
            r = float(config.rank_pattern.get(get_pattern_key(config.rank_pattern, module), config.r))
            alpha = float(config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, module), config.alpha))
            if method == "lokr" and "lokr_w1" in p and "lokr_w2" in p:
                p["lokr_w1"] = p["lokr_w1"] * (alpha / r)  # the readers apply no alpha here (see the module doc)
                p["alpha"] = torch.tensor(1.0)  # read (lycoris requires the key) but not applied
            else:
                p["alpha"] = torch.tensor(alpha)
    return layers


def oft_diffs(run_dir: Path, method: str = "oft") -> dict[tuple[str, str], dict]:
    """{(component, module): {"diff": W R - W}} of an OFT, BOFT or HRA run, on its own base in fp32."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    run = read_run(run_dir, finished=True)
    src = resolve_source(run_dir)
    comps = load_components(src.pipeline_dir, False)
    load_peft_adapter(comps, run_dir, method, "default", base_name(run), src.base_name)
    layers = {}
    with torch.no_grad():
        for comp in COMPONENTS:
            for name, module in comps[comp].named_modules():
                if isinstance(module, BaseTunerLayer):
                    before = module.get_base_layer().weight.detach().clone()
                    module.merge()
                    layers[(comp, name)] = {"diff": module.get_base_layer().weight.detach() - before}
    return layers
