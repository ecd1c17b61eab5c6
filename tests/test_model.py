"""Invariants of the model code (Eq. 1-3), the full (SD-shaped) path with tiny components,
and pipeline save/load. Fast: tiny random models on CPU, no training, no network."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from syndiff_lib.autoencoder import ImageEncoder, build_autoencoder, decode_mask, encode_mask
from syndiff_lib.config import AutoencoderConfig, DiffusionConfig, UNetConfig, get_profile
from syndiff_lib.diffusion import (
    add_noise, make_scheduler, multi_step, predict_x0_from_noise, single_step, split_prediction, training_loss,
)
from syndiff_lib.pipeline import SynDiffPipeline
from syndiff_lib.unet import build_unet, unet_forward, widen_conv_in

torch.set_num_threads(1)

TINY_AE = AutoencoderConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, crop_size=32)
# SD-shaped (UNet2DConditionModel with cross-attention blocks), but tiny.
TINY_SD_UNET = UNetConfig(
    conditional=True, block_out_channels=(16, 32), attention_levels=(True, False),
    norm_num_groups=8, cross_attention_dim=16,
)


def tiny_profile(conditional=False, recipe="default"):
    profile = get_profile("tiny", recipe=recipe)
    profile.autoencoder = TINY_AE
    if conditional:
        profile.unet = TINY_SD_UNET
    profile.train.image_size = 32
    return profile


@pytest.fixture(params=["epsilon", "sample", "v_prediction"])
def prediction_type(request):
    return request.param


def test_eq3_with_the_true_noise_returns_z0():
    scheduler = make_scheduler(DiffusionConfig(prediction_type="epsilon"))
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 50, 500, 999])
    z_t = add_noise(scheduler, z0, noise, t)
    torch.testing.assert_close(predict_x0_from_noise(scheduler, z_t, noise, t), z0, atol=1e-4, rtol=1e-4)


def test_add_noise_at_alpha_bar_one_returns_its_input():
    scheduler = make_scheduler(DiffusionConfig())
    scheduler.alphas_cumprod[0] = 1.0  # alpha_bar = 1 exactly: no noise at all
    z0 = torch.randn(2, 4, 8, 8)
    z_t = add_noise(scheduler, z0, torch.randn(2, 4, 8, 8), torch.tensor([0, 0]))
    torch.testing.assert_close(z_t, z0)
    # And on the real schedule, t = 0 (alpha_bar = 0.99915) is within a few percent of its input.
    scheduler = make_scheduler(DiffusionConfig())
    z_t = add_noise(scheduler, z0, torch.zeros_like(z0), torch.tensor([0, 0]))
    assert (z_t - z0).abs().max() < 0.01 * z0.abs().max()


def test_split_prediction_inverts_each_parameterisation(prediction_type):
    scheduler = make_scheduler(DiffusionConfig(prediction_type=prediction_type))
    z0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 400, 999])
    z_t = add_noise(scheduler, z0, noise, t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    perfect = {"epsilon": noise, "sample": z0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * z0}[prediction_type]
    z0_pred, noise_pred = split_prediction(scheduler, perfect, z_t, t, prediction_type)
    torch.testing.assert_close(z0_pred, z0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(noise_pred, noise, atol=2e-3, rtol=1e-3)


def test_eq3_never_divides_by_zero_on_a_zero_snr_schedule():
    scheduler = make_scheduler(DiffusionConfig(rescale_zero_terminal_snr=True))
    assert scheduler.alphas_cumprod[999] < 1e-6
    z0 = predict_x0_from_noise(scheduler, torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([999]))
    assert torch.isfinite(z0).all()


def test_one_step_ddim_equals_the_single_step_at_t999(prediction_type):
    profile = tiny_profile()
    cfg = dataclasses.replace(profile.diffusion, prediction_type=prediction_type)
    torch.manual_seed(0)
    unet = build_unet(profile.unet, 4).eval()
    scheduler = make_scheduler(cfg)
    image_latent = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        one = single_step(unet, scheduler, cfg, image_latent, 999, torch.Generator().manual_seed(3))
        ddim = multi_step(unet, scheduler, cfg, image_latent, 1, torch.Generator().manual_seed(3))
    torch.testing.assert_close(one, ddim, atol=1e-5, rtol=1e-5)


def test_widened_conv_in_keeps_the_pretrained_function():
    torch.manual_seed(0)
    profile = tiny_profile(conditional=True)
    cfg = dataclasses.replace(profile.unet)
    unet4 = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=cfg.block_out_channels,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, norm_num_groups=8,
    ).eval()
    z = torch.randn(1, 4, 4, 4)
    text = torch.zeros(1, 1, 16)
    with torch.no_grad():
        before = unet4(z, 10, encoder_hidden_states=text).sample
        unet8 = widen_conv_in(unet4)
        after = unet8(torch.cat([z, z], dim=1), 10, encoder_hidden_states=text).sample
    assert unet8.conv_in.in_channels == 8 and unet8.config.in_channels == 8
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-4)


def test_the_full_path_loads_pretrained_components_from_folders(tmp_path):
    """`full` loads SD's VAE and U-Net with from_pretrained: exercise it on tiny local copies."""
    torch.manual_seed(0)
    build_autoencoder(TINY_AE).save_pretrained(tmp_path / "sd" / "vae")
    unet4 = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8,
    )
    unet4.save_pretrained(tmp_path / "sd" / "unet")
    profile = tiny_profile(conditional=True)
    profile.autoencoder = AutoencoderConfig(pretrained=str(tmp_path / "sd"), subfolder="vae")
    profile.unet = dataclasses.replace(TINY_SD_UNET, pretrained=str(tmp_path / "sd"))
    pipe = SynDiffPipeline.from_profile(profile)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert pipe.unet.conv_in.in_channels == 8
    torch.testing.assert_close(pipe.unet.conv_in.weight[:, :4] * 2, unet4.conv_in.weight)
    # E_phi starts as a copy of E.
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        torch.testing.assert_close(pipe.image_encoder(x), expected)
    out = pipe(np.zeros((40, 48, 3), np.uint8), generator=torch.Generator().manual_seed(0))
    assert out.masks.shape == (1, 40, 48) and out.masks.dtype == bool


@pytest.mark.parametrize("conditional", [False, True], ids=["UNet2DModel", "SD-shaped UNet2DConditionModel"])
def test_pipeline_save_load_roundtrip_is_safetensors_and_exact(tmp_path, conditional):
    pipe = SynDiffPipeline.from_profile(tiny_profile(conditional))
    pipe.save_pretrained(tmp_path / "pipe")
    files = [p.name for p in (tmp_path / "pipe").rglob("*") if p.is_file()]
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for f in files)
    loaded = SynDiffPipeline.from_pretrained(tmp_path / "pipe")
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    a = pipe(image, generator=torch.Generator().manual_seed(1)).soft_masks
    b = loaded(image, generator=torch.Generator().manual_seed(1)).soft_masks
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_same_seed_same_mask_and_multistep_runs():
    pipe = SynDiffPipeline.from_profile(tiny_profile(recipe="paper"))
    images = [np.random.default_rng(i).integers(0, 255, (32, 40, 3), dtype=np.uint8) for i in range(3)]
    a = pipe(images, generator=torch.Generator().manual_seed(0)).soft_masks
    b = pipe(images, generator=torch.Generator().manual_seed(0)).soft_masks
    c = pipe(images, generator=torch.Generator().manual_seed(1)).soft_masks
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # epsilon-prediction at t = 50: the noise matters
    assert pipe(images, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).masks.shape == (3, 32, 40)


def test_mask_latent_round_trip_shapes_and_range():
    vae = build_autoencoder(TINY_AE).eval()
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:20, 10:24] = 1
    z0 = encode_mask(vae, mask)
    assert z0.shape == (2, 4, 4, 4)
    soft = decode_mask(vae, z0)
    assert soft.shape == (2, 1, 32, 32) and soft.min() >= 0 and soft.max() <= 1


def test_dual_loss_trains_the_unet():
    """A few steps on one fixed batch lower the dual loss: the gradients reach the U-Net and E_phi."""
    profile = tiny_profile(recipe="paper")
    torch.manual_seed(0)
    vae = build_autoencoder(TINY_AE).eval()
    encoder = ImageEncoder.from_vae(vae)
    unet = build_unet(profile.unet, 4)
    scheduler = make_scheduler(profile.diffusion)
    cfg = dataclasses.replace(profile.diffusion, timestep_sampling="fixed", fixed_timestep=500)
    params = list(unet.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    images, masks = torch.rand(4, 3, 32, 32) * 2 - 1, (torch.rand(4, 1, 32, 32) > 0.7).float()
    losses = []
    for step in range(25):
        loss, parts = training_loss(unet, scheduler, cfg, encoder(images), encode_mask(vae, masks), torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert set(parts) == {"loss_noise", "loss_latent"}
    assert losses[-1] < 0.7 * losses[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_decoder_loss_option_adds_a_pixel_term_with_gradients():
    profile = tiny_profile()
    cfg = dataclasses.replace(profile.diffusion, decoder_loss_weight=1.0)
    torch.manual_seed(0)
    vae = build_autoencoder(TINY_AE).eval().requires_grad_(False)
    unet = build_unet(profile.unet, 4)
    masks = (torch.rand(2, 1, 32, 32) > 0.5).float()
    loss, parts = training_loss(unet, make_scheduler(cfg), cfg, torch.randn(2, 4, 4, 4), encode_mask(vae, masks),
                                torch.Generator().manual_seed(0), vae, masks)
    assert "loss_decoder" in parts and parts["loss_decoder"] > 0
    loss.backward()
    assert unet.conv_in.weight.grad.abs().sum() > 0


def test_traditional_augmentation_keeps_image_and_mask_aligned():
    from syndiff_lib.train import random_batch

    images = torch.zeros(1, 3, 32, 32) - 1
    images[:, 0, 4:12, 20:28] = 1  # a red square ...
    masks = torch.zeros(1, 1, 32, 32)
    masks[:, :, 4:12, 20:28] = 1  # ... and its mask
    for seed in range(5):
        x, y = random_batch(images, masks, 4, torch.Generator().manual_seed(seed), flip=True, rotate=True)
        red = x[:, 0] > 0  # [B, 32, 32]
        agreement = (red == y[:, 0].bool()).float().mean()
        assert agreement > 0.98 and y.sum() > 0


def test_learning_rate_depends_on_the_step_alone():
    """Warm-up, then a cosine to 0 at max_steps, whatever the clock says: a busy machine trains
    the same model as a quiet one (the schedule has no clock to read)."""
    import inspect

    from syndiff_lib.train import cosine_schedule

    assert list(inspect.signature(cosine_schedule).parameters) == ["optimizer", "warmup_steps", "max_steps"]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = cosine_schedule(optimizer, warmup_steps=2, max_steps=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # warm-up: step 0 of 2
    lrs = []
    for _ in range(10):
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1.0)  # warm-up done
    assert lrs[4] == pytest.approx(0.5, abs=1e-6)  # step 5 of 10: half-way down the cosine
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_autoencoder_crops_hold_the_polyp():
    from syndiff_lib.autoencoder import random_autoencoder_batch
    from syndiff_lib.config import AutoencoderConfig

    masks = torch.zeros(5, 1, 128, 128)
    masks[:, :, 100:110, 5:15] = 1  # a small polyp in a corner: random 32-px crops mostly miss it
    images = torch.zeros(5, 3, 128, 128)
    cfg = AutoencoderConfig(batch_size=64, crop_size=32, mask_fraction=1.0, polyp_crops=True)
    batch = random_autoencoder_batch(images, masks, cfg, torch.Generator().manual_seed(0))
    assert batch.shape == (64, 3, 32, 32)
    assert ((batch > 0).flatten(1).any(1)).all()  # every mask crop shows some polyp
    cfg.polyp_crops = False
    batch = random_autoencoder_batch(images, masks, cfg, torch.Generator().manual_seed(0))
    assert ((batch > 0).flatten(1).any(1)).float().mean() < 0.5


def test_balanced_latent_loss_weighs_a_small_polyp_as_much_as_the_background():
    from syndiff_lib.diffusion import balanced_l1

    target = torch.zeros(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 32, 32)
    mask[:, :, 0:3, 0:3] = 1  # a small polyp: one latent cell of 16
    wrong_polyp = target.clone()
    wrong_polyp[:, :, 0, 0] = 1.0  # error only in the polyp's cell
    assert torch.nn.functional.l1_loss(wrong_polyp, target) == pytest.approx(1 / 16)
    assert balanced_l1(wrong_polyp, target, mask) == pytest.approx(0.5)  # half the weight, whatever the size
    assert balanced_l1(wrong_polyp, target, torch.zeros_like(mask)) == pytest.approx(1 / 16)  # no polyp: plain L1
    profile = tiny_profile()
    cfg = dataclasses.replace(profile.diffusion, latent_loss="balanced_l1")
    unet = build_unet(profile.unet, 4)
    loss, parts = training_loss(unet, make_scheduler(cfg), cfg, torch.randn(1, 4, 4, 4), target,
                                torch.Generator().manual_seed(0), None, mask)
    assert torch.isfinite(loss) and parts["loss_latent"] > 0
    with pytest.raises(ValueError, match="latent_loss"):
        training_loss(unet, make_scheduler(cfg), dataclasses.replace(cfg, latent_loss="l2"), torch.randn(1, 4, 4, 4),
                      target, torch.Generator().manual_seed(0), None, mask)


def test_decoder_loss_fraction_decodes_only_part_of_the_batch(monkeypatch):
    import syndiff_lib.diffusion as diffusion

    seen = []
    monkeypatch.setattr(diffusion, "decoder_loss", lambda vae, z, mask: seen.append(len(z)) or z.sum() * 0)
    profile = tiny_profile()
    cfg = dataclasses.replace(profile.diffusion, decoder_loss_weight=1.0, decoder_loss_fraction=0.25)
    unet = build_unet(profile.unet, 4)
    masks = (torch.rand(8, 1, 32, 32) > 0.5).float()
    diffusion.training_loss(unet, make_scheduler(cfg), cfg, torch.randn(8, 4, 4, 4), torch.randn(8, 4, 4, 4),
                            torch.Generator().manual_seed(0), object(), masks)
    assert seen == [2]


def test_mask_decoder_finetune_changes_only_the_decoder_and_improves_the_round_trip():
    from syndiff_lib.autoencoder import finetune_mask_decoder, mask_round_trip_dice

    torch.manual_seed(0)
    vae = build_autoencoder(TINY_AE).eval()
    masks = torch.zeros(8, 1, 32, 32)
    for i in range(8):
        masks[i, :, 4 + i : 12 + i, 6 + 2 * i : 14 + i] = 1  # small boxes in different places
    z_before = encode_mask(vae, masks)
    encoder_before = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    dice_before = mask_round_trip_dice(vae, masks).mean().item()
    cfg = dataclasses.replace(TINY_AE, mask_decoder_steps=200, mask_decoder_lr=1e-3, batch_size=8)
    summary = finetune_mask_decoder(vae, masks, cfg, torch.Generator().manual_seed(0), log=lambda *_: None)
    assert summary["steps"] == 200
    torch.testing.assert_close(encode_mask(vae, masks), z_before)  # the targets z_0 are untouched
    for k, v in vae.encoder.state_dict().items():
        torch.testing.assert_close(v, encoder_before[k])
    assert not any(p.requires_grad for p in vae.parameters())  # frozen again
    assert mask_round_trip_dice(vae, masks).mean().item() > max(dice_before, 0.5)


def test_the_mask_decoder_stage_has_its_own_cache_key():
    from syndiff_lib.autoencoder import autoencoder_cache_key

    a = get_profile("cpu")
    b = get_profile("cpu")
    b.autoencoder.mask_decoder_steps = 123
    key = lambda p, stage: autoencoder_cache_key(p, ["1", "2"], "toy", 0, stage)  # noqa: E731
    assert key(a, "autoencoder") == key(b, "autoencoder")  # the first stage is shared
    assert key(a, "mask_decoder") != key(b, "mask_decoder")
    b.autoencoder.train_minutes = 1.0  # a safety cap defines no model (only complete trainings are cached)
    b.autoencoder.train_steps = 10
    c = get_profile("cpu")
    c.autoencoder.train_minutes = 1.0
    assert key(a, "autoencoder") == key(c, "autoencoder") != key(b, "autoencoder")


def test_the_paper_recipe_is_exactly_the_papers_and_the_default_differs_only_in_named_options():
    from syndiff_lib.config import RECIPES, DiffusionConfig

    paper = RECIPES["paper"]
    assert (paper.prediction_type, paper.timestep_sampling, paper.t_infer) == ("epsilon", "uniform", 50)
    assert (paper.latent_loss, paper.lambda_latent, paper.decoder_loss_weight) == ("l1", 1.0, 0.0)
    assert not paper.rescale_zero_terminal_snr and paper.beta_schedule == "scaled_linear"
    default = dataclasses.asdict(RECIPES["default"])
    changed = {k for k, v in dataclasses.asdict(paper).items() if default[k] != v}
    assert changed == {"recipe", "prediction_type", "timestep_sampling", "t_infer", "latent_loss"}
    assert set(dataclasses.asdict(DiffusionConfig())) == set(default)


def test_full_trains_the_recipe_that_segments_and_the_papers_single_step_is_warned_about():
    from syndiff_lib.config import get_profile, recipe_warning

    assert get_profile("full").diffusion.recipe == get_profile("full-random").diffusion.recipe == "default"
    assert get_profile("full", recipe="paper").diffusion.prediction_type == "epsilon"
    assert recipe_warning(get_profile("full").diffusion) is None
    warning = recipe_warning(get_profile("full", recipe="paper").diffusion)
    assert warning.startswith("WARNING:") and "t = 50" in warning and "\n" not in warning
