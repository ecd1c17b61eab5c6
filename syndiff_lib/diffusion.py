"""Forward diffusion, direct latent estimation (Eq. 1-6), single- and multi-step inference.

Taught in notebooks 03 (forward diffusion, Eq. 1), 04 (the dual loss, Eq. 3-6) and
05 (single-step inference and the t_infer study).

Notation (paper symbol -> name here):
    z_0                 mask_latent          [B, 4, h, w]
    z_c                 image_latent         [B, 4, h, w]
    n                   noise                [B, 4, h, w]
    z_t                 noisy_mask_latent    [B, 4, h, w]
    \\bar\\alpha_t        alphas_cumprod[t]
    \\tilde n            noise_pred
    \\tilde z_0          mask_latent_pred

The schedules are diffusers' (DDPM for training, DDIM for multi-step inference): we only
write the few lines that are the paper's own.

Dividing by sqrt(alpha_bar_t). Eq. 3 recovers z_0 from an epsilon-prediction by dividing by
sqrt(alpha_bar_t), which is 0.068 at t = 999 on SD's schedule (and 0 with a zero-terminal-SNR
schedule). Any error in the predicted noise is multiplied by up to 1/0.068 ~ 15 there. We
(1) do this arithmetic in float32 whatever the model dtype, and (2) clamp sqrt(alpha_bar_t)
from below at ``MIN_SQRT_ALPHA_BAR`` so a zero-SNR step cannot divide by zero. The
``sample`` and ``v_prediction`` parameterisations avoid the division altogether; that is one
reason the default recipe predicts z_0 directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from .config import DiffusionConfig
from .autoencoder import decoder_loss
from .unet import unet_forward

MIN_SQRT_ALPHA_BAR = 1e-3


def make_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training schedule (DDPM) with the paper's T = 1000 steps and SD's betas."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_zero_terminal_snr,
        timestep_spacing="trailing",  # so that a schedule can end at t = T - 1
        clip_sample=False,  # latents are not in [-1, 1]
    )


def _alpha_terms(scheduler, timesteps: torch.Tensor, like: torch.Tensor):
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped [B, 1, 1, 1], float32."""
    alphas_cumprod = scheduler.alphas_cumprod.to(like.device, torch.float32)[timesteps.long()]  # [B]
    sqrt_alpha_bar = alphas_cumprod.sqrt().view(-1, 1, 1, 1)
    sqrt_one_minus_alpha_bar = (1 - alphas_cumprod).sqrt().view(-1, 1, 1, 1)
    return sqrt_alpha_bar, sqrt_one_minus_alpha_bar


def add_noise(scheduler, mask_latent, noise, timesteps) -> torch.Tensor:
    """Eq. 1: z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) n (diffusers' add_noise)."""
    return scheduler.add_noise(mask_latent, noise, timesteps)


def predict_x0_from_noise(scheduler, noisy_mask_latent, noise_pred, timesteps) -> torch.Tensor:
    """Eq. 3: z~_0 = (z_t - sqrt(1 - alpha_bar_t) n~) / sqrt(alpha_bar_t), in float32, clamped."""
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = _alpha_terms(scheduler, timesteps, noisy_mask_latent)
    z_t, n = noisy_mask_latent.float(), noise_pred.float()
    return (z_t - sqrt_one_minus_alpha_bar * n) / sqrt_alpha_bar.clamp(min=MIN_SQRT_ALPHA_BAR)


def split_prediction(scheduler, model_output, noisy_mask_latent, timesteps, prediction_type: str):
    """Turn the U-Net's output into (z~_0, n~), whatever it was trained to predict.

    - "epsilon" (the paper): output = n~, and z~_0 by Eq. 3.
    - "sample": output = z~_0, and n~ = (z_t - sqrt(alpha_bar) z~_0) / sqrt(1 - alpha_bar).
    - "v_prediction": output = v~, z~_0 = sqrt(alpha_bar) z_t - sqrt(1 - alpha_bar) v~,
      n~ = sqrt(1 - alpha_bar) z_t + sqrt(alpha_bar) v~ (Salimans & Ho 2022).
    """
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = _alpha_terms(scheduler, timesteps, noisy_mask_latent)
    z_t, out = noisy_mask_latent.float(), model_output.float()
    if prediction_type == "epsilon":
        return predict_x0_from_noise(scheduler, z_t, out, timesteps), out
    if prediction_type == "sample":
        return out, (z_t - sqrt_alpha_bar * out) / sqrt_one_minus_alpha_bar.clamp(min=MIN_SQRT_ALPHA_BAR)
    if prediction_type == "v_prediction":
        return sqrt_alpha_bar * z_t - sqrt_one_minus_alpha_bar * out, sqrt_one_minus_alpha_bar * z_t + sqrt_alpha_bar * out
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def sample_timesteps(cfg: DiffusionConfig, batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
    """t ~ U{1..T} as in the paper (Sec. 3.4; index 0..T-1 in diffusers), or a fixed t."""
    if cfg.timestep_sampling == "uniform":
        t = torch.randint(0, cfg.num_train_timesteps, (batch_size,), generator=generator)
    elif cfg.timestep_sampling == "fixed":
        t = torch.full((batch_size,), cfg.fixed_timestep)
    else:
        raise ValueError(f"unknown timestep_sampling {cfg.timestep_sampling!r}")
    return t.to(device)


def balanced_l1(mask_latent_pred, mask_latent, mask) -> torch.Tensor:
    """Not in the paper: Eq. 5's L1, with the polyp's latent cells and the background's
    weighing half each in every image (a polyp of 2 % of the frame otherwise weighs 2 %).

    A latent cell is "polyp" when any pixel it covers is (max-pooling the mask [B, 1, H, W]
    to the latent grid). Images with no polyp fall back to the plain mean.
    """
    err = (mask_latent_pred.float() - mask_latent.float()).abs()  # [B, 4, h, w]
    factor = mask.shape[-1] // mask_latent.shape[-1]  # 8 for SD's autoencoder
    polyp = F.max_pool2d(mask.float(), factor).expand_as(err)  # [B, 4, h, w] in {0, 1}
    background = 1 - polyp

    def mean_over(weight):
        return (err * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3)).clamp(min=1)

    balanced = 0.5 * mean_over(polyp) + 0.5 * mean_over(background)  # [B]
    per_image = torch.where(polyp.sum((1, 2, 3)) > 0, balanced, err.mean((1, 2, 3)))  # [B]
    return per_image.mean()


def training_loss(unet, scheduler, cfg: DiffusionConfig, image_latent,
                  mask_latent, generator: torch.Generator, vae=None, mask=None):
    """The dual loss of Eq. 4-6: L = ||n - n~||_1 + lambda * ||z_0 - z~_0||_1.

    With ``cfg.decoder_loss_weight`` > 0 (not the paper), :func:`decoder_loss`
    is added; it needs the frozen ``vae`` and the pixel ``mask`` [B, 1, H, W].
    Returns (loss, {"loss_noise": ..., "loss_latent": ...}) with detached
    floats in the dict.
    """
    # 1. Draw t and n, and noise the mask latent (Eq. 1).
    B = mask_latent.shape[0]
    timesteps = sample_timesteps(cfg, B, generator, mask_latent.device)  # [B]
    noise = torch.randn(mask_latent.shape,
                        generator=generator).to(mask_latent)  # [B, 4, h, w]
    noisy_mask_latent = add_noise(scheduler, mask_latent, noise,
                                  timesteps)  # [B, 4, h, w]
    # 2. One U-Net call on [z_c || z_t] (Eq. 2).
    model_output = unet_forward(unet, image_latent, noisy_mask_latent,
                                timesteps)  # [B, 4, h, w]
    # 3. Direct latent estimation (Eq. 3) and the noise estimate, whatever the
    #    parameterisation.
    mask_latent_pred, noise_pred = split_prediction(
        scheduler, model_output, noisy_mask_latent, timesteps,
        cfg.prediction_type
    )
    # 4. Dual supervision (Eq. 4-6).
    loss_noise = F.l1_loss(noise_pred, noise.float())  # Eq. 4
    if cfg.latent_loss == "l1":
        loss_latent = F.l1_loss(mask_latent_pred, mask_latent.float())  # Eq. 5
    elif cfg.latent_loss == "balanced_l1":
        loss_latent = balanced_l1(mask_latent_pred, mask_latent, mask)
    else:
        raise ValueError(f"unknown latent_loss {cfg.latent_loss!r}")
    loss = loss_noise + cfg.lambda_latent * loss_latent  # Eq. 6
    parts = {"loss_noise": loss_noise.item(), "loss_latent": loss_latent.item()}
    # 5. (Optional, beyond the paper) supervise the decoded mask itself.
    if cfg.decoder_loss_weight > 0:
        # The first k of the batch.
        k = max(1, round(cfg.decoder_loss_fraction * len(mask)))
        loss_decoder = decoder_loss(vae, mask_latent_pred[:k], mask[:k])
        loss = loss + cfg.decoder_loss_weight * loss_decoder
        parts["loss_decoder"] = loss_decoder.item()
    return loss, parts


def single_step(unet, scheduler, cfg: DiffusionConfig, image_latent, t_infer: int,
                generator: torch.Generator | None = None, noise=None):
    """Single-step inference (Sec. 3.5): z_t = n ~ N(0, I), one U-Net call at t_infer, then Eq. 3.

    The paper feeds pure Gaussian noise as z_t at t = 50. Pass ``noise`` to control it
    (e.g. zeros, or a properly noised latent in the diagnostics of notebook 05).
    """
    if noise is None:
        noise = torch.randn(image_latent.shape, generator=generator).to(image_latent)  # [B, 4, h, w]
    B = image_latent.shape[0]
    timesteps = torch.full((B,), t_infer, device=image_latent.device, dtype=torch.long)  # [B]
    model_output = unet_forward(unet, image_latent, noise, timesteps)  # [B, 4, h, w]
    mask_latent_pred, _ = split_prediction(scheduler, model_output, noise, timesteps,
                                           cfg.prediction_type)
    return mask_latent_pred  # [B, 4, h, w]


def multi_step(unet, scheduler, cfg: DiffusionConfig, image_latent, num_steps: int,
               generator: torch.Generator | None = None):
    """Multi-step DDIM sampling (eta = 0) from the same weights: the paper's T = 50/100 rows.

    With "trailing" spacing the first step is at t = T - 1; one DDIM step from t = 999 to the
    end returns exactly the single-step z~_0 at t_infer = 999 (tested).
    """
    ddim = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=True)
    ddim.set_timesteps(num_steps, device=image_latent.device)
    latent = torch.randn(image_latent.shape, generator=generator).to(image_latent)  # z_T ~ N(0, I)
    for t in ddim.timesteps:
        timesteps = t.expand(image_latent.shape[0])
        model_output = unet_forward(unet, image_latent, latent, timesteps)
        latent = ddim.step(model_output, t, latent).prev_sample
    return latent.float()  # [B, 4, h, w]
