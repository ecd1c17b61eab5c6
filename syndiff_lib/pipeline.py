"""SynDiffPipeline: image in, mask out, in one U-Net call (diffusers style).

Taught in notebook 05 (evaluation). The flow, one way:

    image -> E_phi -> z_c ; [z_c || z_t] -> U-Net(t) -> z~_0 (Eq. 3) -> D -> mean over channels -> threshold -> mask

A trained run folder holds the pipeline in ``RUN_DIR/pipeline`` (the model chosen on the
validation split); ``from_pretrained`` accepts the run folder or that subfolder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from .autoencoder import DECODE_DOWNSCALES, ImageEncoder, build_autoencoder, decode_mask
from .config import Profile
from .data import check_fit, letterbox, unletterbox
from .diffusion import make_scheduler, multi_step, single_step
from .metrics import DEFAULT_NSD_TOLERANCE_PX, segmentation_metrics, summarize
from .unet import build_unet

CONFIG_NAME = "syndiff_config.json"
BASELINE_CONFIG = "baseline_config.json"


@dataclass
class SynDiffOutput:
    """What :class:`SynDiffPipeline` returns.

    masks:      bool    [B, H, W]  soft_masks > threshold
    soft_masks: float32 [B, H, W]  decoded mask in [0, 1] (mean of D's three channels)
    H, W are the input size (or the model's size when ``output_size="model"``).
    """

    masks: np.ndarray
    soft_masks: np.ndarray


def images_to_tensor(images, size: int) -> torch.Tensor:
    """uint8 images ([H, W, 3] arrays, a list of them, or [B, H, W, 3]) -> [B, 3, size, size] in [-1, 1]."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    tensors = []
    for image in images:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [H, W, 3] RGB arrays, got {image.dtype} {image.shape}")
        x = torch.from_numpy(image.copy()).permute(2, 0, 1).float()[None] / 127.5 - 1  # [1, 3, H, W] (a copy: read-only arrays too)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        tensors.append(x)
    return torch.cat(tensors)  # [B, 3, size, size]


def model_fit(pipe) -> str:
    """The fit ``pipe``'s model was trained with (``TrainConfig.fit``): what evaluate and
    segment use when not told otherwise. A model saved before the field existed reads as
    "stretch", the only fit it could be trained with; so does an exported graph whose
    preprocess.json does not say."""
    profile = getattr(pipe, "profile", None)
    return profile.train.fit if profile is not None else getattr(pipe, "record", {}).get("fit", "stretch")


def resolve_fit(pipe, fit: str | None) -> str:
    """``fit`` if given (an explicit choice overrides the model's), else :func:`model_fit`; checked."""
    fit = model_fit(pipe) if fit is None else fit
    check_fit(fit)
    return fit


class WeightsError(ValueError):
    """Saved weights that cannot be loaded: one line naming the folder and what to do."""


def load_model(model_class, folder: Path):
    """``model_class.from_pretrained(folder)``, with any failure as one WeightsError naming the
    folder: a truncated or damaged safetensors file, or a config.json edited so that the
    weights no longer fit it (diffusers' own hint, ignore_mismatched_sizes, would load random
    weights in their place: never what a trained run wants)."""
    try:
        return model_class.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        reason = str(error).split(". ")[0].strip() or type(error).__name__
        fits = "do not fit its config.json" if "shape" in reason else "cannot be read"
        raise WeightsError(f"{folder}: the saved weights {fits} ({reason}); the run folder is damaged or was edited: "
                           "copy it again from where it was trained, or train again") from None


def read_profile(config_file: Path) -> Profile:
    """The profile a saved pipeline was trained with, or a WeightsError naming the file."""
    try:
        return Profile.from_dict(json.loads(config_file.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(f"{config_file}: not a readable profile ({error}); copy the run folder again or train again") from None


def find_saved_model(path, config_name: str, kind: str = "SynDiff pipeline") -> Path:
    """The folder holding ``config_name``: ``path`` itself or a run folder's ``pipeline/``."""
    path = Path(path)
    if (path / "pipeline" / config_name).exists():
        path = path / "pipeline"
    if not (path / config_name).exists():
        raise FileNotFoundError(f"{path} holds no trained {kind} ({config_name} is missing)")
    return path


def soft_maps_to_output(images, soft: torch.Tensor, output_size: str, threshold: float) -> SynDiffOutput:
    """[B, 1, S, S] soft maps -> SynDiffOutput, resized back to each input image's size if asked.

    Arrays are stacked when all maps share one size, else returned as lists.
    """
    maps = []
    for image, s in zip(images, soft):
        shape = tuple(np.asarray(image).shape[:2])
        if output_size == "input" and shape != tuple(s.shape[-2:]):
            s = F.interpolate(s[None], size=shape, mode="bilinear", align_corners=False)[0]
        maps.append(s[0].numpy())
    if len({m.shape for m in maps}) == 1:
        stacked = np.stack(maps)
        return SynDiffOutput(masks=stacked > threshold, soft_masks=stacked)
    return SynDiffOutput(masks=[m > threshold for m in maps], soft_masks=maps)


@dataclass(frozen=True)
class Speed:
    """How a trained pipeline runs, not what it learned: options that trade exactness for time.

    bf16:             bfloat16 autocast (fast on CPUs with AVX512-BF16 or AMX, and on GPUs)
    channels_last:    NHWC memory layout, which oneDNN's convolutions prefer on CPUs
    decode_downscale: 2 or 4 runs D's full-resolution blocks at H/2 or H/4 and upsamples the
                      soft mask (autoencoder.decode_mask); 1 is the exact D
    The default is the exact pipeline; notebook 07 measures what each option costs in Dice.
    """

    bf16: bool = False
    channels_last: bool = False
    decode_downscale: int = 1

    def __post_init__(self):
        if self.decode_downscale not in DECODE_DOWNSCALES:
            raise ValueError(f"decode_downscale must be one of {DECODE_DOWNSCALES}, got {self.decode_downscale!r}")

    def describe(self) -> str:
        parts = ["bf16" if self.bf16 else "fp32"] + ["channels-last"] * self.channels_last
        return " + ".join(parts + ([f"decode/{self.decode_downscale}"] if self.decode_downscale > 1 else []))


class SynDiffPipeline:
    """The trained segmenter: frozen VAE (E, D), trainable image encoder E_phi, U-Net, schedule."""

    def __init__(self, vae: AutoencoderKL, image_encoder: ImageEncoder, unet, scheduler: DDPMScheduler, profile: Profile,
                 speed: Speed = Speed()):
        self.vae, self.image_encoder, self.unet, self.scheduler, self.profile = vae, image_encoder, unet, scheduler, profile
        for model in (vae, image_encoder, unet):
            model.eval()
        self.set_speed(speed)

    def set_speed(self, speed: Speed) -> "SynDiffPipeline":
        """Run with other :class:`Speed` options (the weights stay as they are)."""
        self.speed = speed
        layout = torch.channels_last if speed.channels_last else torch.contiguous_format
        for model in (self.vae, self.image_encoder, self.unet):
            model.to(memory_format=layout)
        return self

    def autocast(self):
        """The precision context of one call: bf16 autocast when ``speed.bf16``, else none."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.speed.bf16)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device=None, dtype=None) -> "SynDiffPipeline":
        for model in (self.vae, self.image_encoder, self.unet):
            model.to(device=device)
            if dtype is not None and model.dtype != dtype:
                model.to(dtype=dtype)
        return self

    @classmethod
    def from_profile(cls, profile: Profile, seed: int = 0) -> "SynDiffPipeline":
        """An untrained pipeline built from a profile (random or pretrained weights): for
        tests, benchmarks of an architecture, and notebooks that show shapes."""
        torch.manual_seed(seed)
        vae = build_autoencoder(profile.autoencoder)
        unet = build_unet(profile.unet, profile.train.image_size // 8)
        return cls(vae, ImageEncoder.from_vae(vae), unet, make_scheduler(profile.diffusion), profile)

    # --- saving and loading -------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """Write every model as safetensors (diffusers' save_pretrained) plus the profile JSON."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vae.save_pretrained(directory / "vae")
        self.image_encoder.save_pretrained(directory / "image_encoder")
        self.unet.save_pretrained(directory / "unet")
        self.scheduler.save_pretrained(directory / "scheduler")
        (directory / CONFIG_NAME).write_text(json.dumps(self.profile.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "SynDiffPipeline":
        path = find_saved_model(path, CONFIG_NAME)
        profile = read_profile(path / CONFIG_NAME)
        unet_class = UNet2DConditionModel if profile.unet.conditional else UNet2DModel
        pipe = cls(
            vae=load_model(AutoencoderKL, path / "vae"),
            image_encoder=load_model(ImageEncoder, path / "image_encoder"),
            unet=load_model(unet_class, path / "unet"),
            scheduler=load_model(DDPMScheduler, path / "scheduler"),
            profile=profile,
        )
        return pipe.to(device, dtype)

    def check_inputs(self, num_inference_steps: int = 1, t_infer: int | None = None, output_size: str = "input") -> None:
        """Refuse options that cannot run, before any work (diffusers' check_inputs): a short
        ValueError naming the argument and its command-line flag."""
        T = self.scheduler.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps (--steps) must be an integer >= 1, got {num_inference_steps!r}")
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps (--steps) must be at most T = {T}, got {num_inference_steps}")
        if t_infer is not None and (not isinstance(t_infer, int) or not 0 <= t_infer < T):
            raise ValueError(f"t_infer (--t-infer) must be a timestep in 0..{T - 1}, got {t_infer!r}")
        if output_size not in ("input", "model"):
            raise ValueError(f"output_size must be 'input' or 'model', got {output_size!r}")

    # --- the three stages, each one call (bench times them one by one) -----------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """z_c = E_phi(C): [B, 3, H, W] in [-1, 1] -> [B, 4, h, w]."""
        layout = torch.channels_last if self.speed.channels_last else torch.contiguous_format
        return self.image_encoder(pixels.to(self.device, self.dtype).contiguous(memory_format=layout))

    def denoise(self, image_latent, num_inference_steps: int = 1, t_infer: int | None = None, generator=None):
        """z~_0 from z_c: one U-Net call at t_infer (default: the recipe's), or DDIM with T steps."""
        cfg = self.profile.diffusion
        if num_inference_steps == 1:
            t = cfg.t_infer if t_infer is None else t_infer
            return single_step(self.unet, self.scheduler, cfg, image_latent, t, generator)
        return multi_step(self.unet, self.scheduler, cfg, image_latent, num_inference_steps, generator)

    def decode(self, mask_latent) -> torch.Tensor:
        """Soft mask [B, 1, H, W] in [0, 1] from z~_0 (with ``speed.decode_downscale``'s D)."""
        return decode_mask(self.vae, mask_latent, self.speed.decode_downscale)

    @torch.no_grad()
    def __call__(
        self,
        images,
        num_inference_steps: int = 1,
        t_infer: int | None = None,
        generator: torch.Generator | None = None,
        threshold: float = 0.5,
        batch_size: int = 16,
        output_size: str = "input",
    ) -> SynDiffOutput:
        """Segment uint8 RGB images. Same generator seed -> same masks.

        Args:
            images: one [H, W, 3] uint8 array or a list of them (sizes may differ).
            num_inference_steps: 1 = the paper's single step; > 1 = DDIM from the same weights.
            t_infer: the single-step timestep (default: the trained recipe's; the paper uses 50).
            generator: torch.Generator for the Gaussian z_t (CPU generator).
            output_size: "input" resizes maps back to each image's size; "model" keeps image_size.
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        self.check_inputs(num_inference_steps, t_infer, output_size)
        size = self.profile.train.image_size
        soft_maps = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = images_to_tensor(chunk, size)  # [b, 3, S, S]
            with self.autocast():
                image_latent = self.encode_images(pixels)  # [b, 4, S/8, S/8]
                mask_latent = self.denoise(image_latent, num_inference_steps, t_infer, generator)
                soft_maps.append(self.decode(mask_latent).float().cpu())  # [b, 1, S, S]
        return soft_maps_to_output(images, torch.cat(soft_maps), output_size, threshold)


class BaselinePipeline:
    """The pixel-space baseline's model (baseline.py) with the same output as SynDiffPipeline:
    images in, SynDiffOutput out, so evaluate, segment and the notebooks treat both alike.
    It has no diffusion, so no steps, timestep or noise to choose."""

    def __init__(self, unet: UNet2DModel, profile: Profile):
        self.unet, self.profile = unet.eval(), profile

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device=None, dtype=None) -> "BaselinePipeline":
        # Like SynDiffPipeline.to: cast only when the dtype differs (diffusers warns on every cast).
        self.unet.to(device=device)
        if dtype is not None and self.unet.dtype != dtype:
            self.unet.to(dtype=dtype)
        return self

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        (directory / BASELINE_CONFIG).write_text(json.dumps(self.profile.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "BaselinePipeline":
        path = find_saved_model(path, BASELINE_CONFIG, kind="baseline")
        profile = read_profile(path / BASELINE_CONFIG)
        return cls(load_model(UNet2DModel, path / "unet"), profile).to(device, dtype)

    @torch.no_grad()
    def __call__(self, images, threshold: float = 0.5, batch_size: int = 16, output_size: str = "input") -> SynDiffOutput:
        """Segment uint8 RGB images: sigmoid of the U-Net's logits, thresholded."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        if output_size not in ("input", "model"):
            raise ValueError(f"output_size must be 'input' or 'model', got {output_size!r}")
        size = self.profile.train.image_size
        soft = []
        for start in range(0, len(images), batch_size):
            pixels = images_to_tensor(images[start : start + batch_size], size).to(self.device, self.unet.dtype)
            soft.append(self.unet(pixels, 0).sample.sigmoid().float().cpu())  # [b, 1, S, S]
        return soft_maps_to_output(images, torch.cat(soft), output_size, threshold)


def check_segment_options(pipe, num_inference_steps: int = 1, t_infer: int | None = None) -> None:
    """Refuse inference options that ``pipe`` cannot honour, before any image is read: the
    baseline has no steps or timestep to choose; SynDiff's must be in range (check_inputs)."""
    if isinstance(pipe, BaselinePipeline):
        if num_inference_steps != 1 or t_infer is not None:
            raise ValueError("the baseline has no diffusion: --steps and --t-infer apply to SynDiff runs only")
    else:
        pipe.check_inputs(num_inference_steps, t_infer)


def segment(pipe, images, num_inference_steps: int = 1, t_infer: int | None = None, seed: int = 0,
            output_size: str = "input") -> SynDiffOutput:
    """Run either pipeline on images: SynDiff with its steps, timestep and noise seed; the
    baseline, which has none of them, refuses any but the defaults instead of ignoring them."""
    check_segment_options(pipe, num_inference_steps, t_infer)
    if isinstance(pipe, BaselinePipeline):
        return pipe(images, output_size=output_size)
    return pipe(images, num_inference_steps, t_infer, torch.Generator().manual_seed(seed), output_size=output_size)


def segment_files(pipe, files, out_dir: Path, num_inference_steps: int = 1, t_infer: int | None = None, seed: int = 0,
                  batch_size: int = 16, fit: str | None = None) -> int:
    """Segment image files into ``out_dir/<stem>.png`` (0/255 masks at each image's size),
    batch by batch: read a batch, segment it, write it, so memory stays that of one batch
    however many files there are. Returns the number of masks written. ``fit``: "stretch"
    (each frame squeezed to the model's square) or "letterbox" (data.letterbox); None, the
    default, is the fit the model was trained with (:func:`model_fit`).

    The caller has checked the files (data.files_to_segment: readable, distinct mask names).
    One noise generator runs through all batches, so the masks are those of one call on all
    the images at once.
    """
    from PIL import Image

    from .data import read_image

    check_segment_options(pipe, num_inference_steps, t_infer)
    fit = resolve_fit(pipe, fit)
    generator = torch.Generator().manual_seed(seed)
    written = 0
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images, boxes = [read_image(f) for f in chunk], None
        if fit == "letterbox":
            images, boxes = letterbox(images)
        if isinstance(pipe, BaselinePipeline):
            out = pipe(images, batch_size=batch_size)
        else:
            out = pipe(images, num_inference_steps, t_infer, generator, batch_size=batch_size)
        masks = out.masks if boxes is None else unletterbox(out.masks, boxes)  # [H, W] each, its image's size
        for f, mask in zip(chunk, masks):
            target = out_dir / f"{Path(f).stem}.png"
            try:
                Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(target)
            except OSError as error:  # a full disk, a folder made read-only: name the file
                target.unlink(missing_ok=True)  # no half-written mask left behind
                raise OSError(error.errno, f"cannot write the mask ({error.strerror or error}); "
                              f"{written} of {len(files)} masks were written", str(target)) from None
            written += 1
    return written


def predict_native(pipe, images, num_inference_steps: int = 1, t_infer: int | None = None, seed: int = 0,
                   fit: str | None = None) -> list[np.ndarray]:
    """The bool masks [H, W] of ``images`` at each image's own size: each frame made square by
    ``fit`` ("stretch" or "letterbox"; None: the model's own, :func:`segment_files`), segmented
    in one call of :func:`segment`, and the mask taken back to the frame (for a letterbox, its
    padding cut off)."""
    fit = resolve_fit(pipe, fit)
    boxes = None
    if fit == "letterbox":
        images, boxes = letterbox(images)
    out = segment(pipe, images, num_inference_steps, t_infer, seed, output_size="input")
    return [np.asarray(m) for m in out.masks] if boxes is None else unletterbox(out.masks, boxes)


def evaluate(
    pipe,
    samples,
    num_inference_steps: int = 1,
    t_infer: int | None = None,
    seed: int = 0,
    nsd_tolerance_px: float | None = None,
    fit: str | None = None,
) -> tuple[dict, dict]:
    """Dice, IoU, HD95 and NSD of ``pipe`` (SynDiff or baseline) on ``samples``, at the samples'
    resolution: each prediction is resized to its sample's size, which may differ from sample
    to sample (Kvasir-SEG at native resolution). ``fit``: as in :func:`segment_files` (None:
    the model's own).

    Returns (summary, per_image): summary has the means, *_std, n and the fit used (see
    metrics.summarize).
    """
    fit = resolve_fit(pipe, fit)
    preds = predict_native(pipe, [s.image for s in samples], num_inference_steps, t_infer, seed, fit)  # [H, W] each
    targets = [s.mask for s in samples]  # [H, W] each
    tolerance = DEFAULT_NSD_TOLERANCE_PX if nsd_tolerance_px is None else nsd_tolerance_px
    per_image = {}
    for shape in dict.fromkeys(t.shape for t in targets):  # one call per image size: metrics take [N, H, W]
        at = [i for i, t in enumerate(targets) if t.shape == shape]
        scores = segmentation_metrics(np.stack([preds[i] for i in at]), np.stack([targets[i] for i in at]),
                                      nsd_tolerance_px=tolerance)
        for name, values in scores.items():
            per_image.setdefault(name, np.empty(len(samples), values.dtype))[at] = values
    per_image["id"] = np.array([s.id for s in samples])
    summary = summarize({k: v for k, v in per_image.items() if k != "id"})
    summary.update(nsd_tolerance_px=tolerance, seed=seed, fit=fit)
    if isinstance(pipe, SynDiffPipeline):
        summary.update(steps=num_inference_steps, t_infer=pipe.profile.diffusion.t_infer if t_infer is None else t_infer)
    return summary, per_image


def load_pipeline(path, device="cpu", dtype=torch.float32):
    """A trained run's model, whichever kind it is: SynDiff or the pixel-space baseline."""
    path = Path(path)
    for folder in (path / "pipeline", path):
        if (folder / BASELINE_CONFIG).exists():
            return BaselinePipeline.from_pretrained(folder, device, dtype)
    return SynDiffPipeline.from_pretrained(path, device, dtype)
