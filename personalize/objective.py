"""What a DreamBooth step computes, apart from the loop that runs it (fit.py): the inputs cached
once per run (latent distributions of the photos and class images, token ids, loss masks, frozen
text embeddings: text_cache.py) and the loss (the noise/target step itself is diffusion.py's).

Photos of one size form a `Group` (with `--buckets` one per bucket, else one for all of them):
a step's instance batch is drawn from one group, so its latents stack. Class images are square
(drawn at the resolution), so they are a group of their own: when the step's instance group is
not square, the instance and class halves run as two U-Net calls."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .captions import host_generator, vary
from .config import TrainConfig
from .data import latent_masks, load_training_images, with_flips
from .diffusion import check_prediction_type, diffusion_loss, noise_latents
from .prior import prior_prediction_loss
from .text_cache import TextCache


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


@dataclass
class Group:
    """Photos of one size, then their horizontal flips: latent distributions, each one's caption
    (a row of the TextCache, on the device and on the host) and loss masks (None: unmasked)."""

    mean: torch.Tensor
    std: torch.Tensor
    caption_of: torch.Tensor
    caption_rows: list[int]
    mask: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.mean.shape[0]


@dataclass
class Cache:
    """What a step reads but never changes: the photo groups, the class images' latent
    distributions (None: no prior preservation), the text cache and the VAE's scaling factor."""

    groups: list[Group]
    text: TextCache
    scaling_factor: float
    cls_mean: torch.Tensor | None = None
    cls_std: torch.Tensor | None = None


def _groups(p, vae, text: TextCache, captions: list[str], device) -> list[Group]:
    """One group per distinct photo size, in order of first appearance."""
    images = p.images if isinstance(p.images, list) else list(p.images)
    sizes = list(dict.fromkeys(tuple(im.shape[-2:]) for im in images))
    groups = []
    for size in sizes:
        idx = [i for i, im in enumerate(images) if tuple(im.shape[-2:]) == size]
        mean, std = cache_latent_dists(vae, with_flips(torch.stack([images[i] for i in idx])), device)
        rows = [text.row_of[captions[i]] for i in idx] * 2  # a flip shares its photo's caption
        mask = None
        if p.masks is not None:
            masks = torch.stack([p.masks[i] for i in idx])
            mask = latent_masks(with_flips(masks), mean.shape[-2:]).to(device)  # kohya's masked loss, flipped too
        groups.append(Group(mean, std, torch.tensor(rows, device=device), rows, mask))
    return groups


def build_cache(p, comps: dict, class_paths: list[Path], device, reuse: bool) -> Cache:
    cfg, vae, text_encoder = p.cfg, comps["vae"], comps["text_encoder"]
    captions = [c or p.instance_prompt for c in (p.captions or [None] * len(p.images))]
    # one token row per distinct caption; with a frozen encoder its embedding too (text_cache.py)
    text = TextCache(comps["tokenizer"], text_encoder, captions, p.class_prompt, device,
                     frozen=not (cfg.train_text_encoder or cfg.pivotal), extra=("",) if cfg.caption_dropout > 0 else ())
    groups = _groups(p, vae, text, captions, device)
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
    return Cache(groups, text, sf, cls_mean, cls_std)


def dreambooth_loss(cfg: TrainConfig, c: Cache, noise_scheduler, device, base=None):
    """DreamBooth's loss (Ruiz et al. 2023, eq. 2): the diffusion loss on a batch of the subject's
    photos plus `prior_loss_weight` x the same loss on as many class images (prior preservation),
    one forward pass for both halves when they have one size.

    Without buckets or caption options every draw comes from the step's generator on the device,
    as always. With several groups or varied captions the host-side choices (the batch's group and
    photos, each caption's variant) come from `captions.host_generator` (derived from the same
    generator, no device sync); the rest from the step's generator.

    `base` (--prior base-prediction, prior.py): the prior loss is the adapted model's prediction
    for the class prompt on the step's own noisy latents against the frozen base's (no class images)."""
    b, train_te = cfg.train_batch_size, cfg.train_text_encoder or cfg.pivotal  # the encoder runs each step
    prior = c.cls_mean is not None
    base_prior = base is not None
    n_cls = c.cls_mean.shape[0] if prior else 0
    check_prediction_type(noise_scheduler)
    class_te = [c.text.class_ids.expand(b, -1)] if prior or base_prior else []
    class_cached = [c.text.class_emb.expand(b, -1, -1)] if (prior or base_prior) and not train_te else []
    varied = cfg.caption_dropout > 0 or cfg.shuffle_caption
    on_host = varied or len(c.groups) > 1
    n_all = sum(grp.n for grp in c.groups)
    same_size = [prior and tuple(grp.mean.shape[-2:]) == tuple(c.cls_mean.shape[-2:]) for grp in c.groups]

    def pick(h):
        """The step's group and photo indices (host draws): the first photo uniformly over all of
        them (each photo as likely as without buckets), the rest of the batch from its group."""
        k = int(torch.randint(0, n_all, (), generator=h))
        gi = 0
        while k >= c.groups[gi].n:
            k, gi = k - c.groups[gi].n, gi + 1
        return gi, [k, *torch.randint(0, c.groups[gi].n, (b - 1,), generator=h).tolist()]

    def text_of(grp, ii, idx, h):
        if not varied:
            ci = grp.caption_of[ii]
            return c.text.ids[ci] if train_te else c.text.emb[ci]
        caps = [vary(c.text.rows[grp.caption_rows[k]], h, dropout=cfg.caption_dropout, shuffle=cfg.shuffle_caption,
                     keep_tokens=cfg.keep_tokens, token=cfg.prompt_token()) for k in idx]
        return c.text.token_ids(caps) if train_te else c.text.embeddings(caps)

    def loss_fn(ms, step, micro, g):
        if on_host:
            h = host_generator(g, micro)
            gi, idx = pick(h)
            ii = torch.tensor(idx, device=device)
        else:
            h, gi, idx = None, 0, None
            ii = torch.randint(0, c.groups[0].n, (b,), generator=g, device=device)
        grp = c.groups[gi]
        inst_text = text_of(grp, ii, idx, h)
        mean, std = grp.mean[ii], grp.std[ii]
        class_text = (class_te if train_te else class_cached)
        mask = None if grp.mask is None else grp.mask[ii]
        if base_prior:  # no RNG drawn beyond the instance half's: a resume stays exact
            x = _noised(mean, std, g)
            loss_inst = diffusion_loss(_predict(ms, x, inst_text), x.target, x.timesteps, noise_scheduler,
                                       cfg.snr_gamma, mask=mask)
            adapted = _predict(ms, x, class_text[0])
            with torch.no_grad(), base(ms) as frozen:
                loss_prior = prior_prediction_loss(adapted, _predict(frozen, x, class_text[0]))
            return {"loss": loss_inst + cfg.prior_loss_weight * loss_prior, "loss_instance": loss_inst,
                    "loss_prior": loss_prior}
        if not prior:
            x = _noised(mean, std, g)
            loss_inst = diffusion_loss(_predict(ms, x, inst_text), x.target, x.timesteps, noise_scheduler,
                                       cfg.snr_gamma, mask=mask)
            return {"loss": loss_inst, "loss_instance": loss_inst}
        jj = torch.randint(0, n_cls, (b,), generator=g, device=device)
        if same_size[gi]:  # one U-Net call for both halves
            x = _noised(torch.cat([mean, c.cls_mean[jj]]), torch.cat([std, c.cls_std[jj]]), g)
            pred = _predict(ms, x, torch.cat([inst_text, *class_text]))
            (pi, pc), (ti, tc), (si, sc) = pred.split(b), x.target.split(b), x.timesteps.split(b)
        else:  # an instance bucket other than the class images' square: two calls
            xi, xc = _noised(mean, std, g), _noised(c.cls_mean[jj], c.cls_std[jj], g)
            pi, pc = _predict(ms, xi, inst_text), _predict(ms, xc, class_text[0])
            ti, tc, si, sc = xi.target, xc.target, xi.timesteps, xc.timesteps
        loss_inst = diffusion_loss(pi, ti, si, noise_scheduler, cfg.snr_gamma, mask=mask)
        loss_prior = diffusion_loss(pc, tc, sc, noise_scheduler, cfg.snr_gamma)
        return {"loss": loss_inst + cfg.prior_loss_weight * loss_prior, "loss_instance": loss_inst,
                "loss_prior": loss_prior}

    def _noised(mean, std, g):
        latents = (mean + std * torch.randn(mean.shape, generator=g, device=device)) * c.scaling_factor
        return noise_latents(noise_scheduler, latents, g, noise_offset=cfg.noise_offset)

    def _predict(ms, x, text):
        emb = ms["text_encoder"](text)[0] if train_te else text
        return ms["unet"](x.noisy, x.timesteps, emb).sample.float()

    return loss_fn
