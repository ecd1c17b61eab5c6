"""Configuration as plain Python: one dataclass per concern, profiles are instances.

Taught in notebook 04 (training). Three profiles share one code path:

- ``tiny``: a smoke run. Small models built from configs, 64x64 inputs; a whole
  train + evaluate on real CVC-ClinicDB takes a few minutes on a laptop CPU.
- ``cpu``: the scale the published book shows: 2 CPU cores, 3000 training steps.

Every profile defines its models by step counts (the autoencoder's ``train_steps``, the
segmenter's ``max_steps``, the baseline's ``baseline_steps``), so a busy machine trains the
same model as a quiet one, only later. The wall-clock fields (``train_minutes``,
``max_minutes``) are safety caps: a run they stop says so loudly and in ``results.json``
(``"complete": false``), and the autoencoder they stop is not cached.
- ``full``: the paper's settings (Sec. 4.2) for a GPU: pretrained Stable Diffusion VAE and
  U-Net from the hub, 256x256 inputs, AdamW lr 1e-5, batch 4, 100k steps.

And two recipes for the diffusion part (see :data:`RECIPES`):

- ``paper``: exactly the paper: epsilon-prediction, t ~ U{1..1000}, loss L1(noise) +
  lambda * L1(latent), single step at t = 50 from pure noise.
- ``default``: what works at small scale, each change measured on a validation split (the
  measurements are in the book, book/single-step.md and notebooks 04-06): the U-Net predicts
  the mask latent z_0 directly ("sample" prediction) at one fixed, high timestep t = 999 in
  training and inference; Eq. 5's latent L1 with each image's polyp and background latent
  cells weighing half each (``latent_loss="balanced_l1"``, so a small polyp is not drowned
  by the background); mask latents at unit variance; lr 5e-4 with a cosine decay over the
  step budget. An extra loss on the decoded mask D(z~_0) (``decoder_loss_weight``, E2E-FT style)
  is available but off: its steps are dearer and it lost at an equal wall-clock budget.

Beside the recipe, the ``cpu`` profile keeps an exponential moving average of the trainable
weights (``TrainConfig.ema_decay``, the baseline gets the same): every validation scores the
raw and the averaged weights and the better one on validation is kept, so the log says what
the average bought.

At the ``cpu`` profile the autoencoder gets a second, cached training stage
(``mask_decoder_steps``): D alone, on whole training masks, with L1 + soft Dice.

:func:`check_profile` refuses settings that contradict each other, and
:func:`describe_recipe` names a recipe with every field changed from its named one, so a
run's ``results.json`` says what was trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class AutoencoderConfig:
    """The frozen KL autoencoder (E, D) of paper Sec. 3.1."""

    pretrained: str | None = None  # hub id or folder of a pretrained VAE; None -> build from this config and train it
    revision: str | None = None  # hub revision (commit hash) of `pretrained`, for reproducibility
    subfolder: str | None = None  # e.g. "vae" inside a Stable Diffusion repository
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)  # 4 blocks -> 8x downsampling, like SD's VAE
    layers_per_block: int = 1  # SD uses 2; 1 is enough for masks and halves the cost
    norm_num_groups: int = 32  # GroupNorm groups; must divide every block width
    latent_channels: int = 4  # as in SD: z in R^{h x w x 4}
    # Training it ourselves (only when `pretrained` is None: nothing can be downloaded offline).
    train_steps: int = 3000  # optimisation steps on images and masks (once per data and config: it is cached)
    # A safety cap on wall-clock time, far above what train_steps take even on a busy machine:
    # the step count defines the model; a capped training is said loudly and never cached.
    train_minutes: float = 180.0
    batch_size: int = 8
    crop_size: int = 64  # random crops: the autoencoder is fully convolutional
    lr: float = 5e-4
    kl_weight: float = 1e-6  # the small KL term of LDM's KL-autoencoder
    mask_fraction: float = 0.75  # fraction of each batch that is masks: their round trip caps the Dice
    polyp_crops: bool = True  # crops hold a polyp pixel (random crops are mostly plain background)
    unit_std_latents: bool = True  # set scaling_factor = 1 / std of the training mask latents (LDM's rule)
    # Then D alone, on whole training masks, with L1 + soft Dice (each mask weighs the same,
    # however small its polyp); E, and so every z_0, stays as it was. 0 steps = skip.
    mask_decoder_steps: int = 0
    mask_decoder_lr: float = 1e-4
    # Its own seed, not the run's: trainings with other seeds share one autoencoder, as runs
    # at the `full` scale share SD's pretrained VAE.
    seed: int = 0


@dataclass
class UNetConfig:
    """The denoising U-Net f of Eq. 2; it sees [z_c || z_t] (8 channels) and predicts 4."""

    pretrained: str | None = None  # SD repository for `full` (its "unet" subfolder); None -> from this config
    revision: str | None = None
    conditional: bool = False  # True -> UNet2DConditionModel (SD's), False -> UNet2DModel (smaller)
    block_out_channels: tuple[int, ...] = (64, 128, 256)
    layers_per_block: int = 1
    attention_levels: tuple[bool, ...] = (False, True, True)  # self-attention at the coarser levels
    norm_num_groups: int = 32
    cross_attention_dim: int = 768  # only for the conditional (SD) U-Net; it sees a fixed zero embedding


@dataclass
class DiffusionConfig:
    """How the U-Net is trained and queried (paper Sec. 3.3 and 3.5)."""

    recipe: str = "default"  # name of this recipe, recorded in results
    num_train_timesteps: int = 1000  # T
    beta_schedule: str = "scaled_linear"  # SD's schedule: beta from 0.00085 to 0.012
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_zero_terminal_snr: bool = False  # Lin et al. 2024: make alpha_bar_T = 0
    prediction_type: str = "sample"  # "epsilon" (paper), "sample" (z_0 directly) or "v_prediction"
    timestep_sampling: str = "fixed"  # "uniform" (paper: t ~ U{1..1000}) or "fixed" (always t = fixed_timestep)
    fixed_timestep: int = 999  # used when timestep_sampling == "fixed"; t_infer must then be the same t
    lambda_latent: float = 1.0  # lambda in Eq. 6; 0 -> the paper's "noise loss only" ablation
    t_infer: int = 999  # the single inference timestep (paper: 50)
    decoder_loss_weight: float = 0.0  # not in the paper: soft Dice + L1 on D(z~_0) vs the mask (E2E-FT style); 0 = off
    decoder_loss_fraction: float = 1.0  # the share of each batch the decoder loss sees (decoding is the dear part)
    latent_loss: str = "balanced_l1"  # "l1" (paper, Eq. 5) or "balanced_l1": polyp and background latent cells weigh half each


RECIPES: dict[str, DiffusionConfig] = {
    "paper": DiffusionConfig(
        recipe="paper", prediction_type="epsilon", timestep_sampling="uniform", t_infer=50, decoder_loss_weight=0.0,
        latent_loss="l1",
    ),
    "default": DiffusionConfig(recipe="default"),
}


FITS = ("stretch", "letterbox")  # the values of TrainConfig.fit and of `--fit`


@dataclass
class TrainConfig:
    """The optimisation loop (paper Sec. 4.2: AdamW, lr 1e-5, batch 4, 100k steps)."""

    image_size: int = 128  # square input side; latents are image_size / 8
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-2  # AdamW's default
    lr_warmup_steps: int = 50
    max_steps: int = 3000  # SynDiff's training budget in steps: the model a profile defines
    # The baseline's budget: the steps that cost the pixel U-Net what max_steps cost SynDiff
    # (equal compute; its steps are dearer). Each profile sets it from `syndiff bench --train-step`.
    baseline_steps: int = 915
    # A safety cap on wall-clock time, not a budget: a run it stops is marked incomplete.
    max_minutes: float = 180.0
    checkpoint_every: int = 200  # steps between resumable checkpoints
    val_every: int = 200  # steps between validation passes (model selection uses validation only)
    log_every: int = 10
    # "no" | "fp16" | "bf16" (accelerate's autocast) | "auto": bf16 where the hardware has it
    # natively, else fp32 (train.resolve_mixed_precision); results.json records what it chose.
    # fp32 by default, though bf16 trained as well in the precision grid: baseline_steps gives the
    # two models equal compute by fp32 step costs, and bf16 cuts the two costs by different
    # factors on different CPUs, so an "auto" default would make that budget unequal on some.
    mixed_precision: str = "no"
    freeze_encoder: bool = False  # ablation: keep the image encoder at E's weights
    flip_augment: bool = True  # random horizontal/vertical flips
    rotate_augment: bool = False  # + rotation in [-20, 20] degrees: the paper's "traditional" augmentation (Table 3)
    # Not in the paper: colour jitter, blur and JPEG artefacts on the images (augment.py), for
    # frames from other endoscopes (Kvasir-SEG beside ClinicDB). Off here, on in the cpu profile,
    # where the cross-dataset experiments chose it (generalisation.py, notebook 08).
    photometric_augment: bool = False
    # Not in the paper either: a random zoom in [0.8, 1.5] (augment.random_zooms), for data sets
    # that film their polyps nearer or farther than the training set does. Off in every profile.
    zoom_augment: bool = False
    # How a training frame and its mask become the image_size square (data.load_dataset):
    # "stretch" squeezes them (the aspect ratio is lost), "letterbox" pads them with black /
    # background to a square first (data.letterbox), as `--fit letterbox` does at inference.
    # The saved model records it, and evaluate / segment use it unless told otherwise.
    fit: str = "stretch"
    grad_clip: float = 1.0
    # Not in the paper: an exponential moving average of the trainable weights (diffusers'
    # EMAModel with its warm-up, decay capped here). 0 = off. When on, every validation scores
    # the raw and the averaged weights, and the better of the two on validation is kept.
    ema_decay: float = 0.0

    def steps(self, model: str = "syndiff") -> int:
        """The training budget of ``model`` ("syndiff" or "baseline"), in steps."""
        return self.baseline_steps if model == "baseline" else self.max_steps


@dataclass
class Profile:
    """Everything a run needs, by concern."""

    name: str
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        def build(klass, values):
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {klass.__name__} fields: {sorted(unknown)}")
            return klass(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        return cls(
            name=d["name"],
            autoencoder=build(AutoencoderConfig, d["autoencoder"]),
            unet=build(UNetConfig, d["unet"]),
            diffusion=build(DiffusionConfig, d["diffusion"]),
            train=build(TrainConfig, d["train"]),
        )


TINY = Profile(
    name="tiny",
    autoencoder=AutoencoderConfig(
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
        train_steps=300, train_minutes=60.0, crop_size=64,
    ),
    unet=UNetConfig(block_out_channels=(32, 64), attention_levels=(False, True), norm_num_groups=8),
    # The caps are generous: 300 steps, not the clock, end both trainings even on a loaded laptop.
    # baseline_steps: 300 x (SynDiff's / the baseline's seconds per step, `syndiff bench --train-step tiny`).
    train=TrainConfig(
        image_size=64, batch_size=8, lr=5e-4, lr_warmup_steps=10, max_steps=300, baseline_steps=108,
        max_minutes=60.0, checkpoint_every=100, val_every=100,
    ),
)

# lr 5e-4, not the paper's 1e-5: a CPU budget is a few thousand steps, not 100k, and at 1e-4
# the model had not begun to segment by the end of a tiny run. The mask-decoder fine-tune
# (once: cached) lifts the mask round trip, the ceiling of every Dice the segmenter can reach.
# The budget is a step count, the one the published run reached on two cores, so that a busy
# machine trains the same model; the 3-hour cap only stops a run that is stuck. The baseline's
# steps are max_steps x the ratio of the two step times in results/cpu-clinicdb/budget.json
# (`syndiff bench --train-step cpu` on two quiet cores). EMA of the weights: see TrainConfig.
# Photometric augmentation: a model trained on one hospital's frames meets another's light,
# colours and codec; of the changes tried against that, it is the one Kvasir-SEG's selection
# frames chose for a ClinicDB-trained SynDiff (notebook 08), at no cost on ClinicDB's own.
CPU = Profile(
    name="cpu",
    autoencoder=AutoencoderConfig(mask_decoder_steps=400, mask_decoder_lr=2e-4),
    train=TrainConfig(lr=5e-4, max_steps=3000, baseline_steps=915, max_minutes=180.0, ema_decay=0.999,
                      photometric_augment=True),
)

# The paper's scale. The ids below are the public Stable Diffusion 1.5 weights (the paper
# says "pre-trained Stable Diffusion weights" without naming a version); pin `revision` to a
# commit hash when you run it so the run is reproducible.
SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
FULL = Profile(
    name="full",
    autoencoder=AutoencoderConfig(pretrained=SD_REPO, subfolder="vae"),
    unet=UNetConfig(pretrained=SD_REPO, conditional=True),
    # The recipe that segments (see the module docstring); `--config paper` trains the paper's as written.
    diffusion=RECIPES["default"],
    train=TrainConfig(  # baseline_steps: the same count (no measurement at this scale yet)
        image_size=256, batch_size=4, lr=1e-5, lr_warmup_steps=500, max_steps=100_000, baseline_steps=100_000,
        max_minutes=24 * 60, checkpoint_every=2000, val_every=2000, log_every=50,
        mixed_precision="bf16",
    ),
)

# The same architecture with random weights: SD 1.5's VAE and U-Net shapes built from configs.
# For GPU benchmarks and tests of the `full` code path where nothing can be downloaded.
FULL_RANDOM = Profile(
    name="full-random",
    autoencoder=AutoencoderConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    unet=UNetConfig(
        conditional=True, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        attention_levels=(True, True, True, False), cross_attention_dim=768,
    ),
    diffusion=RECIPES["default"],
    train=FULL.train,
)

PROFILES: dict[str, Profile] = {"tiny": TINY, "cpu": CPU, "full": FULL, "full-random": FULL_RANDOM}


def get_profile(name: str, recipe: str | None = None) -> Profile:
    """A fresh copy of a profile, optionally with another diffusion recipe."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    profile = Profile.from_dict(PROFILES[name].to_dict())
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
        profile.diffusion = dataclasses.replace(RECIPES[recipe])
    return profile


def check_profile(profile: Profile) -> None:
    """Refuse settings that would be silently ignored or contradict each other (ValueError, one line)."""
    d, t = profile.diffusion, profile.train
    if d.timestep_sampling == "fixed" and d.t_infer != d.fixed_timestep:
        raise ValueError(f"t_infer {d.t_infer} differs from the fixed training timestep {d.fixed_timestep}: a model "
                         "trained at one t is queried there (use --fixed-timestep T, which sets both)")
    for name, value in (("t_infer", d.t_infer), ("fixed_timestep", d.fixed_timestep)):
        if not 0 <= value < d.num_train_timesteps:
            raise ValueError(f"{name} must be in 0..{d.num_train_timesteps - 1}, got {value}")
    if d.decoder_loss_weight == 0 and d.decoder_loss_fraction != 1.0:
        raise ValueError("decoder_loss_fraction has no effect while decoder_loss_weight is 0")
    if not 0 < d.decoder_loss_fraction <= 1:
        raise ValueError(f"decoder_loss_fraction must be in (0, 1], got {d.decoder_loss_fraction}")
    if d.lambda_latent < 0:
        raise ValueError(f"lambda_latent must be >= 0, got {d.lambda_latent}")
    for name in ("max_steps", "baseline_steps", "image_size", "batch_size", "checkpoint_every", "val_every", "log_every"):
        if getattr(t, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(t, name)}")
    if t.max_minutes <= 0 or t.lr <= 0:
        raise ValueError(f"max_minutes and lr must be > 0, got {t.max_minutes} and {t.lr}")
    if not 0 <= t.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {t.fit!r}")


def changed_fields(config, reference) -> dict:
    """{field: value} of a config dataclass where it differs from ``reference`` (same class)."""
    ours, theirs = dataclasses.asdict(config), dataclasses.asdict(reference)
    return {k: v for k, v in ours.items() if theirs[k] != v and k != "recipe"}


def describe_recipe(cfg: DiffusionConfig) -> str:
    """The recipe's name, with every field changed from that named recipe: "default" or, say,
    "default (lambda_latent=0.0)". results.json records it, so an override cannot hide."""
    base = RECIPES.get(cfg.recipe)
    changed = changed_fields(cfg, base) if base is not None else {}
    return cfg.recipe + (" (" + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")" if changed else "")


def profile_overrides(profile: Profile) -> dict:
    """Every field of ``profile`` that differs from the named profile it started from, as
    {"train.max_steps": 600, ...} (the recipe's own fields are compared with the named recipe)."""
    if profile.name not in PROFILES:
        return {}
    named = get_profile(profile.name, recipe=profile.diffusion.recipe if profile.diffusion.recipe in RECIPES else None)
    out = {}
    for part in ("autoencoder", "unet", "diffusion", "train"):
        out |= {f"{part}.{k}": v for k, v in changed_fields(getattr(profile, part), getattr(named, part)).items()}
    return out


def recipe_warning(cfg: DiffusionConfig) -> str | None:
    """One line of warning for a recipe that asks a single step to predict the noise at a low t
    from pure noise (the paper's as written), or None. At such a t, Eq. 3 returns nearly the
    z_t it was given, and z_t is noise: the step cannot recover the mask from it."""
    low = cfg.t_infer < cfg.num_train_timesteps // 2
    if cfg.prediction_type == "epsilon" and low:
        return (f"WARNING: single-step inference at t = {cfg.t_infer} from pure noise with epsilon-prediction: at that t "
                "the step returns nearly the noise it starts from; the default recipe (z_0 at t = 999) is the one that "
                "segments (book: single-step inference)")
    return None
