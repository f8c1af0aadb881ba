"""OpenVINO IR export with `openvino.convert_model` straight from the torch modules; int8 through
NNCF's data-free weight compression (`nncf.compress_weights`, INT8 asymmetric per output channel:
weights stored as int8 + scale/zero point, activations stay float), as optimum-intel does for
Stable Diffusion. fp16 stores the weights as fp16 (`compress_to_fp16`), computing in fp32 on CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .trace import ONNX_NAMES, example_inputs, wrappers

FILES = {"text_encoder": "openvino_model", "unet": "openvino_model", "vae_decoder": "openvino_model"}


def _shapes(comps: dict) -> dict[str, list]:
    import openvino as ov

    n, d = int(comps["tokenizer"].model_max_length), comps["text_encoder"].config.hidden_size
    ch, lat = comps["unet"].config.in_channels, comps["vae"].config.latent_channels
    return {"text_encoder": [ov.PartialShape([-1, n])],
            "unet": [ov.PartialShape([-1, ch, -1, -1]), ov.PartialShape([-1]), ov.PartialShape([-1, n, d])],
            "vae_decoder": [ov.PartialShape([-1, lat, -1, -1])]}


def write_openvino(comps: dict, out: Path, resolution: int, weight_format: str = "fp32") -> list[Path]:
    import openvino as ov
    import torch

    mods, ex, shapes = wrappers(comps), example_inputs(comps, resolution), _shapes(comps)
    written = []
    for name, stem in FILES.items():
        inputs, outputs = ONNX_NAMES[name]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on diffusers' shape checks
            model = ov.convert_model(mods[name], example_input=ex[name], input=list(zip(inputs, shapes[name])))
        for port, oname in zip(model.outputs, outputs):
            port.get_tensor().set_names({oname})  # convert_model leaves outputs unnamed
        if weight_format == "int8":
            import logging

            import nncf

            logging.getLogger("nncf").setLevel(logging.WARNING)  # its per-layer statistics table
            model = nncf.compress_weights(model)
        path = Path(out) / name / f"{stem}.xml"
        path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(path), compress_to_fp16=weight_format == "fp16")
        written += [path, path.with_suffix(".bin")]
    return written


README = """## Load it (Python, OpenVINO, CPU)

```python
import openvino as ov
core = ov.Core()
# CPU defaults to bf16 inference where it can; f32 keeps the torch pipeline's numbers
unet = core.compile_model("unet/openvino_model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
noise = unet({"sample": latents, "timestep": t, "encoder_hidden_states": text})["out_sample"]
```

`personalize generate THIS_DIR --prompt "..."` runs the whole pipeline on OpenVINO (diffusers'
scheduler loop; tokenizer/ and scheduler/ are beside the models). Inputs and outputs are named as in
the ONNX export (optimum's names); batch, height and width are dynamic."""
