"""Tests for syndiff_lib.synthesis: prompt bank, placement, both backends, the run loop, the CLI verb.

Everything runs offline on the CPU: the SDXL path uses a tiny pipeline built from configs
(syndiff_lib/tiny_sdxl.py). The ClinicDB test runs only where the `clinicdb` fixture finds the data.
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, whatever a test does

import numpy as np
import pytest
import torch

from syndiff_lib import cli, synthesis, viz
from syndiff_lib.augment import traditional_augment
from syndiff_lib.data import PRANET_TEST_IDS, Sample, load_dataset, make_toy_dataset
from syndiff_lib.synthesis import (
    CopyPasteBackend, SDXLInpaintBackend, SynthesisError, consistency_score, field_of_view,
    forbidden_region, load_prompts, mask_shape, sample_placement, synthesize, write_manifest,
)
from syndiff_lib.tiny_sdxl import tiny_sdxl_inpaint_pipeline

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy():
    return make_toy_dataset(n=10, size=64, seed=0)


def run_cli(argv) -> int:
    parser = argparse.ArgumentParser()
    cli.add_synth_arguments(parser)
    return cli.cmd_synth(parser.parse_args([str(a) for a in argv]))


def folder_bytes(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def disc(shape, centre, radius) -> np.ndarray:
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2


# ----------------------------------------------------------------------------- prompt bank


def test_prompt_bank_has_the_papers_prompts_and_covers_every_attribute():
    prompts = load_prompts()
    texts = {p.text for p in prompts}
    assert len(prompts) == 50 and len({p.id for p in prompts}) == 50
    assert {"small sessile polyp with irregular surface texture", "sessile polyp with irregular surface texture",
            "pedunculated polyp on mucosal fold", "flat adenomatous lesion"} <= texts
    assert {p.negative_prompt for p in prompts} == {"smooth healthy tissue, normal colon wall"}
    assert sum(p.source.startswith("paper") for p in prompts) == 4
    assert {p.morphology for p in prompts} == set(synthesis.PARIS_CLASSES)
    assert {p.size for p in prompts} == set(synthesis.SIZE_CLASSES)
    assert {p.surface for p in prompts} == {"smooth", "lobulated", "irregular", "villous"}
    assert {"fold", "lumen"} <= {p.setting for p in prompts}
    words = {"0-Ip": ("pedunculated",), "0-Is": ("sessile",), "0-IIa": ("elevated", "raised"),
             "0-IIb": ("flat",), "0-IIc": ("depressed",)}
    for p in prompts:  # the text says what the attributes say
        assert any(w in p.text for w in words[p.morphology]), p


def test_load_prompts_names_the_bad_line(tmp_path):
    good = '{"prompt": "small sessile polyp", "size": "small"}'
    cases = {
        "not json": "line 3: not valid JSON",
        '{"prompt": "a polyp", "size": "medium"}': 'line 3: "size" must be one of',
        '{"prompt": "a polyp", "size": "small", "morphology": "0-III"}': 'line 3: "morphology" must be a Paris class',
        '{"size": "small"}': 'line 3: expected an object with a "prompt"',
        '{"prompt": "a polyp", "size": "small", "sise": 1}': "line 3: unknown keys ['sise']",
    }
    for bad, message in cases.items():
        path = tmp_path / "prompts.jsonl"
        path.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(SynthesisError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_prompts(path)
    path.write_text(good + "\n")
    (prompt,) = load_prompts(path)
    assert (prompt.id, prompt.morphology, prompt.negative_prompt) == ("line1", "unspecified", synthesis.NEGATIVE_PROMPT)
    with pytest.raises(SynthesisError, match="holds no prompts"):
        path.write_text("\n")
        load_prompts(path)


# ----------------------------------------------------------------------------- placement


def test_mask_shape_of_a_disc_and_an_ellipse():
    diameter, ratio = mask_shape(disc((200, 200), (100, 100), 40))
    assert diameter == pytest.approx(80, rel=0.01) and ratio == pytest.approx(1, abs=0.01)
    y, x = np.mgrid[0:200, 0:200]
    _, ratio = mask_shape(((x - 100) / 60) ** 2 + ((y - 100) / 30) ** 2 <= 1)
    assert ratio == pytest.approx(0.5, abs=0.01)


def test_field_of_view_closes_the_lumen_and_drops_the_black_corners():
    image = np.full((100, 120, 3), 150, np.uint8)
    image[:15, :15] = image[-15:, -15:] = 5  # black corners
    image[40:60, 50:70] = 10  # a dark lumen inside the view
    view = field_of_view(image)
    assert not view[0, 0] and not view[-1, -1] and view[50, 60] and view[5, 60]


def test_placement_avoids_border_lumen_and_polyp_and_hits_the_target_size(toy):
    background, source = toy[0], toy[1]
    forbidden = forbidden_region(background)
    assert forbidden[background.mask].all() and forbidden[0, 0]
    placements = [sample_placement(source.mask, 14.0, forbidden, np.random.default_rng(k)) for k in range(5)]
    for placement in placements:
        assert placement is not None and not (placement.mask & forbidden).any()
        assert placement.diameter_px == pytest.approx(14.0, rel=0.15)
    again = sample_placement(source.mask, 14.0, forbidden, np.random.default_rng(3))
    assert np.array_equal(again.mask, placements[3].mask)  # seeded
    assert sample_placement(source.mask, 14.0, np.ones_like(forbidden), np.random.default_rng(0)) is None


# ----------------------------------------------------------------------------- backends and checks


def test_copy_paste_changes_the_frame_inside_the_mask_only(toy):
    background, source = toy[0], toy[1]
    placement = sample_placement(source.mask, 16.0, forbidden_region(background), np.random.default_rng(0))
    image = CopyPasteBackend()(background.image, placement, load_prompts()[0], source, seed=0)
    assert image.shape == background.image.shape and image.dtype == np.uint8
    changed = np.abs(image.astype(int) - background.image).max(axis=2) > 0
    seam = synthesis._disk(CopyPasteBackend.seam_px + 1)
    grown = synthesis.cv2.dilate(placement.mask.astype(np.uint8), seam) > 0
    assert not changed[~grown].any()  # nothing moves outside the blended region
    assert changed[placement.mask].mean() > 0.5


def test_consistency_score_cases():
    before = np.full((64, 64, 3), 100, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    after = before.copy()
    after[mask] = 200
    assert consistency_score(before, after, mask) == 1.0
    noisy = after.copy()
    noisy[5, 5] = noisy[50, 7] = 255  # lone changed pixels do not count
    assert consistency_score(before, noisy, mask) == 1.0
    half = before.copy()
    half[20:30, 20:40] = 200
    assert consistency_score(before, half, mask) == 0.5
    assert consistency_score(before, before, mask) == 0.0  # the mask was not filled
    assert np.isnan(consistency_score(before, before, np.zeros_like(mask)))
    with pytest.raises(ValueError, match="must match"):
        consistency_score(before, after, mask[:32])


def test_traditional_augment_keeps_image_and_mask_aligned(toy):
    mask = toy[0].mask
    image = np.zeros(mask.shape + (3,), np.uint8)
    image[mask] = 255  # the image draws its own mask
    for seed in range(4):
        aug_image, aug_mask = traditional_augment(image, mask, torch.Generator().manual_seed(seed))
        assert aug_image.shape == image.shape and aug_mask.dtype == bool
        agree = ((aug_image[..., 0] > 127) == aug_mask).mean()
        assert agree > 0.99
        flipped, flipped_mask = traditional_augment(image, mask, torch.Generator().manual_seed(seed), max_angle=0)
        assert np.array_equal(flipped[..., 0] > 127, flipped_mask)


# ----------------------------------------------------------------------------- the loop


def test_samples_depend_on_seed_and_index_only(tmp_path, toy):
    """Two "processes" with disjoint indices, and a killed-then-resumed run, write what one run writes."""
    backend, prompts = CopyPasteBackend(), load_prompts()
    synthesize(backend, toy, tmp_path / "one", 6, prompts=prompts, seed=7)
    write_manifest(tmp_path / "one", 6)
    for indices in ([0, 2, 4], [5, 3, 1]):
        synthesize(backend, toy, tmp_path / "split", 6, prompts=prompts, seed=7, indices=indices)
    write_manifest(tmp_path / "split", 6)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "split")

    killed = tmp_path / "killed"
    synthesize(backend, toy, killed, 6, prompts=prompts, seed=7, indices=[0, 1, 2])
    (killed / "records" / "syn_0002.json").unlink()  # killed after writing the pair, before the record
    (killed / "images" / ".syn_0003.png.partial").write_bytes(b"half a png")
    with pytest.raises(SynthesisError, match="already holds sample syn_0000"):
        synthesize(backend, toy, killed, 6, prompts=prompts, seed=7)
    made = synthesize(backend, toy, killed, 6, prompts=prompts, seed=7, resume=True)
    assert [r["index"] for r in made] == [2, 3, 4, 5]
    write_manifest(killed, 6)
    assert folder_bytes(killed) == folder_bytes(tmp_path / "one")

    synthesize(backend, toy, tmp_path / "other", 6, prompts=prompts, seed=8)
    assert (tmp_path / "other" / "images" / "syn_0000.png").read_bytes() != (
        tmp_path / "one" / "images" / "syn_0000.png").read_bytes()


def test_min_consistency_moves_weak_samples_to_rejected(tmp_path, toy):
    made = synthesize(CopyPasteBackend(), toy, tmp_path, 4, min_consistency=1.01)  # nothing can pass
    assert not any(r["kept"] for r in made)
    assert sorted(p.name for p in (tmp_path / "rejected" / "images").iterdir()) == [f"syn_000{i}.png" for i in range(4)]
    assert not list((tmp_path / "images").iterdir())


def test_synth_command_copy_paste_on_toy_data_and_user_backgrounds(tmp_path, capsys):
    out = tmp_path / "synth"
    assert run_cli(["--data", "toy", "--out", out, "--n", 5, "--seed", 1]) == 0
    assert "5/5 samples" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == [f"syn_000{i}" for i in range(5)]
    for r in records:
        assert r["backend"] == "copy-paste" and r["background_kind"] == "training frame"
        assert r["prompt_id"] == f"p0{r['index'] + 1}"  # prompts are used in bank order
    synthetic = load_dataset(out)  # what `syndiff train --synthetic` reads
    assert len(synthetic) == 5
    for sample, r in zip(synthetic, records):  # label = new polyp | the background's own polyp
        assert sample.mask.sum() > (np.array(r["placement"]["diameter_px"]) ** 2 * np.pi / 4) * 0.8
    fig = viz.fig2_grid(out, n=4, ncols=2)
    assert len(fig.axes) == 8  # 2 rows of frames, each over a row of masks

    folder = tmp_path / "normal"
    folder.mkdir()
    for sample in make_toy_dataset(n=2, size=96, seed=3):
        synthesis.Image.fromarray(sample.image).save(folder / f"{sample.id}.png")
    out = tmp_path / "with_backgrounds"
    assert run_cli(["--data", "toy", "--out", out, "--n", 2, "--backgrounds", folder]) == 0
    for sample, r in zip(load_dataset(out), synthesis.read_manifest(out)):
        assert r["background_kind"] == "background folder" and sample.image.shape == (96, 96, 3)
        assert r["background_id"].startswith("toy_")


def test_synth_command_rejects_bad_input(tmp_path):
    base = ["--data", "toy", "--out", tmp_path / "out"]
    with pytest.raises(SynthesisError, match="positive number of samples, got 0"):
        run_cli([*base, "--n", 0])
    with pytest.raises(SynthesisError, match="background folder .*missing does not exist"):
        run_cli([*base, "--n", 2, "--backgrounds", tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthesisError, match="background folder .*empty holds no images"):
        run_cli([*base, "--n", 2, "--backgrounds", tmp_path / "empty"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a polyp", "size": "small"}\n{"prompt": "a polyp"\n')
    with pytest.raises(SynthesisError, match="line 2: not valid JSON"):
        run_cli([*base, "--n", 2, "--prompts", prompts])
    assert not (tmp_path / "out").exists()  # every check ran before anything was written


def test_clinicdb_test_frames_never_shape_a_synthetic_sample(tmp_path, clinicdb):
    frames, split = synthesis.training_frames(clinicdb)
    ids = {s.id for s in frames}
    assert len(ids) > 400 and not ids & set(PRANET_TEST_IDS) and not ids & set(split["val"])
    made = synthesize(CopyPasteBackend(), frames, tmp_path, 4)
    for r in made:
        assert r["background_id"] in ids and r["mask_source_id"] in ids
        assert r["background_id"] != r["mask_source_id"]


# ----------------------------------------------------------------------------- SDXL, tiny


def test_sdxl_backend_runs_end_to_end_with_a_tiny_pipeline(tmp_path, toy):
    pipe = tiny_sdxl_inpaint_pipeline(tmp_path / "tokenizer")
    backend = SDXLInpaintBackend(pipe, model_id="tiny-test-pipeline", revision=None, steps=2, resolution=64)
    frames = [Sample(s.id, s.image[8:56], s.mask[8:56]) for s in toy]  # 48 x 64: not square
    assert backend.processing_size(48, 64) == (48, 64)
    made = synthesize(backend, frames, tmp_path / "a", 2, seed=0)
    assert [r["backend"] for r in made] == ["sdxl", "sdxl"] and made[0]["model_id"] == "tiny-test-pipeline"
    for r in made:
        image = np.asarray(synthesis.Image.open(tmp_path / "a" / r["image"]))
        background = next(f for f in frames if f.id == r["background_id"]).image
        frame = next(f for f in frames if f.id == r["background_id"])
        label = np.asarray(synthesis.Image.open(tmp_path / "a" / r["mask"])) > 127
        placed = label & ~frame.mask  # the new polyp only
        assert image.shape == background.shape  # back to the frame's size after the 1024^2-style round trip
        grown = synthesis.cv2.dilate(label.astype(np.uint8), synthesis._disk(2 * backend.feather_px + 1)) > 0
        assert np.array_equal(image[~grown], background[~grown])  # outside the mask: the background itself
        assert np.abs(image[placed].astype(int) - background[placed]).mean() > 5  # random weights paint noise
    synthesize(backend, frames, tmp_path / "b", 2, seed=0)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")  # same seed, same files

    crop = SDXLInpaintBackend(pipe, model_id="tiny", revision=None, steps=2, resolution=32, padding_mask_crop=4)
    (made,) = synthesize(crop, frames, tmp_path / "crop", 1, seed=0)
    assert np.asarray(synthesis.Image.open(tmp_path / "crop" / made["image"])).shape == (48, 64, 3)


def test_synth_command_sdxl_loads_a_saved_pipeline_offline(tmp_path, capsys):
    tiny_sdxl_inpaint_pipeline(tmp_path / "tokenizer").save_pretrained(tmp_path / "tiny-sdxl")
    out = tmp_path / "out"
    argv = ["--backend", "sdxl", "--model-id", tmp_path / "tiny-sdxl", "--revision", "main", "--data", "toy",
            "--out", out, "--n", 2, "--steps", 2, "--resolution", 64, "--device", "cpu"]
    assert run_cli(argv) == 0
    assert "2/2 samples" in capsys.readouterr().out
    assert [r["backend"] for r in synthesis.read_manifest(out)] == ["sdxl", "sdxl"]


# ----------------------------------------------------------------------------- no leak across folds


@pytest.fixture(scope="module")
def clinicdb_like(tmp_path_factory):
    """A stand-in for CVC-ClinicDB: toy frames saved as 1.png ... 612.png, so ids, sequences
    and folds are ClinicDB's, whether or not the real data is here."""
    root = tmp_path_factory.mktemp("clinicdb-like")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, sample in enumerate(make_toy_dataset(n=612, size=64, seed=5), start=1):
        synthesis.Image.fromarray(sample.image).save(root / "images" / f"{i}.png")
        synthesis.Image.fromarray(sample.mask.astype(np.uint8) * 255).save(root / "masks" / f"{i}.png")
    return root


@pytest.mark.parametrize("fold", range(5))
def test_synth_fold_takes_nothing_from_the_folds_held_out_or_validation_frames(tmp_path, clinicdb_like, fold):
    from syndiff_lib.data import build_split, load_split
    from syndiff_lib.train import check_synthetic_source

    out = tmp_path / f"fold{fold}"
    assert run_cli(["--data", clinicdb_like, "--out", out, "--n", 6, "--fold", fold, "--split-seed", 1]) == 0
    split = build_split(clinicdb_like, fold=fold, seed=1)  # what `syndiff train --fold K --seed 1` trains on
    held_out = set(split["test"]) | set(split["val"])
    for r in synthesis.read_manifest(out):
        assert r["background_id"] in split["train"] and r["mask_source_id"] in split["train"]
        assert r["background_id"] not in held_out and r["mask_source_id"] not in held_out
    assert load_split(out / "split.json")["train"] == split["train"]
    check_synthetic_source(out, split)  # the matching run accepts it ...
    other = build_split(clinicdb_like, fold=(fold + 1) % 5, seed=1)
    with pytest.raises(ValueError, match="frames that this run holds out"):  # ... any other fold refuses it
        check_synthetic_source(out, other)
