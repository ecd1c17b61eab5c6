"""The book's drawn figures: SynDiff's architecture, the noise schedule, the error gain of
Eq. 3, and what the metrics measure. Shown on the theory pages (book/latent-diffusion.md,
book/single-step.md, book/metrics.md); ``scripts/draw_figures.py`` writes them to
book/figures/ as SVG with :func:`draw_all`.

Nothing a figure shows is typed in: tensor shapes come from a profile (config.py) through
:func:`architecture_shapes`, the schedule from the scheduler the library trains with
(diffusion.make_scheduler), and the metric values from metrics.segmentation_metrics on
masks drawn here. tests/test_figures.py checks the shapes against a real forward pass of the
tiny pipeline, and the committed SVGs against what :func:`draw_all` writes now.

Notation: B = batch, S = the model's image side (``train.image_size``), h = S / f with f the
autoencoder's downsampling factor (8, as in Stable Diffusion), c = latent channels (4).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
from scipy import ndimage

from .config import RECIPES, AutoencoderConfig, Profile, get_profile
from .diffusion import MIN_SQRT_ALPHA_BAR, make_scheduler
from .metrics import DEFAULT_NSD_TOLERANCE_PX, segmentation_metrics
from .pipeline import SynDiffPipeline

BOOK_PROFILE = "cpu"  # the scale the published book shows: its shapes are the architecture's
WIDTH_IN = 7.2  # the book's text column is about 690 px: at 96 px per inch a 7.2 in figure is shown 1:1
FONT_PT = 8.5  # at 1:1 that is about 11 px, the smallest size that stays easy to read
TRAINABLE, FROZEN, NO_WEIGHTS, LOSS = "#fdd0a2", "#c6dbef", "#eeeeee", "#fcbba1"  # box colours
SVG_RC = {"svg.hashsalt": "syndiff", "svg.fonttype": "path"}  # fixed ids, glyphs as paths: same bytes every run
SVG_METADATA = {"Date": None, "Creator": None}  # no time stamp, no matplotlib version in the file


# --- shapes ---------------------------------------------------------------------------------
def downsampling_factor(cfg: AutoencoderConfig) -> int:
    """f: each autoencoder block but the last halves the side (diffusers' AutoencoderKL)."""
    return 2 ** (len(cfg.block_out_channels) - 1)


def architecture_shapes(profile: Profile, batch="B") -> dict[str, tuple]:
    """The shape of every tensor on the figure's arrows, from the profile's config alone.

    ``batch`` is what the first entry shows: "B" in the figure, a number in the test that
    compares these shapes with a real forward pass.
    """
    size = profile.train.image_size  # S
    side = size // downsampling_factor(profile.autoencoder)  # h = w
    c = profile.autoencoder.latent_channels
    latent = (batch, c, side, side)
    return {
        "image": (batch, 3, size, size),  # x in [-1, 1]
        "mask": (batch, 1, size, size),  # y in {0, 1}
        "image_latent": latent,  # z_c = E_phi(x)
        "mask_latent": latent,  # z_0 = E(y)
        "noise": latent,  # n ~ N(0, I)
        "noisy_mask_latent": latent,  # z_t (Eq. 1)
        "fused": (batch, 2 * c, side, side),  # [z_c || z_t]
        "unet_output": latent,  # n~, z~_0 or v~, as the recipe says
        "soft_mask": (batch, 1, size, size),  # mean over D's 3 channels, in [0, 1]
        "pred_mask": (batch, size, size),  # soft_mask > threshold, bool
    }


def format_shape(shape) -> str:
    """(B, 4, 16, 16) -> "B×4×16×16"."""
    return "\u00d7".join(str(d) for d in shape)


# --- drawing helpers --------------------------------------------------------------------------
def _canvas(height_in: float) -> tuple[Figure, plt.Axes]:
    """A figure WIDTH_IN x height_in whose axes are measured in inches from the bottom left."""
    fig = plt.figure(figsize=(WIDTH_IN, height_in))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, WIDTH_IN)
    ax.set_ylim(0, height_in)
    ax.axis("off")
    return fig, ax


def _close(fig: Figure) -> Figure:
    plt.close(fig)  # the caller saves or shows it; pyplot keeps nothing
    return fig


def _box(ax, x, y, w, h, text, colour, bold_first_line=True, dashed=False):
    """A rounded box centred on (x, y), w x h inches; its first line in bold."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.06",
                                facecolor=colour, edgecolor="#444444", lw=0.8, ls="--" if dashed else "-"))
    first, _, rest = text.partition("\n")
    if rest:
        ax.text(x, y + 0.085, first, ha="center", va="center", fontsize=FONT_PT,
                fontweight="bold" if bold_first_line else "normal")
        ax.text(x, y - 0.095, rest, ha="center", va="center", fontsize=FONT_PT - 0.5)
    else:
        ax.text(x, y, first, ha="center", va="center", fontsize=FONT_PT,
                fontweight="bold" if bold_first_line else "normal")


def _arrow(ax, start, end, label=None, side="right", dashed=False, label_at=0.5):
    """An arrow start -> end; ``label`` (tensor name and shape) beside its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, lw=0.9, color="#333333",
                                 shrinkA=0, shrinkB=0, ls="--" if dashed else "-"))
    if label:
        x = start[0] + label_at * (end[0] - start[0])
        y = start[1] + label_at * (end[1] - start[1])
        dx = 0.06 if side == "right" else -0.06
        ax.text(x + dx, y, label, ha="left" if side == "right" else "right", va="center",
                fontsize=FONT_PT - 0.5, color="#222222", linespacing=1.1)


def _prediction_text(prediction_type: str) -> str:
    """What the U-Net's output is and how z~_0 and n~ follow from it (diffusion.split_prediction)."""
    return {
        "epsilon": "output = $\\tilde n$;  $\\tilde z_0$ by Eq. 3",
        "sample": "output = $\\tilde z_0$;  $\\tilde n$ from Eq. 1",
        "v_prediction": "output = $\\tilde v$;  $\\tilde z_0$, $\\tilde n$ from it",
    }[prediction_type]


def _training_timestep(profile: Profile) -> str:
    d = profile.diffusion
    if d.timestep_sampling == "fixed":
        return f"$t$ = {d.fixed_timestep}"
    return f"$t \\sim U\\{{0..{d.num_train_timesteps - 1}\\}}$"


def pipeline_threshold() -> float:
    """The threshold SynDiffPipeline applies to the soft mask by default."""
    return inspect.signature(SynDiffPipeline.__call__).parameters["threshold"].default


# --- the figures ------------------------------------------------------------------------------
def architecture_figure(profile: Profile) -> Figure:
    """SynDiff as this library implements it: one training step (left) and inference (right),
    with the shape of every tensor for ``profile`` (book/latent-diffusion.md and the intro)."""
    s = {k: format_shape(v) for k, v in architecture_shapes(profile).items()}
    d = profile.diffusion
    fig, ax = _canvas(7.3)
    bh = 0.46  # box height in inches
    top, bottom = bh / 2, -bh / 2
    rows = [6.45, 5.55, 4.65, 3.75, 2.85, 1.95, 1.05]  # y of each row of boxes

    # 1. Training, left half: three lanes (image, mask, noise) that merge at the concatenation.
    a, b, c, mid = 0.7, 1.95, 3.05, 1.8  # x of the lanes and of the merged path
    ax.text(0.08, 7.07, "Training: one step", fontsize=FONT_PT + 1.5, fontweight="bold", va="center")
    _box(ax, a, rows[0], 1.2, bh, f"image $x$\n{s['image']}", "white")
    _box(ax, b, rows[0], 1.1, bh, f"mask $y$\n{s['mask']}", "white")
    _box(ax, c, rows[0], 1.0, bh, f"noise $n$\n{s['noise']}", "white")
    _box(ax, a, rows[1], 1.2, bh, "encoder $E_\\phi$\ncopy of $E$, trained", TRAINABLE)
    _box(ax, b, rows[1], 1.1, bh, "encoder $E$\nfrozen", FROZEN)
    _box(ax, (b + c) / 2, rows[2], 1.55, bh, f"add noise (Eq. 1)\nat {_training_timestep(profile)}", NO_WEIGHTS)
    _box(ax, mid, rows[3], 1.7, bh, "concatenate\n$[z_c \\,\\|\\, z_t]$: image first", NO_WEIGHTS)
    _box(ax, mid, rows[4], 1.7, bh, f"U-Net $f$\ntrained, at {_training_timestep(profile)}", TRAINABLE)
    _box(ax, mid, rows[5], 1.9, bh, "split_prediction\n" + _prediction_text(d.prediction_type), NO_WEIGHTS)
    latent_l1 = "balanced L1" if d.latent_loss == "balanced_l1" else "L1"
    _box(ax, mid, rows[6], 2.9, bh + 0.06,
         f"loss (Eq. 6), $\\lambda$ = {d.lambda_latent:g}\n"
         f"L1($n$, $\\tilde n$) + $\\lambda$ {latent_l1}($z_0$, $\\tilde z_0$)", LOSS)
    _arrow(ax, (a, rows[0] + bottom), (a, rows[1] + top))
    _arrow(ax, (b, rows[0] + bottom), (b, rows[1] + top))
    _arrow(ax, (c, rows[0] + bottom), ((b + c) / 2 + 0.4, rows[2] + top))
    _arrow(ax, (b, rows[1] + bottom), ((b + c) / 2 - 0.4, rows[2] + top), f"$z_0$\n{s['mask_latent']}", side="left")
    _arrow(ax, (a, rows[1] + bottom), (mid - 0.55, rows[3] + top), f"$z_c$\n{s['image_latent']}", side="left")
    _arrow(ax, ((b + c) / 2, rows[2] + bottom), (mid + 0.55, rows[3] + top), f"$z_t$ {s['noisy_mask_latent']}")
    _arrow(ax, (mid, rows[3] + bottom), (mid, rows[4] + top), s["fused"])
    _arrow(ax, (mid, rows[4] + bottom), (mid, rows[5] + top), s["unet_output"])
    _arrow(ax, (mid, rows[5] + bottom), (mid, rows[6] + top + 0.03), "$\\tilde z_0$, $\\tilde n$")

    # 2. Inference, right half: the image lane, and pure noise standing in for z_t.
    x0 = 3.78
    ax.plot([x0 - 0.12] * 2, [0.45, 7.2], color="#bbbbbb", lw=0.8)
    a2, b2, mid2 = x0 + 0.75, x0 + 2.5, x0 + 1.62
    ax.text(x0 + 0.05, 7.07, "Inference: one U-Net call", fontsize=FONT_PT + 1.5, fontweight="bold", va="center")
    _box(ax, a2, rows[0], 1.2, bh, f"image $x$\n{s['image']}", "white")
    _box(ax, b2, rows[0], 1.4, bh, f"pure noise $z_t = n$\n{s['noise']}", "white")
    _box(ax, a2, rows[1], 1.2, bh, "encoder $E_\\phi$\ntrained", TRAINABLE)
    _box(ax, mid2, rows[3], 1.7, bh, "concatenate\n$[z_c \\,\\|\\, n]$", NO_WEIGHTS)
    _box(ax, mid2, rows[4], 1.7, bh, f"U-Net $f$, once\nat $t$ = {d.t_infer}", TRAINABLE)
    _box(ax, mid2, rows[5], 1.9, bh, "split_prediction\n" + _prediction_text(d.prediction_type), NO_WEIGHTS)
    _box(ax, mid2, rows[6], 1.9, bh, "decoder $D$\nfrozen; mean of its 3 channels", FROZEN)
    _arrow(ax, (a2, rows[0] + bottom), (a2, rows[1] + top))
    _arrow(ax, (a2, rows[1] + bottom), (mid2 - 0.55, rows[3] + top), f"$z_c$\n{s['image_latent']}", side="left")
    _arrow(ax, (b2, rows[0] + bottom), (mid2 + 0.55, rows[3] + top), f"$n$\n{s['noise']}", label_at=0.6)
    _arrow(ax, (mid2, rows[3] + bottom), (mid2, rows[4] + top), s["fused"])
    _arrow(ax, (mid2, rows[4] + bottom), (mid2, rows[5] + top), s["unet_output"])
    _arrow(ax, (mid2, rows[5] + bottom), (mid2, rows[6] + top), f"$\\tilde z_0$ {s['unet_output']}")
    _arrow(ax, (mid2, rows[6] + bottom), (mid2, 0.28),
           f"soft mask {s['soft_mask']}\nthreshold > {pipeline_threshold():g}:\nmask (bool) {s['pred_mask']}", label_at=0.5)

    handles = [Patch(facecolor=colour, edgecolor="#444444", label=label) for colour, label in
               ((TRAINABLE, "trained"), (FROZEN, "frozen"), (NO_WEIGHTS, "no weights"), (LOSS, "loss"),
                ("white", "input"))]
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 0.0), ncol=5, fontsize=FONT_PT - 1,
              frameon=False, handlelength=1.2, columnspacing=0.9, borderaxespad=0.3)
    ax.text(0.1, 0.42, f"profile {profile.name!r}, recipe {d.recipe!r}; B = batch", fontsize=FONT_PT - 1,
            color="#555555", va="center")
    return _close(fig)


def _marked_timesteps(profile: Profile) -> list[int]:
    """The single-step timesteps the book compares: the paper's t_infer and the default
    recipe's (and the profile's own, should it be neither)."""
    return sorted({RECIPES["paper"].t_infer, profile.diffusion.t_infer, RECIPES["default"].t_infer})


def noise_schedule_figure(profile: Profile) -> Figure:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) against t, for the schedule make_scheduler
    builds from ``profile.diffusion`` (book/latent-diffusion.md)."""
    alphas_cumprod = make_scheduler(profile.diffusion).alphas_cumprod.double().numpy()  # [T]
    t = np.arange(len(alphas_cumprod))
    signal, noise = np.sqrt(alphas_cumprod), np.sqrt(1 - alphas_cumprod)
    fig, ax = plt.subplots(figsize=(WIDTH_IN * 0.8, 2.9), layout="constrained")
    ax.plot(t, signal, color="C0", label=r"$\sqrt{\bar\alpha_t}$: weight of the mask latent $z_0$")
    ax.plot(t, noise, color="C1", label=r"$\sqrt{1-\bar\alpha_t}$: weight of the noise $n$")
    for step in _marked_timesteps(profile):
        ax.axvline(step, color="grey", lw=0.7, ls=":")
        ax.plot([step, step], [signal[step], noise[step]], "o", color="black", ms=3)
        right = step < len(t) / 2
        ax.annotate(f"$t$ = {step}\n$\\sqrt{{\\bar\\alpha_t}}$ = {signal[step]:.3f}\n"
                    f"$\\sqrt{{1-\\bar\\alpha_t}}$ = {noise[step]:.3f}", (step, 0.75 if right else 0.5),
                    xytext=(6 if right else -6, 0), textcoords="offset points", ha="left" if right else "right",
                    va="center", fontsize=FONT_PT)
    ax.set_xlabel("timestep $t$")
    ax.set_ylabel("weight in Eq. 1")
    ax.set_xlim(0, len(t) - 1 + 20)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=FONT_PT, loc="center left", bbox_to_anchor=(0.18, 0.22), frameon=False)
    ax.set_title(f"{profile.diffusion.beta_schedule!r} schedule, T = {len(t)}", fontsize=FONT_PT + 1)
    return _close(fig)


def error_gain(profile: Profile) -> np.ndarray:
    """[T] the factor by which Eq. 3 multiplies an error e in n~ on its way into z~_0:
    z~_0 = (z_t - sqrt(1 - alpha_bar_t) n~) / sqrt(alpha_bar_t), so the error becomes
    sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t) times e, with the same floor on sqrt(alpha_bar_t)
    that diffusion.predict_x0_from_noise applies."""
    alphas_cumprod = make_scheduler(profile.diffusion).alphas_cumprod.double().numpy()  # [T]
    return np.sqrt(1 - alphas_cumprod) / np.maximum(np.sqrt(alphas_cumprod), MIN_SQRT_ALPHA_BAR)


def error_gain_figure(profile: Profile) -> Figure:
    """The error gain of Eq. 3 against t, log scale (book/single-step.md)."""
    gain = error_gain(profile)
    t = np.arange(len(gain))
    fig, ax = plt.subplots(figsize=(WIDTH_IN * 0.8, 2.9), layout="constrained")
    ax.semilogy(t, gain, color="C3")
    ax.axhline(1, color="grey", lw=0.7)
    ax.text(len(t) * 0.42, 0.9, "gain 1: the error passes unchanged", fontsize=FONT_PT - 0.5, color="#555555",
            va="top")
    for step in _marked_timesteps(profile):
        ax.axvline(step, color="grey", lw=0.7, ls=":")
        ax.plot(step, gain[step], "o", color="black", ms=3)
        right = step < len(t) / 2
        ax.annotate(f"$t$ = {step}: {gain[step]:.2f}", (step, gain[step]), xytext=(6 if right else -6, 0),
                    textcoords="offset points", ha="left" if right else "right", va="center", fontsize=FONT_PT)
    ax.set_xlabel("timestep $t$")
    ax.set_ylabel(r"$\sqrt{1-\bar\alpha_t}\,/\,\sqrt{\bar\alpha_t}$")
    ax.set_xlim(0, len(t) - 1 + 20)
    ax.set_title(r"an error $e$ in $\tilde n$ becomes gain $\times\, e$ in $\tilde z_0$ (Eq. 3)",
                 fontsize=FONT_PT + 1)
    return _close(fig)


def disk(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """A bool [size, size] disk: the synthetic polyp of the metrics figure."""
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def example_masks(size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, prediction, prediction with a false detection), bool [size, size] each: a round
    polyp; a prediction a few pixels off its place and a pixel smaller; the same prediction
    with a small false blob far from the polyp."""
    target = disk(size, (size / 2, size * 0.45), size / 4)
    pred = disk(size, (size / 2 + 2, size * 0.45 + 3), size / 4 - 1)
    return target, pred, pred | disk(size, (size * 0.17, size * 0.84), size / 25)


def rim_dice(radii, rim_px: int, size: int = 128) -> np.ndarray:
    """Dice of a disk of radius r against the same disk less a rim of ``rim_px`` pixels, per r."""
    centre = (size / 2, size / 2)
    pred = np.stack([disk(size, centre, r - rim_px) for r in radii])
    target = np.stack([disk(size, centre, r) for r in radii])
    return segmentation_metrics(pred, target)["dice"]


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _pair_picture(ax, pred, target, tau: float, label: str) -> None:
    """Truth filled, NSD's tolerance band around its boundary, the prediction's outline; the
    four metrics of the pair in the title."""
    scores = {k: v[0] for k, v in segmentation_metrics(pred, target, nsd_tolerance_px=tau).items()}
    picture = np.ones(target.shape + (3,))
    band = ndimage.distance_transform_edt(~_boundary(target)) <= tau  # within tau of the true boundary
    picture[target] = (0.88, 0.96, 0.88)
    picture[band] = (0.62, 0.84, 0.62)
    picture[_boundary(target)] = (0.0, 0.5, 0.0)
    picture[_boundary(pred)] = (0.8, 0.0, 0.8)
    ax.imshow(picture, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(label, fontsize=FONT_PT)
    ax.set_title(f"Dice {scores['dice']:.3f}, IoU {scores['iou']:.3f}\n"
                 f"HD95 {scores['hd95']:.1f} px, NSD {scores['nsd']:.3f}", fontsize=FONT_PT)


def metrics_figure(size: int = 128, rims=(1, 2, 5)) -> Figure:
    """Left: the four metrics on a drawn pair, then on the same pair with a small false
    detection added, with NSD's tolerance band around the true boundary. Right: the Dice of a
    prediction that misses a rim of k pixels, against the polyp's size (book/metrics.md)."""
    target, pred, pred_false = example_masks(size)
    tau = DEFAULT_NSD_TOLERANCE_PX
    fig, (first, second, right) = plt.subplots(1, 3, figsize=(WIDTH_IN, 3.2), layout="constrained",
                                               gridspec_kw={"width_ratios": (1, 1, 1.25)})
    _pair_picture(first, pred, target, tau, "a few px off")
    _pair_picture(second, pred_false, target, tau, "+ a false blob")
    fig.legend(handles=[Patch(color=(0.0, 0.5, 0.0), label="truth $G$"),
                        Patch(color=(0.62, 0.84, 0.62), label=f"within $\\tau$ = {tau:g} px of $\\partial G$"),
                        Patch(color=(0.8, 0.0, 0.8), label="prediction $P$")],
               fontsize=FONT_PT - 0.5, loc="outside lower left", ncol=3, frameon=False)

    radii = np.arange(max(rims) + 2, size // 2 - 3)
    for k, rim in enumerate(rims):
        right.plot(radii, rim_dice(radii, rim, size), color=f"C{k}", label=f"a rim of {rim} px missed")
    right.set_xlabel(f"polyp radius (px, {size} × {size} frame)", fontsize=FONT_PT)
    right.set_ylabel("Dice", fontsize=FONT_PT)
    right.tick_params(labelsize=FONT_PT - 0.5)
    right.set_ylim(0, 1.02)
    right.grid(alpha=0.3)
    right.legend(fontsize=FONT_PT - 0.5, loc="lower right", frameon=False)
    right.set_title("one boundary error, polyps of any size", fontsize=FONT_PT)
    return _close(fig)


# --- writing them -----------------------------------------------------------------------------
FIGURES = {
    "architecture.svg": architecture_figure,
    "noise-schedule.svg": noise_schedule_figure,
    "error-gain.svg": error_gain_figure,
    "metrics.svg": lambda profile: metrics_figure(),
}


def save_svg(fig: Figure, path) -> Path:
    """Write ``fig`` as SVG, byte for byte the same on every run (fixed ids, no date)."""
    path = Path(path)
    with plt.rc_context(SVG_RC):
        fig.savefig(path, format="svg", metadata=SVG_METADATA)
    return path


def draw_all(out_dir, profile: str = BOOK_PROFILE) -> list[Path]:
    """Draw every figure of FIGURES for ``profile`` into ``out_dir`` (scripts/draw_figures.py)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = get_profile(profile)
    return [save_svg(draw(cfg), out_dir / name) for name, draw in FIGURES.items()]
