"""The equal-budget yardstick: a plain pixel-space U-Net that predicts the mask directly.

Taught in notebooks 04 and 05. Same data, same split, same augmentation, same wall-clock
budget as the SynDiff run it is compared with; no autoencoder, no diffusion. Loss: binary
cross-entropy + soft Dice on the logits, the usual recipe for polyp segmentation.

    syndiff train --model baseline --profile cpu --data DIR --out RUN_DIR
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import UNet2DModel

from . import data as data_lib
from .config import Profile
from .pipeline import SynDiffOutput, find_saved_model, images_to_tensor, soft_maps_to_output
from .train import log_line

BASELINE_CONFIG = "baseline_config.json"


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


class BaselinePipeline:
    """Same call as SynDiffPipeline (images in, SynDiffOutput out), for `syndiff evaluate`."""

    def __init__(self, unet: UNet2DModel, profile: Profile):
        self.unet, self.profile = unet.eval(), profile

    @property
    def device(self):
        return self.unet.device

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        (directory / BASELINE_CONFIG).write_text(json.dumps(self.profile.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "BaselinePipeline":
        path = find_saved_model(path, BASELINE_CONFIG, kind="baseline")
        profile = Profile.from_dict(json.loads((path / BASELINE_CONFIG).read_text()))
        return cls(UNet2DModel.from_pretrained(path / "unet").to(device), profile)

    @torch.no_grad()
    def __call__(self, images, num_inference_steps=1, t_infer=None, generator=None, threshold=0.5,
                 batch_size=16, output_size="input") -> SynDiffOutput:
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        size = self.profile.train.image_size
        soft = []
        for start in range(0, len(images), batch_size):
            pixels = images_to_tensor(images[start : start + batch_size], size).to(self.device)
            soft.append(self.unet(pixels, 0).sample.sigmoid().float().cpu())  # [b, 1, S, S]
        return soft_maps_to_output(images, torch.cat(soft), output_size, threshold)


def train_baseline(profile: Profile, data, out, *, seed: int = 0, fold=None, folds: int = 5, synthetic=(), log=log_line) -> dict:
    """Train the baseline under the profile's step and wall-clock budget; best-on-validation is kept."""
    from .train import (
        averaged_weights, budget_cosine_schedule, hardware_info, make_ema, prepare_data, progress_bar, random_batch,
        samples_to_tensors, validation_dice,
    )

    run_dir, tcfg = Path(out), profile.train
    accelerator = Accelerator(mixed_precision=tcfg.mixed_precision)
    train_samples, val_samples, split = prepare_data(data, tcfg.image_size, seed, fold, folds, synthetic)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_lib.save_split(split, run_dir / "split.json")
    images, masks = samples_to_tensors(train_samples)
    torch.manual_seed(seed)
    unet = build_baseline_unet(profile)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    start = time.time()
    lr_scheduler = budget_cosine_schedule(optimizer, tcfg.lr_warmup_steps, tcfg.max_steps, tcfg.max_minutes * 60,
                                          lambda: time.time() - start)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    generator = torch.Generator().manual_seed(seed)
    parameters = list(unet.parameters())
    ema = make_ema(parameters, tcfg.ema_decay)  # the same weight average as the SynDiff run gets
    best, best_step, best_weights, step = -1.0, None, None, 0

    def score_and_keep(weights: str) -> float:
        """Validation Dice of the weights the U-Net holds now; kept in RUN_DIR/pipeline if best so far."""
        nonlocal best, best_step, best_weights
        pipe = BaselinePipeline(accelerator.unwrap_model(unet), profile)
        dice = validation_dice(pipe, val_samples, seed)
        unet.train()
        if dice > best:
            best, best_step, best_weights = dice, step, weights
            shutil.rmtree(run_dir / "pipeline", ignore_errors=True)
            pipe.save_pretrained(run_dir / "pipeline")
        return dice

    def validate(record: dict) -> None:
        if ema is not None:
            record["val_dice_raw"] = score_and_keep("raw")
        with averaged_weights(ema, parameters):
            record["val_dice"] = score_and_keep("raw" if ema is None else "ema")
        raw = f" (raw weights {record['val_dice_raw']:.3f})" if ema is not None else ""
        log(f"baseline step {step}: validation Dice {record['val_dice']:.3f}{raw} (best {best:.3f}, {best_weights} weights)")

    log_file = run_dir / "log.jsonl"
    log(f"baseline: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters; {len(train_samples)} train, {len(val_samples)} val")
    bar = progress_bar(tcfg.max_steps, "baseline")
    stop_reason = "max_steps"
    while step < tcfg.max_steps:
        if time.time() - start > tcfg.max_minutes * 60:
            stop_reason = "time budget"
            break
        pixels, target = random_batch(images, masks, tcfg.batch_size, generator, tcfg.flip_augment, tcfg.rotate_augment)
        with accelerator.autocast():
            loss = bce_dice_loss(unet(pixels.to(accelerator.device), 0).sample.float(), target.to(accelerator.device))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), tcfg.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(parameters)
        step += 1
        bar.update(1)
        record = {"step": step, "loss": loss.item(), "elapsed_s": round(time.time() - start, 1)}
        is_val = step % tcfg.val_every == 0 or step == tcfg.max_steps
        if is_val:
            validate(record)
        if is_val or step % tcfg.log_every == 0:
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
    bar.close()
    if best_step is None or (step % tcfg.val_every and step != tcfg.max_steps):  # the steps since the last validation
        record = {"step": step, "elapsed_s": round(time.time() - start, 1)}
        validate(record)
        with open(log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
    results = {
        "model": "baseline", "profile": profile.name, "config": profile.to_dict(), "seed": seed,
        "data": split["data"], "split": {k: len(split[k]) for k in ("train", "val", "test")} | {"scheme": split["scheme"]},
        "steps": step, "stop_reason": stop_reason, "train_seconds": round(time.time() - start, 1),
        "best_step": best_step, "best_weights": best_weights, "val_dice": best, "hardware": hardware_info(accelerator),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results
