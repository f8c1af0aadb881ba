"""ONNX export of the three sub-models with `torch.onnx.export`, checked by onnxruntime.

The TorchScript-based exporter (`dynamo=False`) is used: on torch 2.13 the dynamo exporter
specialises the U-Net's spatial sizes to the traced ones (one resolution per file) and takes ~10x
longer; the TorchScript one keeps batch, height and width dynamic. Opset 17 has LayerNormalization
(the text encoder) natively. A model over 1 GiB keeps its weights in one `model.onnx_data` file
beside it (protobuf's 2 GiB limit; the fp32 SD-v1.4 U-Net is 3.4 GB).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .trace import ONNX_NAMES, example_inputs, wrappers

OPSET = 17
EXTERNAL_DATA_OVER = 2**30
FILES = {"text_encoder": "model.onnx", "unet": "model.onnx", "vae_decoder": "model.onnx"}

_DYNAMIC = {
    "text_encoder": {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}},
    "unet": {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
             "encoder_hidden_states": {0: "batch"}, "out_sample": {0: "batch", 2: "height", 3: "width"}},
    "vae_decoder": {"latent_sample": {0: "batch", 2: "height", 3: "width"},
                    "sample": {0: "batch", 2: "pixel_height", 3: "pixel_width"}},
}


def write_onnx(comps: dict, out: Path, resolution: int) -> list[Path]:
    import torch

    mods = wrappers(comps)
    ex = example_inputs(comps, resolution)
    written = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        for name, fname in FILES.items():
            path = Path(out) / name / fname
            path.parent.mkdir(parents=True, exist_ok=True)
            inputs, outputs = ONNX_NAMES[name]
            torch.onnx.export(mods[name], ex[name], str(path), dynamo=False, opset_version=OPSET,
                              input_names=inputs, output_names=outputs, dynamic_axes=_DYNAMIC[name],
                              do_constant_folding=True)
            _one_data_file(path)
            written.append(path)
    return written


def _one_data_file(path: Path) -> None:
    """Large models: gather every tensor into `model.onnx_data` (the exporter writes one file per
    tensor past 2 GiB); small ones stay one self-contained file."""
    import onnx

    folder = path.parent
    extra = [p for p in folder.iterdir() if p != path]
    if not extra and path.stat().st_size <= EXTERNAL_DATA_OVER:
        return
    model = onnx.load(str(path), load_external_data=True)
    for p in extra:
        p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + "_data", size_threshold=1024)


README = """## Load it (Python, onnxruntime, CPU)

```python
import onnxruntime as ort
unet = ort.InferenceSession("unet/model.onnx", providers=["CPUExecutionProvider"])
# inputs sample (B,4,h,w) f32, timestep (B,) f32, encoder_hidden_states (B,77,D) f32 -> out_sample
```

`personalize generate THIS_DIR --prompt "..."` runs the whole pipeline on onnxruntime (diffusers'
scheduler loop; tokenizer/ and scheduler/ are beside the models). Text encoder: input_ids (B,77)
int64 -> last_hidden_state, pooler_output. VAE decoder: latent_sample (latents / scaling_factor)
-> sample in [-1, 1]. Batch, height and width are dynamic."""
