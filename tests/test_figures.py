"""The book's drawn figures (syndiff_lib/figures.py, scripts/draw_figures.py).

Every figure draws on the tiny and cpu profiles; the shapes the architecture figure writes are
those of a real forward pass of the tiny pipeline, through training and inference; the error
gain it plots is what Eq. 3 does to an error; and the committed SVGs in book/figures/ are
exactly what the script writes now, so they cannot go stale.
"""

import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from syndiff_lib import figures  # noqa: E402
from syndiff_lib.autoencoder import encode_mask  # noqa: E402
from syndiff_lib.config import get_profile  # noqa: E402
from syndiff_lib.diffusion import add_noise, make_scheduler, predict_x0_from_noise, training_loss  # noqa: E402
from syndiff_lib.metrics import segmentation_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def figure_text(fig: Figure) -> str:
    """Every string drawn on ``fig``, one per line."""
    return "\n".join(t.get_text() for t in fig.findobj(Text))


@pytest.mark.parametrize("profile", ["tiny", "cpu"])
@pytest.mark.parametrize("name", sorted(figures.FIGURES))
def test_every_figure_draws_on_tiny_and_cpu(name, profile):
    fig = figures.FIGURES[name](get_profile(profile))
    assert isinstance(fig, Figure) and fig.axes
    assert "nan" not in figure_text(fig).lower()


@pytest.mark.parametrize("recipe", ["default", "paper"])
def test_architecture_names_the_recipe_it_draws(recipe):
    profile = get_profile("cpu", recipe=recipe)
    text = figure_text(figures.architecture_figure(profile))
    assert f"$t$ = {profile.diffusion.t_infer}" in text  # the inference timestep
    assert ("Eq. 3" in text) == (profile.diffusion.prediction_type == "epsilon")


def test_architecture_shapes_are_those_of_a_real_forward_pass(tiny_pipe):
    profile, batch = tiny_pipe.profile, 2
    # 1. The figure writes every shape architecture_shapes computes from the config.
    text = figure_text(figures.architecture_figure(profile))
    for key, shape in figures.architecture_shapes(profile).items():
        assert figures.format_shape(shape) in text, f"{key} {shape} is not on the figure"
    expected = figures.architecture_shapes(profile, batch=batch)

    # 2. One training step and one inference call, recording what the U-Net is given.
    fused = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: fused.append(tuple(args[0].shape)))
    generator = torch.Generator().manual_seed(0)
    size = profile.train.image_size
    images = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1  # [B, 3, S, S] in [-1, 1]
    masks = (torch.rand(batch, 1, size, size, generator=generator) > 0.7).float()  # [B, 1, S, S]
    frames = [(np.asarray(torch.rand(size, size, 3, generator=generator)) * 255).astype(np.uint8) for _ in range(batch)]
    try:
        with torch.no_grad():
            image_latent = tiny_pipe.encode_images(images)
            mask_latent = encode_mask(tiny_pipe.vae, masks)
            noise = torch.randn(mask_latent.shape, generator=generator)
            timesteps = torch.full((batch,), profile.diffusion.t_infer)
            noisy = add_noise(tiny_pipe.scheduler, mask_latent, noise, timesteps)
            training_loss(tiny_pipe.unet, tiny_pipe.scheduler, profile.diffusion, image_latent, mask_latent,
                          generator, mask=masks)
            mask_latent_pred = tiny_pipe.denoise(image_latent, generator=generator)
            soft = tiny_pipe.decode(mask_latent_pred)
            out = tiny_pipe(frames, generator=generator, output_size="model")
    finally:
        hook.remove()
    real = {
        "image": images.shape, "mask": masks.shape, "image_latent": image_latent.shape,
        "mask_latent": mask_latent.shape, "noise": noise.shape, "noisy_mask_latent": noisy.shape,
        "unet_output": mask_latent_pred.shape, "soft_mask": soft.shape, "pred_mask": out.masks.shape,
    }
    for key, shape in real.items():
        assert tuple(shape) == expected[key], key
    assert len(fused) == 3 and set(fused) == {expected["fused"]}  # training, denoise, the pipeline call
    assert out.masks.dtype == bool


@pytest.mark.parametrize("t", [50, 999])
def test_error_gain_is_what_eq3_does_to_an_error(t):
    """An error e added to the true noise comes out of Eq. 3 as -gain(t) * e."""
    profile = get_profile("cpu")
    scheduler = make_scheduler(profile.diffusion)
    generator = torch.Generator().manual_seed(0)
    mask_latent, noise, error = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    timesteps = torch.tensor([t])
    noisy = add_noise(scheduler, mask_latent, noise, timesteps)
    recovered = predict_x0_from_noise(scheduler, noisy, noise + error, timesteps)
    gain = figures.error_gain(profile)[t]
    assert torch.allclose(recovered - mask_latent, -gain * error, atol=1e-4 * max(1.0, gain))


def test_metrics_example_shows_a_false_blob_moving_hd95_not_dice():
    """What book/metrics.md's caption says of the drawn pair stays true of the drawing."""
    target, pred, pred_false = figures.example_masks()
    near, far = segmentation_metrics(np.stack([pred, pred_false]), np.stack([target, target]))["hd95"]
    dice_near, dice_far = segmentation_metrics(np.stack([pred, pred_false]), np.stack([target, target]))["dice"]
    assert far > 3 * near and dice_near - dice_far < 0.05
    outline = pred_false & ~ndimage.binary_erosion(pred_false)
    blob = outline & ~pred  # the false blob's share of the prediction's boundary
    assert blob.sum() > outline.sum() / 20  # "more than a twentieth", so HD95 sees it
    radii = np.array([10, 40])
    small, large = figures.rim_dice(radii, rim_px=2)
    assert small < large  # the same rim costs the small polyp more


def test_committed_figures_are_what_the_script_writes_now(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "draw_figures.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    drawn = sorted(p.name for p in tmp_path.glob("*.svg"))
    committed = sorted(p.name for p in (REPO / "book" / "figures").glob("*.svg"))
    assert drawn == sorted(figures.FIGURES) == committed
    stale = [name for name in drawn if (tmp_path / name).read_bytes() != (REPO / "book" / "figures" / name).read_bytes()]
    assert not stale, f"book/figures/{stale} differ from what the code draws: run python scripts/draw_figures.py"
