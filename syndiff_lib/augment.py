"""Augmentation of training batches: random flips and the paper's "traditional" rotation.

Taught in notebook 02 (synthesis, beside the synthetic data it is compared with) and used by
the training loop (``TrainConfig.flip_augment``, ``TrainConfig.rotate_augment``). Each function
changes image and mask with the same draw, so a pair stays aligned; every draw comes from the
``torch.Generator`` passed in.

    x  images [B, 3, S, S] in [-1, 1]
    y  masks  [B, 1, S, S] in {0, 1}

The paper's Table 3 row "Traditional (rotation, flip)" is both: ``flip_augment`` and
``rotate_augment`` on (see ``ablations.TRADITIONAL``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MAX_ANGLE = 20.0  # degrees: a small rotation, as a colonoscope turns; larger ones show much black corner


def random_flips(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair horizontally, then vertically, each with probability 1/2 (in place)."""
    for dim in (2, 3):
        do = torch.rand(len(x), generator=generator) < 0.5  # [B]
        x[do], y[do] = x[do].flip(dim), y[do].flip(dim)
    return x, y


def random_rotations(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                     max_angle: float = MAX_ANGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each pair about its centre by an angle uniform in [-max_angle, max_angle] degrees.

    Image bilinear, mask nearest, so the pair stays aligned; the corners the rotation uncovers
    are black (-1), like the endoscope's border, and hold no polyp.
    """
    angles = (2 * torch.rand(len(x), generator=generator) - 1) * math.radians(max_angle)  # [B]
    cos, sin = angles.cos(), angles.sin()
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)  # [B, S, S, 2]
    # grid_sample pads with 0, which is grey in [-1, 1]: shift to [0, 2] so the padding is black.
    x = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    y = F.grid_sample(y, grid.to(y.dtype), mode="nearest", padding_mode="zeros", align_corners=False)
    return x, y


def augment_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *, flip: bool,
                  rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loop's augmentation: flips if ``flip``, then a rotation if ``rotate``."""
    if flip:
        x, y = random_flips(x, y, generator)
    if rotate:
        x, y = random_rotations(x, y, generator)
    return x, y


def traditional_augment(image: np.ndarray, mask: np.ndarray, generator: torch.Generator,
                        max_angle: float = MAX_ANGLE) -> tuple[np.ndarray, np.ndarray]:
    """The paper's "traditional" augmentation of one pair, for showing it (notebook 02):
    random flips, then a small rotation. image uint8 [H, W, 3], mask bool [H, W]."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1  # [1, 3, H, W]
    y = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()  # [1, 1, H, W]
    x, y = random_flips(x, y, generator)
    x, y = random_rotations(x, y, generator, max_angle)
    image = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()  # [H, W, 3]
    return image, y[0, 0].numpy() > 0.5
