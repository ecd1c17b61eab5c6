"""The frozen KL autoencoder (E, D) and the trainable image encoder (paper Sec. 3.1, 3.4).

Taught in notebook 03 (latent space).

Notation (B = batch, H x W = image size, h x w = H/8 x W/8 = latent size):
    mask      X in {0, 1}   [B, 1, H, W]
    image     C in [-1, 1]  [B, 3, H, W]
    z_0 = E(X) * s          [B, 4, h, w]   mask latent; s = vae.config.scaling_factor
    z_c = E_phi(C) * s      [B, 4, h, w]   image latent from the trainable encoder E_phi

A mask is a 1-channel image; SD's autoencoder wants 3 channels in [-1, 1], so a mask goes
1 -> 3 channels (repeated) -> [-1, 1] -> E. Decoding reverses it: D -> mean over the three
channels -> [0, 1] soft map -> threshold 0.5.

At the ``tiny`` and ``cpu`` scales there are no pretrained weights to download, so (E, D) is
trained here (:func:`train_autoencoder`, then :func:`finetune_mask_decoder`) and cached by
:func:`get_autoencoder` under ``$SYNDIFF_CACHE`` (default ``~/.cache/syndiff``): every run on
the same training frames with the same config shares one, as runs at the ``full`` scale
share SD's pretrained VAE.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Encoder
from diffusers.models.modeling_utils import ModelMixin

from .checkpoint import made_once
from .config import AutoencoderConfig, Profile


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """E and D: a pretrained SD VAE (``cfg.pretrained``) or a fresh one of the same structure."""
    if cfg.pretrained is not None:
        return AutoencoderKL.from_pretrained(cfg.pretrained, subfolder=cfg.subfolder, revision=cfg.revision)
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.crop_size,
    )


def mask_to_vae_input(mask: torch.Tensor) -> torch.Tensor:
    """{0,1} mask [B, 1, H, W] -> 3-channel image in [-1, 1] [B, 3, H, W]."""
    return (mask.float() * 2 - 1).repeat(1, 3, 1, 1)


@torch.no_grad()
def encode_mask(vae: AutoencoderKL, mask: torch.Tensor) -> torch.Tensor:
    """z_0 = E(X) * s. Uses the posterior mean, so the same mask always gives the same z_0."""
    x = mask_to_vae_input(mask).to(vae.dtype)  # [B, 3, H, W]
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor  # [B, 4, h, w]


def decode_mask(vae: AutoencoderKL, latent: torch.Tensor, downscale: int = 1) -> torch.Tensor:
    """Soft mask in [0, 1] [B, 1, H, W] = (mean over channels of D(z / s) + 1) / 2.

    ``downscale`` = 2 or 4 is a faster, approximate D: it skips the interpolation of D's
    last one or two upsamplers, so the blocks that run at full resolution (most of D's cost, though a mask
    is smooth there) run at H/2 or H/4, and the soft mask is upsampled bilinearly to H x W.
    D is fully convolutional, so the same weights apply; how much Dice this costs is
    measured, not assumed (``bench.speed_options``).
    """
    z = latent.to(vae.dtype) / vae.config.scaling_factor
    if downscale == 1:
        x = vae.decode(z).sample  # [B, 3, H, W]
    else:
        x = decode_skipping_upsamplers(vae, z, skip=int(math.log2(downscale)))  # [B, 3, H/d, W/d]
    soft = ((x.float().mean(dim=1, keepdim=True) + 1) / 2).clamp(0, 1)  # [B, 1, H/d, W/d]
    if downscale != 1:
        soft = F.interpolate(soft, scale_factor=downscale, mode="bilinear", align_corners=False)
    return soft


DECODE_DOWNSCALES = (1, 2, 4)


def decode_skipping_upsamplers(vae: AutoencoderKL, z: torch.Tensor, skip: int) -> torch.Tensor:
    """D(z) without the interpolation of its last ``skip`` upsamplers: diffusers'
    Decoder.forward, step by step."""
    decoder = vae.decoder
    upsampling = [i for i, block in enumerate(decoder.up_blocks) if block.upsamplers is not None]
    if not 0 <= skip <= len(upsampling):
        raise ValueError(f"D has {len(upsampling)} upsamplers; cannot skip {skip}")
    skipped = set(upsampling[len(upsampling) - skip:])
    x = decoder.conv_in(vae.post_quant_conv(z) if vae.post_quant_conv is not None else z)
    x = decoder.mid_block(x, None)
    for i, block in enumerate(decoder.up_blocks):
        for resnet in block.resnets:
            x = resnet(x, temb=None)
        for upsampler in block.upsamplers or ():
            # A skipped upsampler keeps its convolution and drops only the 2x interpolation
            # before it, so every layer of D still runs, on a smaller grid.
            x = upsampler.conv(x) if i in skipped else upsampler(x)
    return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x)))


class ImageEncoder(ModelMixin, ConfigMixin):
    """E_phi: the trainable vision encoder, with E's architecture (paper Sec. 3.4).

    Built by :meth:`from_vae`, which copies E's weights (encoder + quant_conv), so training
    starts from the autoencoder's own image features. Returns the posterior mean times the
    scaling factor, i.e. a latent on the same scale as z_0.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        scaling_factor: float = 0.18215,
    ):
        super().__init__()
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            double_z=True,  # mean and log-variance, as in E
        )
        self.quant_conv = torch.nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)

    @classmethod
    def from_vae(cls, vae: AutoencoderKL) -> "ImageEncoder":
        c = vae.config
        model = cls(
            in_channels=c.in_channels,
            latent_channels=c.latent_channels,
            down_block_types=tuple(c.down_block_types),
            block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block,
            norm_num_groups=c.norm_num_groups,
            act_fn=c.act_fn,
            scaling_factor=c.scaling_factor,
        )
        model.encoder.load_state_dict(vae.encoder.state_dict())
        model.quant_conv.load_state_dict(vae.quant_conv.state_dict())
        return model.to(vae.device) if vae.dtype == torch.float32 else model.to(vae.device, vae.dtype)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(image))  # [B, 8, h, w]
        mean = moments[:, : self.config.latent_channels]  # [B, 4, h, w]
        return mean * self.config.scaling_factor


def autoencoder_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, generator=None) -> torch.Tensor:
    """L1 reconstruction + a small KL term (LDM's KL-regularised autoencoder, without the GAN)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    return F.l1_loss(recon, x) + kl_weight * posterior.kl().mean()


def random_autoencoder_batch(
    images: torch.Tensor, masks: torch.Tensor, cfg: AutoencoderConfig, generator: torch.Generator
) -> torch.Tensor:
    """A batch of random crops: a fraction ``cfg.mask_fraction`` are masks (as 3-channel images).

    images [N, 3, H, W] in [-1, 1], masks [N, 1, H, W] in {0, 1} -> [B, 3, crop, crop].
    """
    n, _, height, width = images.shape
    crop = min(cfg.crop_size, height, width)
    n_masks = round(cfg.batch_size * cfg.mask_fraction)
    batch = []
    for i in range(cfg.batch_size):
        k = int(torch.randint(n, (1,), generator=generator))
        top = int(torch.randint(height - crop + 1, (1,), generator=generator))
        left = int(torch.randint(width - crop + 1, (1,), generator=generator))
        if cfg.polyp_crops and masks[k].any():
            # A crop that holds a random polyp pixel: most of a frame is background, and a
            # crop of plain background teaches the autoencoder nothing about polyp outlines.
            ys, xs = torch.nonzero(masks[k, 0], as_tuple=True)
            j = int(torch.randint(len(ys), (1,), generator=generator))
            top = min(max(int(ys[j]) - int(torch.randint(crop, (1,), generator=generator)), 0), height - crop)
            left = min(max(int(xs[j]) - int(torch.randint(crop, (1,), generator=generator)), 0), width - crop)
        if i < n_masks:
            x = mask_to_vae_input(masks[k : k + 1])[0]
        else:
            x = images[k]
        batch.append(x[:, top : top + crop, left : left + crop])
    return torch.stack(batch)  # [B, 3, crop, crop]


def decoder_loss(vae, mask_latent_pred, mask) -> torch.Tensor:
    """A pixel-space loss through the decoder D: the mask-decoder fine-tune's loss, and (not
    in the paper, as in E2E-FT) the segmenter's optional loss on its decoded mask.

    x = mean over channels of D(z~_0 / s), nominally in [-1, 1]; loss = L1(x, 2X - 1) +
    (1 - soft Dice of (x + 1) / 2 against X). Gradients flow through D into the U-Net.
    """
    x = vae.decode(mask_latent_pred.to(vae.dtype) / vae.config.scaling_factor).sample.float().mean(1, keepdim=True)  # [B, 1, H, W]
    target = mask.float()  # [B, 1, H, W] in {0, 1}
    prob = ((x + 1) / 2).clamp(0, 1)
    dice = (2 * (prob * target).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return F.l1_loss(x, target * 2 - 1) + (1 - dice).mean()


def mask_round_trip_dice(vae: AutoencoderKL, masks: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Dice of threshold(D(E(X))) against X, per mask: the ceiling the autoencoder puts on us."""
    dices = []
    with torch.no_grad():
        for i in range(0, len(masks), batch_size):
            x = masks[i : i + batch_size].float()
            pred = (decode_mask(vae, encode_mask(vae, x)) > 0.5).float()
            inter = (pred * x).sum(dim=(1, 2, 3))
            total = pred.sum(dim=(1, 2, 3)) + x.sum(dim=(1, 2, 3))
            dices.append(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)))
    return torch.cat(dices)


def finetune_mask_decoder(
    vae: AutoencoderKL, masks: torch.Tensor, cfg: AutoencoderConfig, generator: torch.Generator, log=print
) -> dict:
    """Fine-tune the decoder D alone on whole training masks: L1 + soft Dice of D(E(X)) vs X.

    The reconstruction L1 of :func:`train_autoencoder` counts pixels, so a polyp of 1 % of
    the frame hardly matters to it, and small polyps are what the round trip loses. Soft Dice
    counts images. E is left as it is, so every mask latent z_0 (the segmenter's target)
    stays the same; only the way latents are turned back into masks improves.
    masks [N, 1, H, W] in {0, 1}, random flips; ``cfg.mask_decoder_steps`` steps of
    ``cfg.batch_size`` masks, AdamW at ``cfg.mask_decoder_lr`` with a cosine decay.
    """
    decoder = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for p in decoder:
        p.requires_grad_(True)
    vae.decoder.train()
    optimizer = torch.optim.AdamW(decoder, lr=cfg.mask_decoder_lr)
    start, loss_ema = time.time(), None
    for step in range(cfg.mask_decoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.mask_decoder_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.mask_decoder_steps))
        x = masks[torch.randint(len(masks), (cfg.batch_size,), generator=generator)].float()  # [B, 1, H, W]
        for dim in (2, 3):
            if torch.rand(1, generator=generator) < 0.5:
                x = x.flip(dim)
        loss = decoder_loss(vae, encode_mask(vae, x), x)  # the segmenter's optional pixel loss; no gradient into E
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if (step + 1) % 100 == 0:
            log(f"mask decoder step {step + 1}: loss {loss_ema:.4f}")
    vae.eval()
    vae.requires_grad_(False)
    return {"steps": cfg.mask_decoder_steps, "seconds": round(time.time() - start, 1), "loss": loss_ema}


def train_autoencoder(
    vae: AutoencoderKL,
    images: torch.Tensor,
    masks: torch.Tensor,
    cfg: AutoencoderConfig,
    generator: torch.Generator,
    log=print,
) -> dict:
    """Train E and D on crops of training images and masks (tiny/cpu profiles only).

    Trains ``cfg.train_steps`` steps, with a cosine learning-rate decay over them; the
    ``cfg.train_minutes`` safety cap may stop it earlier (the summary's "steps" says so).
    Returns a small summary.
    """
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    start, step = time.time(), 0
    budget_s = cfg.train_minutes * 60
    loss_ema = None
    while step < cfg.train_steps and time.time() - start < budget_s:
        for group in optimizer.param_groups:  # cosine decay
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.train_steps))
        x = random_autoencoder_batch(images, masks, cfg, generator)
        loss = autoencoder_loss(vae, x, cfg.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        step += 1
        if step % 100 == 0:
            log(f"autoencoder step {step}: loss {loss_ema:.4f}")
    vae.eval()
    vae.requires_grad_(False)
    return {"steps": step, "seconds": round(time.time() - start, 1), "loss": loss_ema}


# --- the frozen autoencoder of a run: trained once, then cached -----------------------------
MASK_DECODER_FIELDS = ("mask_decoder_steps", "mask_decoder_lr")  # the second stage: keyed on its own
NOT_IN_KEY = ("train_minutes",)  # a safety cap defines no model: only complete trainings are cached


def autoencoder_cache_key(profile: Profile, train_ids, data, seed: int, stage: str = "autoencoder") -> str:
    """The cache key of the trained (E, D) ("autoencoder") or of it after the mask-decoder
    fine-tune ("mask_decoder"); the first stage's key ignores the second stage's settings,
    so changing those reuses the cached first stage."""
    cfg = {k: v for k, v in profile.autoencoder.__dict__.items() if k not in NOT_IN_KEY}
    if stage == "autoencoder":
        cfg = {k: v for k, v in cfg.items() if k not in MASK_DECODER_FIELDS}
    places = [str(d) if str(d) == "toy" else str(Path(d).resolve())  # one key whatever the working folder
              for d in (data if isinstance(data, (list, tuple)) else [data])]
    where = places[0] if len(places) == 1 else places  # one data set keeps the key it always had
    blob = json.dumps([cfg, profile.train.image_size, sorted(train_ids), where, seed], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_autoencoder(profile: Profile, images, masks, train_ids, data, run_dir: Path, seed: int, log=print,
                    record: dict | None = None) -> AutoencoderKL:
    """The frozen (E, D): from the run folder, the cache, the hub (``full``), or trained now.

    Trained here in two cached stages: (E, D) on crops of images and masks
    (:func:`train_autoencoder`), then, if ``mask_decoder_steps`` > 0, D alone on whole masks
    (:func:`finetune_mask_decoder`). ``record`` (a dict, if given) gets
    "autoencoder_complete": False when the wall-clock cap stopped the training before its
    steps (said loudly, and not cached), else True.
    """
    cfg = profile.autoencoder
    complete = True
    if (run_dir / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(run_dir / "vae")
    elif cfg.pretrained is not None:
        vae = build_autoencoder(cfg)
    else:
        cache = Path(os.environ.get("SYNDIFF_CACHE", Path.home() / ".cache" / "syndiff")) / "autoencoders"
        first = cache / autoencoder_cache_key(profile, train_ids, data, seed)
        second = cache / autoencoder_cache_key(profile, train_ids, data, seed, stage="mask_decoder")
        # Two runs on the same training frames (two grid lanes on one fold) train it once.
        with made_once(second if cfg.mask_decoder_steps > 0 else first, log):
            if cfg.mask_decoder_steps > 0 and (second / "config.json").exists():
                log(f"autoencoder: using the cached one (with its fine-tuned mask decoder) in {second}")
                vae = AutoencoderKL.from_pretrained(second)
            else:
                if (first / "config.json").exists():
                    log(f"autoencoder: using the cached one in {first}")
                    vae = AutoencoderKL.from_pretrained(first)
                else:
                    log(f"autoencoder: training it on {len(images)} training images and masks "
                        "(no pretrained weights offline)")
                    torch.manual_seed(seed)  # the initial weights
                    vae = build_autoencoder(cfg)
                    summary = train_autoencoder(vae, images, masks, cfg, torch.Generator().manual_seed(seed), log)
                    log(f"autoencoder: {summary['steps']} steps in {summary['seconds']} s")
                    if cfg.unit_std_latents:
                        set_unit_std_scaling(vae, masks, log)
                    complete = summary["steps"] == cfg.train_steps
                    if complete:  # only a complete training is shared with later runs
                        vae.save_pretrained(first)
                    else:
                        log(f"WARNING: the autoencoder's {cfg.train_minutes:g}-minute safety cap stopped it "
                            f"after {summary['steps']} of {cfg.train_steps} steps: not the profile's autoencoder, "
                            "so not cached (results.json: \"autoencoder_complete\": false)")
                if cfg.mask_decoder_steps > 0:
                    log(f"autoencoder: fine-tuning D on whole training masks for {cfg.mask_decoder_steps} steps "
                        "(L1 + soft Dice)")
                    summary = finetune_mask_decoder(vae, masks, cfg, torch.Generator().manual_seed(seed), log)
                    log(f"autoencoder: mask decoder {summary['steps']} steps in {summary['seconds']} s")
                    if complete:
                        vae.save_pretrained(second)
        vae.save_pretrained(run_dir / "vae")
    vae.eval().requires_grad_(False)
    if record is not None:
        record["autoencoder_complete"] = complete
    return vae


def set_unit_std_scaling(vae: AutoencoderKL, masks: torch.Tensor, log=print) -> float:
    """LDM's rule for a new autoencoder: scaling_factor s = 1 / std(E(X)), so z_0 has unit
    variance like the noise n it is mixed with in Eq. 1 (SD's 0.18215 belongs to SD's
    own image latents, not to the latents of masks from an autoencoder trained here)."""
    vae.register_to_config(scaling_factor=1.0)
    with torch.no_grad():
        std = torch.cat([encode_mask(vae, masks[i : i + 32]) for i in range(0, len(masks), 32)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"autoencoder: scaling_factor = 1 / {std:.4f} = {1 / std:.4f}")
    return 1.0 / std
