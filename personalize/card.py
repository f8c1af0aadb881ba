"""Model card (README.md with Hugging Face front matter) for a finished run."""

from __future__ import annotations

from .defaults import METHOD_LABELS


def model_card(p) -> str:
    cfg, base, subj = p.cfg, p.base, p.subject
    # what from_pretrained can load as written: the hub id, else the local folder trained on
    # (`tiny` and local bases have no hub id; their name alone does not load)
    base_ref = base.hub_id or str(base.path)
    lora = cfg.method in ("lora", "dora")  # the diffusers LoRA file (DoRA: with its magnitudes)
    tags = ["text-to-image", "stable-diffusion", "diffusers", "dreambooth", "bk-sdm"] + (
        [cfg.method] if cfg.method != "full" else [])
    front = "\n".join(["---", f"base_model: {base_ref}", "library_name: diffusers", "license: creativeml-openrail-m",
                       f"instance_prompt: {p.instance_prompt}", "tags:", *[f"- {t}" for t in tags], "---", ""])
    if lora:
        usage = (f'pipe = StableDiffusionPipeline.from_pretrained({base_ref!r})\n'
                 f'pipe.load_lora_weights({str(p.run_dir.resolve())!r})')
        what = (f"LoRA adapter (U-Net rank {cfg.rank}, alpha {cfg.lora_alpha}"
                + (f"; text encoder rank {cfg.text_encoder_rank}, alpha {cfg.text_encoder_alpha}" if cfg.train_text_encoder else "")
                + ")")
        what = what.replace("LoRA adapter", "DoRA adapter") if cfg.method == "dora" else what
    elif cfg.method != "full":  # LoHa / LoKr / OFT / BOFT / HRA: peft adapter folders
        run = str(p.run_dir.resolve())
        usage = (f'from peft import PeftModel\npipe = StableDiffusionPipeline.from_pretrained({base_ref!r})\n'
                 f'pipe.unet = PeftModel.from_pretrained(pipe.unet, {run + "/adapter/unet"!r})'
                 + (f'\npipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, {run + "/adapter/text_encoder"!r})'
                    if cfg.train_text_encoder else ""))
        what = f"{METHOD_LABELS.get(cfg.method, cfg.method)} adapter (peft)"
    else:
        usage = f'pipe = StableDiffusionPipeline.from_pretrained({str(p.run_dir.resolve())!r})'
        what = "full diffusers pipeline (U-Net" + (" and text encoder" if cfg.train_text_encoder else "") + " finetuned)"
    if cfg.pivotal:  # the new tokens' embeddings (embeddings.py), as the advanced DreamBooth script's card
        tokens = ", ".join(f'"<s{i}>"' for i in range(cfg.num_new_tokens))
        usage = ("from safetensors.torch import load_file\n" + usage + "\npipe.load_textual_inversion(load_file("
                 f"{str(p.run_dir.resolve() / 'embeddings.safetensors')!r})['clip_l'], token=[{tokens}])")
    rows = [("base", f"{base.name} (`{base.path}`)"), ("subject", f"{subj.name} ({subj.class_noun}, {subj.kind})"),
            ("instance prompt", f"`{p.instance_prompt}`"), ("class prompt", f"`{p.class_prompt}`"),
            ("steps", cfg.steps), ("resolution", p.resolution), ("batch size", cfg.train_batch_size),
            ("learning rate", f"{cfg.resolved_lr():g} (constant)"),
            ("prior preservation", f"weight {cfg.prior_loss_weight}, {cfg.class_images} class images"
             if cfg.class_images else "off"),
            ("text encoder trained", cfg.train_text_encoder), ("seed", cfg.seed)]
    table = "\n".join(["| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])
    return f"""{front}
# DreamBooth {cfg.method}: {subj.name} on {base.name}

A {what} personalized with DreamBooth (Ruiz et al. 2023) on the compressed
[BK-SDM](https://github.com/Nota-NetsPresso/BK-SDM) family of Stable Diffusion backbones, trained with `personalize`.
Write `{cfg.prompt_token()} {subj.class_noun}` in a prompt to draw the subject, e.g. `{p.instance_prompt} on the beach`.

```python
from diffusers import StableDiffusionPipeline
{usage}
image = pipe("{p.instance_prompt} on the beach", num_inference_steps=25).images[0]
```

## Training

{table}

The resolved configuration is in `run.json`; `validation.png` shows a few fixed-seed samples
(prompts and seeds in its PNG metadata).
"""
