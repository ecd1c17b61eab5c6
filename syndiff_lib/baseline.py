"""The equal-budget yardstick: a plain pixel-space U-Net that predicts the mask directly.

Taught in notebooks 04 and 05. Same data, same split, same augmentation, same budget as
the SynDiff run it is compared with, and the same training loop (train.fit); no autoencoder,
no diffusion. Loss: binary cross-entropy + soft Dice on the logits, the usual recipe for
polyp segmentation. Its pipeline is pipeline.BaselinePipeline.

    syndiff train --model baseline --profile cpu --data DIR --out RUN_DIR
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from .config import Profile


def build_baseline_unet(profile: Profile) -> UNet2DModel:
    """A UNet2DModel 3 -> 1 at the image resolution, one level deeper than the latent U-Net
    (the latent U-Net works on 8x smaller maps, so this one needs the extra downsamplings)."""
    cfg = profile.unet
    widths = (cfg.block_out_channels[0] // 2, *cfg.block_out_channels)  # one more, finer level
    attention = (False,) * (len(widths) - 1) + (True,)  # self-attention only at the coarsest level: cheap
    return UNet2DModel(
        sample_size=profile.train.image_size,
        in_channels=3,
        out_channels=1,
        block_out_channels=widths,
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        norm_num_groups=min(cfg.norm_num_groups, widths[0]),
    )


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + (1 - soft Dice), per image then averaged. logits, target: [B, 1, H, W]."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = logits.sigmoid()
    inter = (prob * target).sum(dim=(1, 2, 3))
    dice = (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return bce + (1 - dice).mean()
