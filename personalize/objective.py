"""What a DreamBooth step computes, apart from the loop that runs it (fit.py): the inputs cached
once per run (latent distributions of the photos and class images, token ids, loss masks, frozen
text embeddings) and the loss (the noise/target step itself is diffusion.py's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .data import latent_masks, load_training_images, with_flips
from .diffusion import check_prediction_type, diffusion_loss, noise_latents


@torch.no_grad()
def cache_latent_dists(vae, images: torch.Tensor, device, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of each image, in fp32 on `device`. One image per call on
    CPU: batching buys no speed there, and 8 images of VAE activations cost GBs of peak memory."""
    batch = batch or (8 if torch.device(device).type == "cuda" else 1)
    vae.to(device)
    means, stds = [], []
    for chunk in images.split(batch):
        dist = vae.encode(chunk.to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, prompt: str, device) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@dataclass
class Cache:
    """What a step reads but never changes: latent distributions of the photos (with flips) and
    class images, token ids per distinct caption, loss masks, and the frozen text encoder's
    embeddings (None when the text encoder trains)."""

    inst_mean: torch.Tensor
    inst_std: torch.Tensor
    caption_of: torch.Tensor  # photo (with flips) -> row of inst_ids
    inst_ids: torch.Tensor
    class_ids: torch.Tensor
    scaling_factor: float
    cls_mean: torch.Tensor | None = None  # None: no prior preservation
    cls_std: torch.Tensor | None = None
    inst_mask: torch.Tensor | None = None
    inst_emb: torch.Tensor | None = None
    class_emb: torch.Tensor | None = None


def build_cache(p, comps: dict, class_paths: list[Path], device, reuse: bool) -> Cache:
    cfg, vae, text_encoder = p.cfg, comps["vae"], comps["text_encoder"]
    inst_mean, inst_std = cache_latent_dists(vae, with_flips(p.images), device)
    cls_mean = cls_std = None
    if class_paths:
        class_imgs = load_training_images(class_paths, p.resolution, allow_upscale=True)
        cls_mean, cls_std = cache_latent_dists(vae, with_flips(class_imgs), device)
        del class_imgs
    sf = vae.config.scaling_factor
    # in-run samples, scores and full step saves decode or save with the VAE: it stays
    keep_vae = bool(cfg.sample_every or cfg.score_every or (cfg.save_every and cfg.method == "full"))
    if reuse:
        vae.to(device if keep_vae else "cpu")  # a batch keeps it for the next subject
    elif not keep_vae:
        # not needed again until the outputs are written (reloaded then): its memory is the training's
        comps["vae"] = None
    # one token row per distinct caption (a photo's own, else the instance prompt), shared by the
    # photo's flip; the frozen text encoder's embedding cache is keyed by caption the same way
    captions = [c or p.instance_prompt for c in (p.captions or [None] * len(p.images))] * 2
    distinct = list(dict.fromkeys(captions))
    inst_ids = torch.cat([tokenize(comps["tokenizer"], c, device) for c in distinct])
    class_ids = tokenize(comps["tokenizer"], p.class_prompt, device)
    # loss masks at the latent resolution (kohya's masked loss), flipped with their photos
    inst_mask = None if p.masks is None else latent_masks(with_flips(p.masks), inst_mean.shape[-2:]).to(device)
    with torch.no_grad():
        frozen = not cfg.train_text_encoder
        inst_emb = text_encoder(inst_ids)[0] if frozen else None
        class_emb = text_encoder(class_ids)[0] if frozen else None
    return Cache(inst_mean, inst_std, torch.tensor([distinct.index(c) for c in captions], device=device), inst_ids,
                 class_ids, sf, cls_mean, cls_std, inst_mask, inst_emb, class_emb)


def dreambooth_loss(cfg: TrainConfig, c: Cache, noise_scheduler, device):
    """DreamBooth's loss (Ruiz et al. 2023, eq. 2): the diffusion loss on a batch of the subject's
    photos plus `prior_loss_weight` x the same loss on as many class images (prior preservation),
    one forward pass for both halves."""
    b, train_te = cfg.train_batch_size, cfg.train_text_encoder
    prior = c.cls_mean is not None
    n_inst, n_cls = c.inst_mean.shape[0], c.cls_mean.shape[0] if prior else 0
    check_prediction_type(noise_scheduler)
    class_te = [c.class_ids.expand(b, -1)] if prior else []
    class_cached = [c.class_emb.expand(b, -1, -1)] if prior and not train_te else []

    def loss_fn(ms, step, micro, g):
        ii = torch.randint(0, n_inst, (b,), generator=g, device=device)
        mean, std = c.inst_mean[ii], c.inst_std[ii]
        if prior:
            jj = torch.randint(0, n_cls, (b,), generator=g, device=device)
            mean, std = torch.cat([mean, c.cls_mean[jj]]), torch.cat([std, c.cls_std[jj]])
        latents = (mean + std * torch.randn(mean.shape, generator=g, device=device)) * c.scaling_factor
        x = noise_latents(noise_scheduler, latents, g, noise_offset=cfg.noise_offset)
        ci = c.caption_of[ii]
        emb = (ms["text_encoder"](torch.cat([c.inst_ids[ci], *class_te]))[0] if train_te
               else torch.cat([c.inst_emb[ci], *class_cached]))
        pred = ms["unet"](x.noisy, x.timesteps, emb).sample.float()
        loss_inst = diffusion_loss(pred[:b], x.target[:b], x.timesteps[:b], noise_scheduler, cfg.snr_gamma,
                                   mask=None if c.inst_mask is None else c.inst_mask[ii])
        if not prior:
            return {"loss": loss_inst, "loss_instance": loss_inst}
        loss_prior = diffusion_loss(pred[b:], x.target[b:], x.timesteps[b:], noise_scheduler, cfg.snr_gamma)
        return {"loss": loss_inst + cfg.prior_loss_weight * loss_prior, "loss_instance": loss_inst,
                "loss_prior": loss_prior}

    return loss_fn


