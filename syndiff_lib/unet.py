"""The denoising U-Net f(z_t; z_c) with concatenation fusion (paper Eq. 2, Sec. 3.4).

Taught in notebook 04 (training).

The image latent z_c and the noisy mask latent z_t are concatenated along channels:
[z_c || z_t] has 8 channels, the U-Net predicts 4. The order matters: the first four input
channels always carry the image, the last four the mask (Marigold uses the same order).

- ``tiny``/``cpu``: a small diffusers ``UNet2DModel`` built from :class:`UNetConfig`.
- ``full``: Stable Diffusion's ``UNet2DConditionModel`` with its first convolution widened
  from 4 to 8 input channels (:func:`widen_conv_in`). SD's U-Net expects text embeddings for
  cross-attention; there is no text here, so it sees a fixed all-zero embedding of one token.
  With zero keys and values, cross-attention reduces to its output bias: a constant.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from .config import UNetConfig

LATENT_CHANNELS = 4


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int = 2 * LATENT_CHANNELS) -> UNet2DConditionModel:
    """Widen conv_in from 4 to 8 input channels, keeping the pretrained behaviour.

    The pretrained kernel is repeated for both halves and halved, so a U-Net fed
    [z || z] computes exactly what it computed for z before (Marigold, Sec. 3.2).
    """
    old = unet.conv_in
    repeats = in_channels // old.in_channels
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.copy_(old.weight.repeat(1, repeats, 1, 1) / repeats)  # [C_out, 8, 3, 3]
        new.bias.copy_(old.bias)
    unet.conv_in = new.to(old.weight.device, old.weight.dtype)
    unet.register_to_config(in_channels=in_channels)
    return unet


def build_unet(cfg: UNetConfig, latent_size: int) -> UNet2DModel | UNet2DConditionModel:
    """The fused U-Net: 8 input channels ([z_c || z_t]), 4 output channels."""
    if cfg.pretrained is not None:
        unet = UNet2DConditionModel.from_pretrained(cfg.pretrained, subfolder="unet", revision=cfg.revision)
        return widen_conv_in(unet)
    n = len(cfg.block_out_channels)
    if cfg.conditional:  # SD-shaped, random init (tests and GPU benchmarks with no download)
        unet = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
            cross_attention_dim=cfg.cross_attention_dim,
            norm_num_groups=cfg.norm_num_groups,
        )
        return widen_conv_in(unet)
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=2 * LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels[:n]),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels[:n])),
        norm_num_groups=cfg.norm_num_groups,
    )


def unet_forward(
    unet: UNet2DModel | UNet2DConditionModel,
    image_latent: torch.Tensor,
    noisy_mask_latent: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """One U-Net call on the fused input: f([z_c || z_t], t) -> [B, 4, h, w]."""
    fused = torch.cat([image_latent, noisy_mask_latent], dim=1)  # [B, 8, h, w]: image first, then mask
    base = getattr(unet, "module", unet)  # under several GPUs accelerate wraps it in DistributedDataParallel
    if isinstance(base, UNet2DConditionModel):
        cross_dim = base.config.cross_attention_dim
        null_text = fused.new_zeros(fused.shape[0], 1, cross_dim)  # [B, 1, D]: the fixed "no text" embedding
        return unet(fused, timesteps, encoder_hidden_states=null_text).sample
    return unet(fused, timesteps).sample
