"""Augmentation of training batches: random flips, the paper's "traditional" rotation, a
random zoom, and photometric changes.

Taught in notebook 02 (synthesis, beside the synthetic data it is compared with) and used by
the training loop (``TrainConfig.flip_augment``, ``TrainConfig.rotate_augment``,
``TrainConfig.zoom_augment``, ``TrainConfig.photometric_augment``). The geometric functions change image and mask with the
same draw, so a pair stays aligned; the photometric ones change the image only, since a
polyp under other light, out of focus or compressed is still where it was. Every draw comes
from the ``torch.Generator`` passed in.

    x  images [B, 3, S, S] in [-1, 1]
    y  masks  [B, 1, S, S] in {0, 1}

The paper's Table 3 row "Traditional (rotation, flip)" is both: ``flip_augment`` and
``rotate_augment`` on (see ``ablations.TRADITIONAL``). The photometric changes are not in the
paper: they imitate what differs between endoscopes and data sets (the light and colour of a
camera, its focus, Kvasir-SEG's JPEG compression against ClinicDB's lossless frames). Nor is
the zoom: it imitates a colonoscope nearer to or farther from the polyp, so that a model trained
on one data set's polyp sizes meets others (the multi-scale training of the polyp literature).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MAX_ANGLE = 20.0  # degrees: a small rotation, as a colonoscope turns; larger ones show much black corner
# Zoom factors, drawn log-uniform: above 1 the polyp looks larger (a crop of the frame, blown up),
# below 1 smaller (the frame shrunk inside a black border). Wider on the near side: a frame cropped
# by 1.5 still shows most of a polyp, one shrunk by 1.5 shows as much border as frame.
ZOOM = (0.8, 1.5)

# Photometric ranges: each factor is drawn uniformly in [1 - spread, 1 + spread]. Mild on purpose:
# the mucosa must stay the pink-red it is under any endoscope's light.
BRIGHTNESS = 0.2  # exposure and distance to the light
CONTRAST = 0.2
SATURATION = 0.2
HUE = 0.03  # of a full turn of hue: a camera's white balance; more would turn mucosa green or purple
BLUR_SIGMA = (0.1, 1.5)  # pixels: from sharp to an out-of-focus or moving camera
BLUR_PROBABILITY = 0.5  # most frames are sharp enough; blur half of them
JPEG_QUALITY = (30, 95)  # the range of qualities web and archive copies of frames are saved at
JPEG_PROBABILITY = 0.5  # half the frames re-compressed, half left as they are

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B in the grey level Y
# RGB -> YIQ (BT.601): Y is the grey level, I and Q the two colour axes; a hue shift turns (I, Q).
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


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


def random_zooms(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                 zoom: tuple[float, float] = ZOOM) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom each pair by a factor s drawn log-uniform in ``zoom``, at a random place.

    s > 1: a window of 1/s of the frame's side, anywhere inside it, is blown up to the full size;
    s < 1: the whole frame, shrunk by s, sits anywhere inside a black border. In the grid's
    coordinates ([-1, 1] across the frame), an output point p reads the input at p / s + t with
    |t| <= |1 - 1/s|, which keeps the window inside the frame (or the frame inside the output).
    Image bilinear, mask nearest, as for the rotations.
    """
    n = len(x)
    s = torch.exp(_uniform(n, math.log(zoom[0]), math.log(zoom[1]), generator))  # [B]
    reach = (1 - 1 / s).abs()  # [B]
    t = (2 * torch.rand(n, 2, generator=generator) - 1) * reach[:, None]  # [B, 2]: x and y shifts
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([1 / s, zero, t[:, 0]], 1),
                         torch.stack([zero, 1 / s, t[:, 1]], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)  # [B, S, S, 2]
    x = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1  # black border
    y = F.grid_sample(y, grid.to(y.dtype), mode="nearest", padding_mode="zeros", align_corners=False)
    return x, y


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """n draws uniform in [low, high]."""
    return low + (high - low) * torch.rand(n, generator=generator)  # [n]


def colour_jitter(x: torch.Tensor, generator: torch.Generator, brightness: float = BRIGHTNESS,
                  contrast: float = CONTRAST, saturation: float = SATURATION, hue: float = HUE) -> torch.Tensor:
    """Change each image's brightness, contrast, saturation and hue by random factors (a new tensor).

    With u the image in [0, 1] and Y its grey level (LUMA), in this order, each clipped to [0, 1]:
    brightness u * b; contrast (u - mean Y) * c + mean Y; saturation (u - Y) * s + Y; hue a
    rotation of the (I, Q) colour plane of YIQ by h turns, which keeps the grey level Y.
    """
    n = len(x)
    b, c, s = (_uniform(n, 1 - spread, 1 + spread, generator).view(n, 1, 1, 1) for spread in
               (brightness, contrast, saturation))  # [B, 1, 1, 1] each
    angle = 2 * math.pi * _uniform(n, -hue, hue, generator)  # [B]
    luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)

    u = (x + 1) / 2  # [B, 3, H, W] in [0, 1]
    # 1. Brightness.
    u = (u * b.to(u)).clamp(0, 1)
    # 2. Contrast: stretch about the image's mean grey level.
    mean_grey = (u * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # [B, 1, 1, 1]
    u = ((u - mean_grey) * c.to(u) + mean_grey).clamp(0, 1)
    # 3. Saturation: move each pixel away from (or towards) its own grey level.
    grey = (u * luma).sum(1, keepdim=True)  # [B, 1, H, W]
    u = ((u - grey) * s.to(u) + grey).clamp(0, 1)
    # 4. Hue: RGB -> YIQ, turn (I, Q) by the angle, back to RGB, as one 3x3 matrix per image.
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros(n), torch.ones(n)
    turn = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                        torch.stack([zero, sin, cos], 1)], 1)  # [B, 3, 3]
    matrix = YIQ_TO_RGB @ turn @ RGB_TO_YIQ  # [B, 3, 3]
    u = torch.einsum("bij,bjhw->bihw", matrix.to(u), u).clamp(0, 1)  # [B, 3, H, W]
    return u * 2 - 1


def gaussian_blur(x: torch.Tensor, generator: torch.Generator, sigma: tuple[float, float] = BLUR_SIGMA,
                  probability: float = BLUR_PROBABILITY) -> torch.Tensor:
    """Blur each image, with the given probability, by a Gaussian of standard deviation uniform in
    ``sigma`` pixels (a new tensor). The kernel is separable and 3 sigma wide on each side; the
    edges are extended by their own pixels, so the black border stays black."""
    do = torch.rand(len(x), generator=generator) < probability  # [B]
    sigmas = _uniform(len(x), *sigma, generator)  # [B], drawn for every image: the draws do not depend on `do`
    out = x.clone()
    for i in do.nonzero()[:, 0].tolist():
        radius = math.ceil(3 * sigmas[i].item())
        taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-taps**2 / (2 * sigmas[i].item() ** 2))
        kernel = kernel / kernel.sum()  # [2r + 1]
        image = F.pad(x[i:i + 1], (radius, radius, radius, radius), mode="replicate")  # [1, 3, H + 2r, W + 2r]
        image = F.conv2d(image, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)  # along W
        out[i] = F.conv2d(image, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]  # along H: [3, H, W]
    return out


def jpeg_artefacts(x: torch.Tensor, generator: torch.Generator, quality: tuple[int, int] = JPEG_QUALITY,
                   probability: float = JPEG_PROBABILITY) -> torch.Tensor:
    """Save each image, with the given probability, as a JPEG of quality uniform in ``quality``
    (PIL) and read it back: blocks and ringing as a compressed copy of a frame has (a new tensor)."""
    do = torch.rand(len(x), generator=generator) < probability  # [B]
    qualities = torch.randint(quality[0], quality[1] + 1, (len(x),), generator=generator)  # [B]
    out = x.clone()
    for i in do.nonzero()[:, 0].tolist():
        pixels = ((x[i].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()  # [H, W, 3] uint8
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(qualities[i]))
        decoded = np.asarray(Image.open(buffer).convert("RGB"))  # [H, W, 3] uint8
        out[i] = torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(x) / 127.5 - 1
    return out


def photometric_augment(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Images only, in the order a frame is made: the light (colour jitter), the optics (blur),
    the codec (JPEG). Returns a new tensor [B, 3, S, S] in [-1, 1]; masks need no change.
    ``strength`` scales the colour spreads and the blur and JPEG probabilities (at most 1):
    1 is the training augmentation, 0 changes nothing (notebook 08's simulated shift)."""
    if strength == 0:
        return x.clone()
    x = colour_jitter(x, generator, brightness=BRIGHTNESS * strength, contrast=CONTRAST * strength,
                      saturation=SATURATION * strength, hue=HUE * strength)
    x = gaussian_blur(x, generator, probability=min(1.0, BLUR_PROBABILITY * strength))
    return jpeg_artefacts(x, generator, probability=min(1.0, JPEG_PROBABILITY * strength))


def augment_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *, flip: bool,
                  rotate: bool, photometric: bool = False, zoom: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loop's augmentation: photometric changes of the images if ``photometric``,
    flips if ``flip``, a zoom if ``zoom``, then a rotation if ``rotate``. The photometric changes
    come first, so the black border a zoom or rotation uncovers stays black, like the endoscope's
    border. An option that is off draws nothing: the batches of the others stay as they were."""
    if photometric:
        x = photometric_augment(x, generator)
    if flip:
        x, y = random_flips(x, y, generator)
    if zoom:
        x, y = random_zooms(x, y, generator)
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
