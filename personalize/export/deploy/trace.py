"""The three Stable Diffusion sub-models as plain tensor-in/tensor-out modules, with example inputs,
for the runtimes' converters (torch.onnx.export, openvino.convert_model, torch.jit.trace +
coremltools). One wrapper per model, the same for every format; only the tensor layout of Apple's
Core ML contract differs (see `layout`).

The names are the inputs/outputs each runtime file carries:
- text encoder: input_ids (B, 77) -> last_hidden_state (B, 77, D), pooler_output (B, D)
- U-Net: sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, 77, D) -> out_sample
- VAE decoder (post_quant_conv + decoder): latent_sample (B, 4, h, w) -> sample (B, 3, 8h, 8w)
  (the same names optimum's ONNX/OpenVINO Stable Diffusion exports use).
Core ML uses Apple's ml-stable-diffusion names and layout instead (COREML_NAMES).
"""

from __future__ import annotations

import torch

ONNX_NAMES = {
    "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
}
# apple/ml-stable-diffusion torch2coreml.py + swift/StableDiffusion/pipeline/{TextEncoder,Unet,Decoder,Encoder}.swift
COREML_NAMES = {
    "text_encoder": (["input_ids"], ["last_hidden_state", "pooled_outputs"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["noise_pred"]),
    "vae_decoder": (["z"], ["image"]),
    "vae_encoder": (["x"], ["latent"]),
}


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.to(torch.long), return_dict=False)
        return out[0], out[1]


class UNet(torch.nn.Module):
    """`channels_first_text`: Apple's layout, encoder_hidden_states as (B, D, 1, 77) (their U-Net
    runs attention as 1x1 convolutions for the Neural Engine); converted back to (B, 77, D) here."""

    def __init__(self, unet, channels_first_text: bool = False):
        super().__init__()
        self.unet, self.channels_first_text = unet, channels_first_text

    def forward(self, sample, timestep, encoder_hidden_states):
        if self.channels_first_text:
            encoder_hidden_states = encoder_hidden_states.squeeze(2).transpose(1, 2)
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VAEDecoder(torch.nn.Module):
    """latents already divided by the scaling factor (diffusers' pipeline and Apple's Decoder.swift
    both do that before the call)."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, latent_sample):  # the parameter names are the converters' input names
        return self.decoder(self.post_quant_conv(latent_sample))


class VAEEncoder(torch.nn.Module):
    """image in [-1, 1] -> the moments (mean and log-variance, 2x latent channels), as Apple's."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, x):
        return self.quant_conv(self.encoder(x))


def seq_len(comps: dict) -> int:
    return int(comps["tokenizer"].model_max_length)


def latent_size(comps: dict, resolution: int) -> int:
    return resolution // 2 ** (len(comps["vae"].config.block_out_channels) - 1)


def wrappers(comps: dict, channels_first_text: bool = False) -> dict[str, torch.nn.Module]:
    return {"text_encoder": TextEncoder(comps["text_encoder"]).eval(),
            "unet": UNet(comps["unet"], channels_first_text).eval(),
            "vae_decoder": VAEDecoder(comps["vae"]).eval(),
            "vae_encoder": VAEEncoder(comps["vae"]).eval()}


def example_inputs(comps: dict, resolution: int, batch: int = 2, channels_first_text: bool = False,
                   ids_dtype: torch.dtype = torch.long) -> dict[str, tuple]:
    """Inputs to trace with: batch 2 is classifier-free guidance's (unconditional + conditional)."""
    g = torch.Generator().manual_seed(0)
    n, d = seq_len(comps), comps["text_encoder"].config.hidden_size
    lat, ch = latent_size(comps, resolution), comps["unet"].config.in_channels
    text = torch.randn(batch, d, 1, n, generator=g) if channels_first_text else torch.randn(batch, n, d, generator=g)
    vocab = comps["text_encoder"].config.vocab_size
    return {
        "text_encoder": (torch.randint(0, vocab, (1, n), generator=g).to(ids_dtype),),
        "unet": (torch.randn(batch, ch, lat, lat, generator=g), torch.full((batch,), 999.0), text),
        "vae_decoder": (torch.randn(1, comps["vae"].config.latent_channels, lat, lat, generator=g),),
        "vae_encoder": (torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1,),
    }
