"""Tests for syndiff_lib.gan: the composite, training, save/load, the backend in `synthesize`, the CLI.

A tiny GAN (gan.TINY_GAN, 32 x 32) on the toy data, on the CPU; each test takes a few seconds.
"""

import argparse
import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, whatever a test does

import numpy as np
import pytest
import torch

from syndiff_lib import cli, gan, synthesis
from syndiff_lib.data import Sample, load_split, make_toy_dataset
from syndiff_lib.synthesis import Placement, SynthesisError, synthesize

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy():
    return make_toy_dataset(n=10, size=64, seed=0)


def train_tiny(frames, steps=5, seed=0):
    cfg = dataclasses.replace(gan.TINY_GAN, steps=steps)
    return gan.train_inpainting_gan(frames, cfg, torch.Generator().manual_seed(seed), log=lambda line: None)


@pytest.fixture(scope="module")
def tiny_gan(toy):
    return train_tiny(toy)


def run_cli(argv) -> int:
    parser = argparse.ArgumentParser()
    cli.add_synth_arguments(parser)
    return cli.cmd_synth(parser.parse_args([str(a) for a in argv]))


def test_composite_keeps_every_pixel_outside_the_mask(toy, tiny_gan):
    # Tensor level: outside the mask the composite is the input image, bit for bit.
    images, masks = gan.frames_to_tensors(toy[:3], 32)  # [3, 3, 32, 32], [3, 1, 32, 32]
    painted, condition = gan.inpaint(tiny_gan, images, masks)
    outside = (masks == 0).expand_as(images)
    assert torch.equal(painted[outside], images[outside])
    assert torch.equal(condition[:, :3][masks.expand_as(images) == 1], torch.zeros(int(masks.sum()) * 3))  # blanked
    # Frame level: a 48 x 64 frame goes to 32 x 32 and back; outside placement.mask nothing moves.
    frame = toy[0].image[8:56]  # [48, 64, 3]: not square
    y, x = np.mgrid[0:48, 0:64]
    mask = (x - 40) ** 2 + (y - 20) ** 2 <= 8**2  # [48, 64] bool
    placement = Placement(mask, np.eye(2, 3), (40, 20), 0.0, 1.0, 16.0)
    out = gan.GANInpaintBackend(tiny_gan)(frame, placement, synthesis.load_prompts()[0], toy[1], seed=0)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert np.array_equal(out[~mask], frame[~mask])
    assert np.abs(out[mask].astype(int) - frame[mask]).mean() > 1  # something was painted


def test_a_few_steps_reduce_the_l1_loss_on_the_training_frames(toy):
    images, masks = gan.frames_to_tensors(toy, gan.TINY_GAN.size)
    untrained, trained = train_tiny(toy, steps=0), train_tiny(toy, steps=40)  # the same seeded init
    with torch.no_grad():
        before, after = (gan.masked_l1(gan.inpaint(model, images, masks)[0], images, masks).item()
                         for model in (untrained, trained))
    assert np.isfinite(after) and after < 0.8 * before


def test_training_is_seeded_and_uses_only_the_frames_passed_in(toy):
    empty = Sample("no_polyp", toy[0].image, np.zeros_like(toy[0].mask))
    a, b = train_tiny(toy[:5]), train_tiny([*toy[:5], empty])  # a frame without a polyp teaches nothing
    assert a.trained_on == [s.id for s in toy[:5]] == b.trained_on
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    gan.check_trained_on(a, [s.id for s in toy])  # a split that holds its frames: accepted
    with pytest.raises(SynthesisError, match="outside this split's training frames"):
        gan.check_trained_on(a, [s.id for s in toy[1:]])
    with pytest.raises(SynthesisError, match="none of the frames has a polyp"):
        train_tiny([empty])


def test_save_load_round_trip_gives_identical_outputs_and_only_safetensors_and_json(tmp_path, toy, tiny_gan):
    gan.save_gan(tiny_gan, tmp_path / "gan")
    assert sorted(p.name for p in (tmp_path / "gan").iterdir()) == ["config.json", "generator.safetensors"]
    loaded = gan.load_gan(tmp_path / "gan")
    assert loaded.config == tiny_gan.config and loaded.trained_on == tiny_gan.trained_on
    images, masks = gan.frames_to_tensors(toy, 32)
    with torch.no_grad():
        assert torch.equal(gan.inpaint(loaded, images, masks)[0], gan.inpaint(tiny_gan, images, masks)[0])
    with pytest.raises(SynthesisError, match="holds no saved GAN"):
        gan.load_gan(tmp_path)


def test_gan_backend_inside_synthesize(tmp_path, toy, tiny_gan):
    backend = gan.GANInpaintBackend(tiny_gan, model_id="tiny-gan")
    made = synthesize(backend, toy, tmp_path / "a", 3, seed=0)
    records = synthesis.read_manifest(synthesis.write_manifest(tmp_path / "a", 3).parent)
    assert [r["backend"] for r in records] == ["gan"] * 3 and records == made
    assert {r["model_id"] for r in made} == {"tiny-gan"} and {r["revision"] for r in made} == {None}
    for r in made:  # the copy-paste backend's placement, painted by the GAN; the background kept outside
        image = np.asarray(synthesis.Image.open(tmp_path / "a" / r["image"]))
        frame = next(f for f in toy if f.id == r["background_id"])
        label = np.asarray(synthesis.Image.open(tmp_path / "a" / r["mask"])) > 127
        assert np.array_equal(image[~label], frame.image[~label])
    synthesize(backend, toy, tmp_path / "b", 3, seed=0)
    for name in ("images", "masks"):  # same seed, same files
        for path in sorted((tmp_path / "a" / name).iterdir()):
            assert path.read_bytes() == (tmp_path / "b" / name / path.name).read_bytes()


def test_synth_command_gan_trains_on_the_splits_training_frames(tmp_path, capsys):
    out = tmp_path / "synth"
    assert run_cli(["--backend", "gan", "--gan-steps", 5, "--data", "toy", "--out", out, "--n", 3,
                    "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "gan step 5/5" in printed and "3/3 samples" in printed
    records = synthesis.read_manifest(out)
    assert [r["backend"] for r in records] == ["gan"] * 3 and len(list((out / "images").iterdir())) == 3
    assert sorted(p.name for p in (out / "gan").iterdir()) == ["config.json", "generator.safetensors"]
    split, meta = load_split(out / "split.json"), json.loads((out / "gan" / "config.json").read_text())
    assert meta["config"]["steps"] == 5
    assert set(meta["trained_on"]) <= set(split["train"])  # never a validation or test frame
    assert not set(meta["trained_on"]) & (set(split["val"]) | set(split["test"]))

    again = tmp_path / "again"  # --gan-model: the same GAN, loaded instead of trained
    assert run_cli(["--backend", "gan", "--gan-model", out / "gan", "--data", "toy", "--out", again, "--n", 3,
                    "--device", "cpu"]) == 0
    assert "gan step" not in capsys.readouterr().out
    for name in ("syn_0000.png", "syn_0002.png"):
        assert (again / "images" / name).read_bytes() == (out / "images" / name).read_bytes()
    with pytest.raises(SynthesisError, match="--gan-steps must be a positive"):
        run_cli(["--backend", "gan", "--gan-steps", 0, "--data", "toy", "--out", tmp_path / "bad", "--n", 1])
