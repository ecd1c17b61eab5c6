"""A small mask-conditioned inpainting GAN: the GAN row of Table 3 (notebook 02, synthesis).

pix2pix (Isola et al., 2017) turned into an inpainter. The generator G sees the frame with
the mask region blanked and the mask itself, and paints the region; a PatchGAN discriminator
D judges overlapping patches of (condition, image) pairs:

    condition = [image * (1 - mask) || mask]                 x, 4 channels
    fake      = mask * G(x) + (1 - mask) * image             y~, the composite
    loss_G    = BCE(D(x, y~), 1) + l1_weight * L1_mask(y~, y)
    loss_D    = (BCE(D(x, y), 1) + BCE(D(x, y~), 0)) / 2

Blanked pixels are 0 in [-1, 1], mid grey. It is trained per fold on the fold's training
frames with polyps, their real annotations as the regions to paint, so it learns to paint a
polyp into a mask; `GANInpaintBackend` then paints into the placed masks of `synthesize`.
G has no noise input (pix2pix found its generator ignores one), so a sample varies with its
background and placement, not with its seed.

Shapes: B = batch, S = cfg.size (the GAN works on S x S copies of the frames), images in
[-1, 1] channels first, masks in {0, 1}. Files: generator.safetensors + config.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import Sample
from .synthesis import Placement, PolypPrompt, SynthesisError


@dataclass
class GANConfig:
    """Size and training of the inpainting GAN (notebook 02)."""

    size: int = 128  # S: frames are resized to S x S; the cpu profile's input size
    generator_widths: tuple = (32, 64, 128, 256)  # one stride-2 level each: 128 -> 8 px at the bottleneck
    discriminator_widths: tuple = (32, 64)  # PatchGAN of two strided levels: 34 px patches, the share of the
    # frame that pix2pix's 70 px patches are of its 256 px images
    steps: int = 2000  # ~30 passes over a ClinicDB fold's ~490 frames: CPU minutes, not pix2pix's 200 epochs
    batch_size: int = 8  # frames per step
    lr: float = 2e-4  # pix2pix's Adam settings, for G and D alike
    betas: tuple = (0.5, 0.999)  # a low beta1 keeps the adversarial game from oscillating
    l1_weight: float = 100.0  # pix2pix's lambda: L1 sets the colours, the adversarial term the texture
    seed: int = 0  # the torch.Generator of the weights and batches
    log_every: int = 100  # steps between log lines


TINY_GAN = GANConfig(size=32, generator_widths=(8, 16, 32), discriminator_widths=(8, 16), steps=5, batch_size=4,
                     log_every=1)  # tests: a fraction of a second per step
NORM_GROUPS = 8  # GroupNorm, not BatchNorm: the same output for a frame alone or in a batch; widths divide by 8


def _block(conv: nn.Module, channels: int, norm: bool, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(conv, *([nn.GroupNorm(NORM_GROUPS, channels)] if norm else []), act)


class UNetGenerator(nn.Module):
    """G: x [B, 4, S, S] -> RGB [B, 3, S, S] in [-1, 1]; pix2pix's U-Net with skips (notebook 02)."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.config, widths, n = cfg, cfg.generator_widths, len(cfg.generator_widths)
        # Down: 4 x 4 stride-2 convolutions; no norm at the input or the bottleneck (as pix2pix).
        self.downs = nn.ModuleList(
            _block(nn.Conv2d(c_in, c_out, 4, 2, 1), c_out, 0 < k < n - 1, nn.LeakyReLU(0.2))
            for k, (c_in, c_out) in enumerate(zip((4, *widths), widths)))
        # Up: the mirror image; every level after the first also reads its skip (hence 2 *).
        self.ups = nn.ModuleList(
            _block(nn.ConvTranspose2d(widths[k] * (1 if k == n - 1 else 2), widths[k - 1], 4, 2, 1),
                   widths[k - 1], True, nn.ReLU())
            for k in range(n - 1, 0, -1))
        self.to_rgb = nn.ConvTranspose2d(2 * widths[0], 3, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.downs:
            x = down(x)  # [B, w_k, S / 2^(k+1), S / 2^(k+1)]
            skips.append(x)
        skips.pop()  # the bottleneck has no skip: x is it
        for up in self.ups:
            x = torch.cat([up(x), skips.pop()], dim=1)  # [B, 2 w_(k-1), ...]
        return torch.tanh(self.to_rgb(x))  # [B, 3, S, S]


class PatchDiscriminator(nn.Module):
    """D: (x, image) [B, 7, S, S] -> one real/fake logit per patch [B, 1, P, P] (notebook 02)."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        widths, layers, c_in = cfg.discriminator_widths, [], 4 + 3
        for k, c_out in enumerate((*widths, widths[-1] * 2)):  # strided, then one stride-1 layer as pix2pix
            stride = 2 if k < len(widths) else 1
            layers.append(_block(nn.Conv2d(c_in, c_out, 4, stride, 1), c_out, k > 0, nn.LeakyReLU(0.2)))
            c_in = c_out
        self.layers = nn.Sequential(*layers, nn.Conv2d(c_in, 1, 4, 1, 1))

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([condition, image], dim=1))  # [B, 1, P, P]


def _init_weights(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """pix2pix's init, N(0, 0.02) for every convolution, drawn from `generator`."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
                module.bias.zero_()
    return model


def inpaint(model: UNetGenerator, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(composite y~, condition x) for image [B, 3, S, S] and mask [B, 1, S, S] (notebook 02).

    Outside the mask the composite is `image` itself, so G is judged only on what it paints.
    """
    condition = torch.cat([image * (1 - mask), mask], dim=1)  # [B, 4, S, S]: the region blanked to 0
    return mask * model(condition) + (1 - mask) * image, condition  # [B, 3, S, S]


def frames_to_tensors(frames: list[Sample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """images [N, 3, S, S] in [-1, 1] and masks [N, 1, S, S] in {0, 1}, resized to S x S (notebook 02)."""
    images = [cv2.resize(f.image, (size, size), interpolation=cv2.INTER_AREA) for f in frames]
    masks = [cv2.resize(f.mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) for f in frames]
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, S, S]
    return images, torch.from_numpy(np.stack(masks)).float()[:, None]  # [N, 1, S, S]


def masked_l1(fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |fake - real| over the mask's pixels and channels: the L1 term (notebook 02)."""
    return ((fake - real).abs() * mask).sum() / (3 * mask.sum()).clamp(min=1)


def train_inpainting_gan(frames: list[Sample], cfg: GANConfig, generator: torch.Generator, log=print,
                         device="cpu") -> UNetGenerator:
    """Train G and D on `frames` (the fold's training frames, nothing else) and return G (notebook 02).

    Only frames with a polyp are used; their annotations are the regions G learns to paint.
    Every random draw (weights, batches, flips) comes from `generator`. G.trained_on lists the
    frame ids, and save_gan records them, so a loaded GAN can be checked against a split.
    """
    # 1. Data: the frames with a polyp, resized to S x S once.
    with_polyp = [f for f in frames if f.mask.any()]
    if not with_polyp:
        raise SynthesisError("train_inpainting_gan: none of the frames has a polyp to learn from")
    images, masks = frames_to_tensors(with_polyp, cfg.size)  # [N, 3, S, S], [N, 1, S, S]
    # 2. Models and their optimisers (pix2pix: Adam, lr 2e-4, betas (0.5, 0.999)).
    G = _init_weights(UNetGenerator(cfg), generator).to(device)
    D = _init_weights(PatchDiscriminator(cfg), generator).to(device)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)
    bce = nn.BCEWithLogitsLoss()
    for step in range(1, cfg.steps + 1):
        # 3. A batch, flipped at random: a polyp looks the same mirrored.
        pick = torch.randint(len(with_polyp), (cfg.batch_size,), generator=generator)
        flips = torch.rand(2, generator=generator) < 0.5
        dims = [d for d, flip in zip((2, 3), flips) if flip]
        real, mask = images[pick].flip(dims).to(device), masks[pick].flip(dims).to(device)  # [B, 3|1, S, S]
        fake, condition = inpaint(G, real, mask)  # [B, 3, S, S], [B, 4, S, S]
        # 4. D: real pairs -> 1, painted pairs -> 0 (fake detached: this step does not train G).
        logits_real, logits_fake = D(condition, real), D(condition, fake.detach())  # [B, 1, P, P]
        loss_D = (bce(logits_real, torch.ones_like(logits_real)) + bce(logits_fake, torch.zeros_like(logits_fake))) / 2
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()
        # 5. G: fool D, and stay near the real polyp (L1 on the painted region only).
        logits_fake = D(condition, fake)
        loss_adv, loss_l1 = bce(logits_fake, torch.ones_like(logits_fake)), masked_l1(fake, real, mask)
        loss_G = loss_adv + cfg.l1_weight * loss_l1
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(f"gan step {step}/{cfg.steps}: L1 {loss_l1.item():.4f}  adv {loss_adv.item():.3f}  "
                f"D {loss_D.item():.3f}")
    G.trained_on = [f.id for f in with_polyp]
    return G.eval()


def save_gan(model: UNetGenerator, folder) -> Path:
    """Write folder/generator.safetensors and folder/config.json (config + training frame ids) (notebook 02)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, folder / "generator.safetensors")
    meta = {"config": asdict(model.config), "trained_on": getattr(model, "trained_on", None)}
    (folder / "config.json").write_text(json.dumps(meta, indent=1))
    return folder


def load_gan(folder, device="cpu") -> UNetGenerator:
    """The generator save_gan wrote, in eval mode, with .trained_on (notebook 02)."""
    folder = Path(folder)
    if not (folder / "generator.safetensors").is_file() or not (folder / "config.json").is_file():
        raise SynthesisError(f"{folder} holds no saved GAN (generator.safetensors + config.json)")
    meta = json.loads((folder / "config.json").read_text())
    cfg = GANConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    model = UNetGenerator(cfg)
    model.load_state_dict(load_file(folder / "generator.safetensors"))
    model.trained_on = meta["trained_on"]
    return model.to(device).eval()


def check_trained_on(model: UNetGenerator, train_ids) -> None:
    """Refuse a GAN that saw frames outside `train_ids`: they would leak into the synthetic data (notebook 02)."""
    if model.trained_on is None or set(model.trained_on) - set(train_ids):
        raise SynthesisError("the GAN was trained on frames outside this split's training frames "
                             "(or its config.json does not say); train it on this --fold and --split-seed")


class GANInpaintBackend:
    """A `synthesize` backend: the GAN paints a polyp into the placed mask (notebook 02).

    The frame and the mask are resized to the GAN's S x S, G paints inside the mask, and the
    result is resized back; outside placement.mask every pixel is the background's own.
    """

    name, revision = "gan", None

    def __init__(self, model: UNetGenerator, size: int | None = None, *, model_id: str = "pix2pix inpainting GAN",
                 device="cpu"):
        self.model, self.size = model.to(device).eval(), size or model.config.size
        self.model_id, self.device = model_id, device

    @torch.no_grad()
    def __call__(self, background: np.ndarray, placement: Placement, prompt: PolypPrompt, source: Sample,
                 seed: int) -> np.ndarray:
        height, width = background.shape[:2]
        # 1. To the GAN's size; INTER_AREA > 0 keeps every pixel the small mask touches.
        small = cv2.resize(background, (self.size, self.size), interpolation=cv2.INTER_AREA)  # [S, S, 3]
        small_mask = cv2.resize(placement.mask.astype(np.float32), (self.size, self.size),
                                interpolation=cv2.INTER_AREA) > 0  # [S, S]
        image = torch.from_numpy(small).permute(2, 0, 1)[None].float().to(self.device) / 127.5 - 1  # [1, 3, S, S]
        mask = torch.from_numpy(small_mask)[None, None].float().to(self.device)  # [1, 1, S, S]
        # 2. Paint, then back to uint8 at the frame's size.
        painted, _ = inpaint(self.model, image, mask)  # [1, 3, S, S]
        painted = ((painted[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        painted = cv2.resize(painted, (width, height), interpolation=cv2.INTER_CUBIC)  # [H, W, 3]
        # 3. Outside the mask, the background itself: the label stays honest.
        return np.where(placement.mask[..., None], painted, background)
