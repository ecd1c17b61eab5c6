"""Generalisation beyond CVC-ClinicDB: Kvasir-SEG's split, masks named other ways, several
data sets at once, scoring at each image's own size, models trained on letterboxed frames,
and photometric augmentation.

Every fixture file is written into tmp_path. The check of the real Kvasir-SEG runs only when
the shared copy is next to the checkout (../shared/data/kvasir-seg). The last part checks the
helpers of notebook 08 (tables of the cross-dataset report on fabricated cell files, frames
scored in chunks, the stretch / letterbox views, the simulated shift of the toy data).
"""

import dataclasses
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from syndiff_lib import augment, cli, data, experiments, generalisation
from syndiff_lib.autoencoder import autoencoder_cache_key
from syndiff_lib.config import get_profile
from syndiff_lib.data import DataError
from syndiff_lib.metrics import dice_score
from syndiff_lib.pipeline import (BaselinePipeline, SynDiffPipeline, evaluate, letterbox, load_pipeline, model_fit,
                                  segment_files, unletterbox)
from syndiff_lib.baseline import build_baseline_unet
from syndiff_lib.train import as_written_now, autoencoder_samples, prepare_data, train

REAL_KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg"


def save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def write_image(root: Path, name: str, size=(24, 16)) -> None:
    """images/<name>: seeded noise of size (W, H)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    save(root / "images" / name, rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_mask(root: Path, name: str, size=(24, 16)) -> np.ndarray:
    """masks/<name>: a centred box of size (W, H); returns it as bool [H, W]."""
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    save(root / "masks" / name, mask)
    return mask > 127


def write_pair(root: Path, image_name: str, mask_name: str, size=(24, 16)) -> np.ndarray:
    """One image and its mask; returns the mask."""
    write_image(root, image_name, size)
    return write_mask(root, mask_name, size)


def kvasir_like(root: Path, ids, train_ids=None, test_ids=None) -> Path:
    """A folder laid out like Kvasir-SEG: images/<id>.jpg, masks/<id>.png, and train.txt /
    val.txt when those ids are given."""
    for i in ids:
        write_pair(root, f"{i}.jpg", f"{i}.png")
    if train_ids is not None:
        (root / "train.txt").write_text("".join(f"{i}\n" for i in train_ids))
        (root / "val.txt").write_text("".join(f"{i}\n" for i in test_ids))
    return root


def fake_kvasir_ids(n: int) -> list[str]:
    """Ids shaped like Kvasir-SEG's (25 lower-case letters and digits), seeded."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    return ["cj" + "".join(rng.choice(letters, 23)) for _ in range(n)]


def clinicdb_like(root: Path, last: int = 80) -> Path:
    """Frames 1..last of a ClinicDB-like PNG folder (12 of them are PraNet test frames)."""
    for i in range(1, last + 1):
        write_pair(root, f"{i}.png", f"{i}.png")
    return root


# ----------------------------------------------------------------------------- Kvasir-SEG


def test_kvasir_folder_gets_its_published_split_and_all_is_every_frame(tmp_path):
    ids = fake_kvasir_ids(12)
    root = kvasir_like(tmp_path / "kvasir", ids, train_ids=ids[:9], test_ids=ids[9:])
    assert data.detect_layout(root) == "kvasir" and data.default_scheme(root) == "published"
    split = data.build_split(root)
    assert split["scheme"] == "published" and split["test"] == sorted(ids[9:], key=data.natural_key)
    assert sorted(split["train"] + split["val"]) == sorted(ids[:9]) and split["val"]
    everything = data.build_split(root, scheme="all")
    assert sorted(everything["test"]) == sorted(ids) and not everything["train"] and not everything["val"]


def test_a_kvasir_copy_without_its_split_files_uses_the_embedded_test_ids(tmp_path):
    assert len(data.KVASIR_TEST_IDS) == len(set(data.KVASIR_TEST_IDS)) == 120
    others = fake_kvasir_ids(6)
    root = kvasir_like(tmp_path / "kvasir", [*data.KVASIR_TEST_IDS, *others])  # no train.txt / val.txt
    split = data.build_split(root)
    assert split["scheme"] == "published" and set(split["test"]) == set(data.KVASIR_TEST_IDS)
    assert sorted(split["train"] + split["val"]) == sorted(others)
    # Without all 120 test frames it is just a folder of JPEGs: a random split.
    (root / "images" / f"{data.KVASIR_TEST_IDS[0]}.jpg").unlink()
    (root / "masks" / f"{data.KVASIR_TEST_IDS[0]}.png").unlink()
    assert data.build_split(root)["scheme"] == "random"


@pytest.mark.skipif(not REAL_KVASIR.is_dir(), reason="Kvasir-SEG is absent: no folder ../shared/data/kvasir-seg")
def test_real_kvasir_is_880_plus_120_and_1000_with_all():
    split = data.build_split(REAL_KVASIR)
    assert split["scheme"] == "published" and len(split["test"]) == 120
    assert len(split["train"]) + len(split["val"]) == 880
    assert set(split["test"]) == set(data.KVASIR_TEST_IDS)  # the embedded ids are the authors' val.txt
    assert len(data.build_split(REAL_KVASIR, scheme="all")["test"]) == 1000


# ----------------------------------------------------------------------------- pairing by name


def test_masks_pair_by_suffix_and_across_extensions(tmp_path):
    masks = {
        "a": write_pair(tmp_path, "a.jpg", "a_mask.png"),
        "b": write_pair(tmp_path, "b.png", "b-mask.png"),
        "c": write_pair(tmp_path, "c.jpg", "c_segmentation.png"),
        "d": write_pair(tmp_path, "d.jpg", "d.png"),
        "e": write_pair(tmp_path, "e.bmp", "e_Mask.bmp"),  # the suffix in any case
    }
    assert data.detect_layout(tmp_path) == "folder"
    pairs = data.find_pairs(tmp_path)
    assert [i for i, _, _ in pairs] == ["a", "b", "c", "d", "e"]
    assert pairs[0][2].name == "a_mask.png"
    data.check_dataset(tmp_path)
    for sample in data.load_dataset(tmp_path):
        np.testing.assert_array_equal(sample.mask, masks[sample.id])


@pytest.mark.parametrize("images, masks, offender, problem", [
    (["x.jpg", "x_mask.jpg"], ["x_mask.png"], "masks/x_mask.png", "ambiguous"),  # x's mask, or x_mask's?
    (["x.jpg"], ["x.png", "x_mask.png"], "masks/x_mask.png", "a second mask for x.jpg"),
    (["x.jpg", "y.jpg"], ["x_mask.png"], "images/y.jpg", "image without a mask"),
    (["x.jpg"], ["x_mask.png", "z_mask.png"], "masks/z_mask.png", "mask without an image"),
])
def test_a_mask_that_pairs_badly_is_one_line_naming_the_file(tmp_path, images, masks, offender, problem):
    for name in images:
        write_image(tmp_path, name)
    for name in masks:
        write_mask(tmp_path, name)
    with pytest.raises(DataError) as error:
        data.find_pairs(tmp_path)
    message = str(error.value)
    assert "\n" not in message and offender in message and problem in message, message


# ----------------------------------------------------------------------------- several data sets


def test_several_data_sets_keep_their_own_splits_with_prefixed_ids(tmp_path):
    clinicdb = clinicdb_like(tmp_path / "cvc-clinicdb")
    ids = fake_kvasir_ids(10)
    kvasir = kvasir_like(tmp_path / "kvasir-seg", ids, train_ids=ids[:8], test_ids=ids[8:])
    own = {"cvc-clinicdb": data.build_split(clinicdb), "kvasir-seg": data.build_split(kvasir)}
    assert own["cvc-clinicdb"]["scheme"] == "pranet" and len(own["cvc-clinicdb"]["test"]) == 12

    train_samples, val_samples, split = prepare_data([clinicdb, kvasir], image_size=16)
    assert split["scheme"] == "pranet+published" and split["data"] == [str(clinicdb), str(kvasir)]
    for key in ("train", "val", "test"):
        assert split[key] == [f"{name}/{i}" for name, part in own.items() for i in part[key]]
    assert [part["name"] for part in split["parts"]] == ["cvc-clinicdb", "kvasir-seg"]
    assert {s.id for s in train_samples} == set(split["train"]) and {s.id for s in val_samples} == set(split["val"])
    assert "kvasir-seg/" + ids[8] in split["test"] and "cvc-clinicdb/14" in split["test"]
    assert data.split_part(split, kvasir)["test"] == own["kvasir-seg"]["test"]  # one data set's own ids back
    assert data.same_data(split["data"], [kvasir, clinicdb]) and not data.same_data(split["data"], kvasir)
    (tested,) = data.load_dataset([clinicdb, kvasir], ids=["kvasir-seg/" + ids[9]])
    assert tested.id == "kvasir-seg/" + ids[9] and tested.image.shape == (16, 24, 3)

    # One data set given as a list of one: no prefix, the split it always had.
    assert prepare_data([kvasir], image_size=16)[2] == prepare_data(kvasir, image_size=16)[2]
    assert data.build_split([kvasir]) == own["kvasir-seg"]
    with pytest.raises(ValueError, match="two data sets are called"):
        data.build_split([kvasir, kvasir])


def test_a_baseline_trains_on_two_data_sets_and_is_scored_on_one(tmp_path, capsys):
    """Tiny smoke of the whole path: --data twice, photometric augmentation on, then evaluate
    picks the Kvasir part of the run's split."""
    clinicdb = clinicdb_like(tmp_path / "cvc-clinicdb", last=30)
    ids = fake_kvasir_ids(8)
    kvasir = kvasir_like(tmp_path / "kvasir-seg", ids, train_ids=ids[:6], test_ids=ids[6:])
    run = tmp_path / "run"
    args = cli.build_parser().parse_args(["train", "--model", "baseline", "--profile", "tiny", "--baseline-steps", "2",
                                          "--val-every", "2", "--photometric-augment", "--data", str(clinicdb),
                                          "--data", str(kvasir), "--out", str(run)])
    assert args.data == [str(clinicdb), str(kvasir)]
    profile = cli.profile_from_args(args)
    assert profile.train.photometric_augment  # tiny has it off: the flag turns it on
    off = cli.build_parser().parse_args(["train", "--profile", "cpu", "--no-photometric-augment", "--data", str(clinicdb),
                                         "--out", str(tmp_path / "off")])
    assert not cli.profile_from_args(off).train.photometric_augment and get_profile("cpu").train.photometric_augment
    profile.train.image_size = 32
    train(profile, args.data, run, model="baseline", log=lambda *_: None)
    split = json.loads((run / "split.json").read_text())
    assert len(split["parts"]) == 2 and all("/" in i for i in split["train"])

    assert cli.main(["evaluate", "--checkpoint", str(run), "--data", str(kvasir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 2 and summary["resolution"] == "native"  # the two ids of kvasir's val.txt


def test_a_profile_saved_before_a_field_existed_still_matches():
    profile = get_profile("tiny").to_dict()
    older = json.loads(json.dumps(profile))
    del older["train"]["photometric_augment"]  # as runs started before the option existed saved it
    assert as_written_now(older) == json.loads(json.dumps(profile))


# ----------------------------------------------------------------------------- native resolution


@pytest.fixture
def empty_run(tmp_path) -> Path:
    """A run folder whose baseline predicts no polyp anywhere (its last layer gives -10), at a
    32 x 32 model size: its scores show at which resolution they were taken."""
    profile = get_profile("tiny")
    profile.train.image_size = 32
    torch.manual_seed(0)
    unet = build_baseline_unet(profile)
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(-10.0)
    BaselinePipeline(unet, profile).save_pretrained(tmp_path / "run" / "pipeline")
    return tmp_path / "run"


def test_segment_writes_each_mask_at_its_images_size(empty_run, tmp_path):
    write_pair(tmp_path / "frames", "wide.jpg", "wide.png", size=(48, 20))
    write_pair(tmp_path / "frames", "tall.png", "tall.png", size=(18, 40))
    for fit in ("stretch", "letterbox"):
        out = tmp_path / f"masks-{fit}"
        assert cli.main(["segment", "--checkpoint", str(empty_run), str(tmp_path / "frames" / "images"),
                         "--out", str(out), "--fit", fit]) == 0
        assert np.asarray(Image.open(out / "wide.png")).shape == (20, 48)  # [H, W] of its image
        assert np.asarray(Image.open(out / "tall.png")).shape == (40, 18)


def test_evaluate_scores_at_each_images_own_size_or_the_models(empty_run, tmp_path, capsys):
    sizes = {"a": (60, 20), "b": (40, 30), "c": (60, 20)}  # (W, H): two sizes, neither square
    for i, size in sizes.items():
        write_pair(tmp_path / "frames", f"{i}.jpg", f"{i}.png", size=size)
    scores = {}
    for resolution in ("native", "model"):
        per_image = tmp_path / f"{resolution}.jsonl"
        assert cli.main(["evaluate", "--checkpoint", str(empty_run), "--data", str(tmp_path / "frames"), "--split",
                         "all", "--resolution", resolution, "--per-image", str(per_image), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["resolution"] == resolution and summary["n"] == 3 and summary["dice"] == 0
        scores[resolution] = {row["id"]: row["hd95"] for row in map(json.loads, per_image.read_text().splitlines())}
    # A missed polyp scores the image's diagonal (metrics.py), so HD95 tells the size it was scored at.
    assert scores["native"] == pytest.approx({i: math.hypot(*size) for i, size in sizes.items()})
    assert scores["model"] == pytest.approx({i: math.hypot(32, 32) for i in sizes})


def test_letterbox_pads_to_a_square_and_crops_back():
    wide = np.random.default_rng(0).integers(1, 256, (20, 48, 3), dtype=np.uint8)
    (square,), (box,) = letterbox([wide])
    assert square.shape == (48, 48, 3) and box == (14, 0, 20, 48)
    assert (square[:14] == 0).all() and (square[34:] == 0).all()  # black above and below
    (back,) = unletterbox([square[..., 0]], [box])
    np.testing.assert_array_equal(back, wide[..., 0])


def test_letterbox_masks_are_those_of_the_unpadded_frames(empty_run, tmp_path):
    write_pair(tmp_path / "frames", "wide.jpg", "wide.png", size=(48, 20))
    pipe = BaselinePipeline.from_pretrained(empty_run)
    files = [tmp_path / "frames" / "images" / "wide.jpg"]
    (tmp_path / "out").mkdir()
    assert segment_files(pipe, files, tmp_path / "out", fit="letterbox") == 1
    assert np.asarray(Image.open(tmp_path / "out" / "wide.png")).shape == (20, 48)
    with pytest.raises(ValueError, match="fit"):
        segment_files(pipe, files, tmp_path / "out", fit="crop")


# ----------------------------------------------------------------------------- training on letterboxed frames


def tiny_profile(fit: str = "stretch"):
    """The tiny profile at a 32 x 32 model size, with ``fit``."""
    profile = get_profile("tiny")
    profile.train = dataclasses.replace(profile.train, image_size=32, fit=fit)
    return profile


def test_letterboxed_training_frames_have_black_bars_and_a_background_mask_there(tmp_path):
    clinicdb = clinicdb_like(tmp_path / "cvc-clinicdb", last=30)  # 24 x 16 frames of noise, box masks
    boxed, _, split = prepare_data(clinicdb, image_size=32, fit="letterbox")
    stretched, _, same_split = prepare_data(clinicdb, image_size=32)
    assert split == same_split and [s.id for s in boxed] == [s.id for s in stretched]
    # A 24 x 24 square scaled by 4/3: the frame fills rows 5.3..26.7, black above and below.
    for sample in boxed:
        assert sample.image.shape == (32, 32, 3)
        assert (sample.image[:5] == 0).all() and (sample.image[27:] == 0).all()
        assert not sample.mask[:5].any() and not sample.mask[27:].any() and sample.mask.any()
    assert all(s.image[:5].any() for s in stretched)  # stretched frames fill the square
    with pytest.raises(ValueError, match="fit must be one of"):
        train(tiny_profile("crop"), clinicdb, tmp_path / "never", model="baseline", log=lambda *_: None)


def test_a_stretch_and_a_letterbox_run_share_one_autoencoder(tmp_path):
    clinicdb = clinicdb_like(tmp_path / "cvc-clinicdb", last=30)
    plain, boxed = tiny_profile(), tiny_profile("letterbox")
    runs = {fit: prepare_data(clinicdb, image_size=32, fit=fit) for fit in ("stretch", "letterbox")}
    ids, where = runs["stretch"][2]["train"], runs["stretch"][2]["data"]
    for stage in ("autoencoder", "mask_decoder"):
        assert autoencoder_cache_key(plain, ids, where, 0, stage) == autoencoder_cache_key(boxed, ids, where, 0, stage)
    # One key, one autoencoder: the letterbox run trains it on the stretched frames too.
    shared = [autoencoder_samples(clinicdb, runs[fit][0], profile)
              for fit, profile in (("stretch", plain), ("letterbox", boxed))]
    assert [s.id for s in shared[0]] == [s.id for s in shared[1]] == ids
    for a, b, segmented in zip(*shared, runs["letterbox"][0]):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert not np.array_equal(b.image, segmented.image)  # the segmenter's frames are letterboxed


def test_a_letterbox_trained_model_records_its_fit_and_is_scored_with_it(tmp_path, capsys):
    clinicdb = clinicdb_like(tmp_path / "cvc-clinicdb", last=30)
    profile = tiny_profile("letterbox")
    profile.train = dataclasses.replace(profile.train, baseline_steps=2, val_every=2)
    run = tmp_path / "run"
    results = train(profile, clinicdb, run, model="baseline", log=lambda *_: None)
    assert json.loads((run / "pipeline" / "baseline_config.json").read_text())["train"]["fit"] == "letterbox"
    assert results["overrides"]["train.fit"] == "letterbox"  # results.json says what was trained

    pipe = load_pipeline(run)
    assert model_fit(pipe) == "letterbox"
    samples = data.load_dataset(clinicdb, ids=["1", "2", "3"])  # 24 x 16, at their own size
    summary, per_image = evaluate(pipe, samples)
    assert summary["fit"] == "letterbox"
    np.testing.assert_array_equal(per_image["hd95"], evaluate(pipe, samples, fit="letterbox")[1]["hd95"])
    assert evaluate(pipe, samples, fit="stretch")[0]["fit"] == "stretch"  # an explicit fit still overrides
    for flags, fit in (([], "letterbox"), (["--fit", "stretch"], "stretch"), (["--resolution", "model"], "letterbox")):
        assert cli.main(["evaluate", "--checkpoint", str(run), "--data", str(clinicdb), "--json", *flags]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fit"] == fit

    args = cli.build_parser().parse_args(["train", "--out", str(tmp_path / "o"), "--fit", "letterbox"])
    assert cli.profile_from_args(args).train.fit == "letterbox"  # `syndiff train --fit letterbox` asks the same

    # SynDiff's saved profile records it the same way.
    SynDiffPipeline.from_profile(tiny_profile("letterbox")).save_pretrained(tmp_path / "syndiff")
    assert model_fit(SynDiffPipeline.from_pretrained(tmp_path / "syndiff")) == "letterbox"


def test_a_model_saved_before_the_fit_was_recorded_reads_as_stretch(empty_run, tmp_path, capsys):
    config_file = empty_run / "pipeline" / "baseline_config.json"
    older = json.loads(config_file.read_text())
    del older["train"]["fit"]  # as every model saved before the field existed
    config_file.write_text(json.dumps(older))
    pipe = BaselinePipeline.from_pretrained(empty_run)
    assert pipe.profile.train.fit == "stretch" and model_fit(pipe) == "stretch"
    write_pair(tmp_path / "frames", "wide.jpg", "wide.png", size=(48, 20))
    assert evaluate(pipe, data.load_dataset(tmp_path / "frames"))[0]["fit"] == "stretch"
    assert cli.main(["evaluate", "--checkpoint", str(empty_run), "--data", str(tmp_path / "frames"), "--split", "all",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fit"] == "stretch"
    assert as_written_now(older)["train"]["fit"] == "stretch"  # and a run started then resumes as it was


# ----------------------------------------------------------------------------- photometric augmentation


def test_photometric_augmentation_is_seeded_changes_images_only_and_keeps_the_range():
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # [B, 3, S, S]
    y = (torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    first = augment.augment_batch(x.clone(), y.clone(), torch.Generator().manual_seed(3), flip=False, rotate=False,
                                  photometric=True)
    again = augment.augment_batch(x.clone(), y.clone(), torch.Generator().manual_seed(3), flip=False, rotate=False,
                                  photometric=True)
    other = augment.photometric_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other)
    assert torch.equal(first[1], y)  # the masks are untouched
    changed = first[0]
    assert changed.shape == x.shape and changed.dtype == x.dtype and not torch.allclose(changed, x)
    assert changed.min() >= -1 and changed.max() <= 1
    # Off, the batches are those of the flips alone: the same draws as before the option existed.
    plain = augment.augment_batch(x.clone(), y.clone(), torch.Generator().manual_seed(3), flip=True, rotate=False)
    flips = augment.random_flips(x.clone(), y.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(plain[0], flips[0]) and torch.equal(plain[1], flips[1])


def test_colour_jitter_invariants():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.6 - 0.3  # mid-range: nothing clips
    still = augment.colour_jitter(x, torch.Generator().manual_seed(0), brightness=0, contrast=0, saturation=0, hue=0)
    assert torch.allclose(still, x, atol=1e-5)  # no spread, no change
    turned = augment.colour_jitter(x, torch.Generator().manual_seed(0), brightness=0, contrast=0, saturation=0, hue=0.5)
    luma = torch.tensor(augment.LUMA).view(1, 3, 1, 1)
    assert not torch.allclose(turned, x, atol=1e-3)
    assert torch.allclose((turned * luma).sum(1), (x * luma).sum(1), atol=1e-4)  # a hue turn keeps the grey level


def test_blur_and_jpeg_leave_a_flat_image_flat_and_keep_the_range():
    flat = torch.full((3, 3, 16, 16), 0.2)
    blurred = augment.gaussian_blur(flat, torch.Generator().manual_seed(0), probability=1.0)
    assert torch.allclose(blurred, flat, atol=1e-6)  # a normalised kernel averages equal pixels to themselves
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    compressed = augment.jpeg_artefacts(x, torch.Generator().manual_seed(0), probability=1.0)
    assert not torch.allclose(compressed, x, atol=1e-2) and compressed.min() >= -1 and compressed.max() <= 1
    assert torch.equal(augment.jpeg_artefacts(x, torch.Generator().manual_seed(0), probability=0.0), x)


# ----------------------------------------------------------------------------- notebook 08's helpers

KVASIR_IDS = fake_kvasir_ids(8)
CLINICDB_IDS = ["1", "50", "100", "150", "200", "300", "400", "500"]  # frames of several video sequences


def fabricate_cell(out: Path, key: str, dice: dict[str, float], val_dice: float = 0.9) -> None:
    """A done cell of EXPERIMENTS' row ``key``: cell.json and one per_image file per scored set,
    every frame of a set with the Dice ``dice[set]`` plus a small frame-to-frame spread."""
    row = next(r for r in generalisation.EXPERIMENTS if r["key"] == key)
    folder = generalisation.cell_folder(out, row, 0)
    folder.mkdir(parents=True)
    for name, part in generalisation.scored_sets(row):
        ids = KVASIR_IDS if name == generalisation.KVASIR else CLINICDB_IDS
        spread = np.linspace(-0.05, 0.05, len(ids))
        lines = [{"id": i, "dice": dice[f"{name}:{part}"] + s, "iou": 0.5, "hd95": 10.0, "nsd": 0.3}
                 for i, s in zip(ids, spread)]
        (folder / f"per_image.{name}.{part}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "cell.json").write_text(json.dumps({"row": row["row"], "key": key, "cell_wall_seconds": 60.0,
                                                  "val_dice": val_dice}))


C2K = {"kvasir-seg:test": 0.5, "kvasir-seg:all": 0.55, "cvc-clinicdb:test": 0.8, "kvasir-seg:train+val": 0.6}


def test_report_tables_show_what_is_done_and_not_yet_run_for_the_rest(tmp_path):
    fabricate_cell(tmp_path, "c2k-syndiff", C2K)
    fabricate_cell(tmp_path, "c2k-baseline", {k: v - 0.1 for k, v in C2K.items()})
    lines = generalisation.report(tmp_path)
    state = generalisation.experiment_status(tmp_path)
    assert [(e, s["done"], s["cells"]) for e, s in state.items()] == [(1, 2, 8), (2, 0, 2), (3, 0, 2)]

    scores = generalisation.score_rows(lines, 1)
    assert len(scores[0]) == len(generalisation.SCORE_COLUMNS)
    assert not any("train+val" in r[0] for r in scores)  # the selection set is the choice table's
    by = {(r[0], r[1]): r for r in scores}
    plain = by[("Kvasir-SEG test", "SynDiff")]
    assert plain[2].startswith("50.0 \u00b1") and plain[6] == "+30.0 from ClinicDB test"
    assert by[("ClinicDB test", "SynDiff")][6] == "in-domain"
    assert by[("Kvasir-SEG test", "SynDiff + 100 copy-paste synthetic")][2:] == [generalisation.NOT_YET, *"----"]
    in_domain = by[("ClinicDB test", "SynDiff + 100 copy-paste synthetic")]
    assert in_domain[2:] == [generalisation.NOT_YET, *"---", "in-domain"]
    assert all(r[2] == generalisation.NOT_YET and r[3:6] == list("---") for r in generalisation.score_rows(lines, 2))

    pairs = {(r[0], r[1]): r for r in generalisation.pair_rows(lines, 1)}
    done = pairs[("Kvasir-SEG test", "SynDiff - Pixel U-Net")]
    assert done[2].startswith("+10.0 [") and done[3] == "8 frames" and done[4] == "better"
    groups = len({data.clinicdb_sequence(i) for i in CLINICDB_IDS})
    assert pairs[("ClinicDB test", "SynDiff - Pixel U-Net")][3] == f"{groups} sequences"  # ClinicDB: whole videos
    waiting = [r for r in pairs.values() if r[2] == generalisation.NOT_YET]
    assert waiting and all(r[1] != "SynDiff - Pixel U-Net" for r in waiting)  # the done pair is never "not yet"
    assert {r[1] for r in waiting} == {"SynDiff - Pixel U-Net, both photometric", "copy-paste - plain (SynDiff)",
                                       "photometric - plain (SynDiff)", "photometric - plain (Pixel U-Net)",
                                       "photometric + letterbox - photometric (SynDiff)",
                                       "photometric + copy-paste - photometric (SynDiff)",
                                       "photometric + zoom - photometric (SynDiff)"}
    assert len(pairs) == len(generalisation.expected_pairs(1))

    choices = generalisation.choice_rows(lines, 1)
    assert [r[3] for r in choices] == ["needs every variant"] * 8
    assert choices[0][1].startswith("60.0") and choices[2][1] == generalisation.NOT_YET
    assert choices[0][2] == "-" and choices[2][2] == generalisation.NOT_YET  # a plain row builds on nothing

    protocol = generalisation.protocol_rows(lines)
    assert [r[2] for r in protocol[:2]] == [generalisation.NOT_YET] * 2
    assert protocol[2][-1] == "reported, not rerun" and protocol[2][2] == "89.8" and "352x352" in protocol[2][1]
    assert protocol[0][1] == "128x128 px, no pretraining"  # the cpu profile's input size

    texts = generalisation.glue_texts(lines)
    assert texts["gen_c2k_syndiff_kvasir_test"].endswith("% Dice")
    assert texts["gen_c2k_syndiff_kvasir_test_drop"] == "+30.0 Dice points"
    assert texts["gen_c2k_syndiff_vs_c2k_baseline_kvasir_test"].startswith("+10.0 [")
    assert texts["gen_c2k_syndiff_vs_c2k_baseline_kvasir_test_verdict"] == "better"
    assert texts["gen_k2c_syndiff_clinicdb_all"] == texts["gen_exp1_syndiff_choice"] == generalisation.NOT_YET
    assert texts["gen_pranet_syndiff_vs_pranet_baseline_clinicdb_test"] == generalisation.NOT_YET
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", key) for key in texts)  # what a book page can cite
    points = generalisation.drop_points(lines)
    assert {(p["key"], p["test"]) for p in points} == {(k, t) for k in ("c2k-syndiff", "c2k-baseline")
                                                     for t in ("kvasir-seg:test", "kvasir-seg:all")}


def test_the_choice_is_made_on_the_selection_set_and_shows_only_the_chosen_rows_test_dice(tmp_path):
    for key, selection in (("c2k-syndiff", 0.6), ("c2k-syndiff-copypaste", 0.5), ("c2k-syndiff-photometric", 0.7),
                           ("c2k-syndiff-photometric-letterbox", 0.65), ("c2k-syndiff-photometric-copypaste", 0.68),
                           ("c2k-syndiff-photometric-zoom", 0.69)):
        # The photometric row has the best selection Dice and the worst test Dice: it is kept anyway.
        test = 0.3 if key.endswith("photometric") else 0.5
        fabricate_cell(tmp_path, key, C2K | {"kvasir-seg:train+val": selection, "kvasir-seg:test": test})
    lines = generalisation.report(tmp_path)
    rows = {r[0]: r for r in generalisation.choice_rows(lines, 1)}
    chosen = rows["SynDiff + photometric augmentation"]
    assert chosen[2] == "+10.0 [+10.0, +10.0] better"  # against the plain row, on the selection set
    assert chosen[3] == "kept" and chosen[4] == "30.0"
    assert rows["SynDiff"][3] == "-" and rows["SynDiff"][4] == "-"
    assert rows["SynDiff + photometric augmentation + random zoom"][2].endswith("worse")
    assert rows["Pixel U-Net"][3] == "needs every variant"
    texts = generalisation.glue_texts(lines)
    assert texts["gen_exp1_syndiff_choice"] == "c2k-syndiff-photometric"
    assert texts["gen_exp1_syndiff_choice_kvasir_test"] == "30.0 % Dice"
    assert texts["gen_exp1_syndiff_choice_kvasir_all"] == "55.0 % Dice"
    assert texts["gen_exp1_baseline_choice"] == texts["gen_exp1_baseline_choice_kvasir_all"] == generalisation.NOT_YET


def test_a_variant_is_kept_only_where_it_is_detectably_better_than_the_row_it_builds_on(tmp_path):
    """The zoom row beats the photometric row on the selection set by a hair, inside the noise:
    the simpler photometric row stays the choice although its mean is lower."""
    rng = np.random.default_rng(0)
    fabricate_cell(tmp_path, "c2k-syndiff", C2K)
    for key in ("c2k-syndiff-copypaste", "c2k-syndiff-photometric-letterbox", "c2k-syndiff-photometric-copypaste"):
        fabricate_cell(tmp_path, key, C2K)
    fabricate_cell(tmp_path, "c2k-syndiff-photometric", C2K | {"kvasir-seg:train+val": 0.7})
    fabricate_cell(tmp_path, "c2k-syndiff-photometric-zoom", C2K | {"kvasir-seg:train+val": 0.701})
    # Frame-to-frame noise on the zoom row's selection frames: its lead of 0.1 points is no gain.
    path = generalisation.cell_folder(tmp_path, {"key": "c2k-syndiff-photometric-zoom"}, 0) / \
        "per_image.kvasir-seg.train+val.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    noise = rng.normal(0, 0.1, len(records))
    noise -= noise.mean()
    path.write_text("".join(json.dumps(r | {"dice": r["dice"] + n}) + "\n" for r, n in zip(records, noise)))
    lines = generalisation.report(tmp_path)
    (choice,) = [ln for ln in lines if ln["kind"] == "choice"]
    assert choice["selection_dice"]["c2k-syndiff-photometric-zoom"] > choice["selection_dice"]["c2k-syndiff-photometric"]
    assert choice["chosen"] == "c2k-syndiff-photometric"
    assert choice["path"] == ["c2k-syndiff", "c2k-syndiff-photometric"]
    zoom = next(r for r in generalisation.choice_rows(lines, 1) if "zoom" in r[0])
    assert zoom[2].endswith("no detectable difference") and zoom[3] == "-"


def test_a_variant_that_builds_on_another_is_paired_with_it_and_takes_part_in_the_choice(tmp_path):
    """The letterbox row adds letterboxed frames to the photometric row and has no baseline
    partner: it is compared with c2k-syndiff-photometric alone, and the selection set weighs it
    beside SynDiff's other variants."""
    rows = generalisation.select_rows()
    keys = [r["key"] for r in rows]
    key = "c2k-syndiff-photometric-letterbox"
    row = rows[keys.index(key)]
    assert keys.index(key) == keys.index("c2k-baseline-photometric") + 1  # the next cell of the queue
    assert (row["experiment"], row["variant"], generalisation.model_kind(row)) == (1, "photometric + letterbox",
                                                                                 "syndiff")
    budget = generalisation.default_budget("cpu")
    train = experiments.cell_profile({"profile": "cpu"}, row, budget).train
    assert train.fit == "letterbox" and train.photometric_augment
    ours = [(t, a["key"], b["key"]) for t, a, b in generalisation.expected_pairs(1) if key in (a["key"], b["key"])]
    assert ours == [(t, key, "c2k-syndiff-photometric") for t in ("kvasir-seg:test", "kvasir-seg:all", "cvc-clinicdb:test")]

    fabricate_cell(tmp_path, "c2k-syndiff-photometric", C2K)
    fabricate_cell(tmp_path, key, {k: v + 0.05 for k, v in C2K.items()})
    fabricate_cell(tmp_path, "c2k-syndiff", {k: v + 0.10 for k, v in C2K.items()})  # not what it is compared with
    lines = generalisation.report(tmp_path)
    paired = [ln for ln in lines if ln["kind"] == "pair" and ln["key"] == key]
    assert {ln["against"] for ln in paired} == {"c2k-syndiff-photometric"}
    assert {ln["test"] for ln in paired} >= {"kvasir-seg:test", "kvasir-seg:all", "cvc-clinicdb:test"}
    table = {(r[0], r[1]): r for r in generalisation.pair_rows(lines, 1)}
    assert table[("Kvasir-SEG test", "photometric + letterbox - photometric (SynDiff)")][2:] == [
        "+5.0 [+5.0, +5.0]", "8 frames", "better"]
    assert not any("letterbox" in name and "Pixel U-Net" in name for _, name in table)  # no baseline partner expected
    texts = generalisation.glue_texts(lines)
    assert texts["gen_c2k_syndiff_photometric_letterbox_vs_c2k_syndiff_photometric_kvasir_test_verdict"] == "better"
    assert texts["gen_exp1_syndiff_choice"] == generalisation.NOT_YET  # copy-paste not scored yet

    fabricate_cell(tmp_path, "c2k-syndiff-copypaste", C2K)
    fabricate_cell(tmp_path, "c2k-syndiff-photometric-copypaste", C2K)
    fabricate_cell(tmp_path, "c2k-syndiff-photometric-zoom", C2K)
    (choice,) = [ln for ln in generalisation.report(tmp_path) if ln["kind"] == "choice"]
    assert choice["model"] == "syndiff" and choice["chosen"] == "c2k-syndiff"
    assert set(choice["selection_dice"]) == {"c2k-syndiff", "c2k-syndiff-copypaste", "c2k-syndiff-photometric", key,
                                             "c2k-syndiff-photometric-copypaste", "c2k-syndiff-photometric-zoom"}
    with pytest.raises(ValueError, match="builds_on 'c2k-syndiff-photometric' is no row of experiment 2"):
        generalisation.select_rows(rows=[r | {"experiment": 2} if r["key"] == key else r for r in rows])


def test_the_combined_variant_trains_with_photometric_augmentation_and_copy_paste_and_is_paired_with_photometric():
    key = "c2k-syndiff-photometric-copypaste"
    row = next(r for r in generalisation.select_rows() if r["key"] == key)
    train = experiments.cell_profile({"profile": "cpu"}, row, generalisation.default_budget("cpu")).train
    assert train.photometric_augment and train.fit == "stretch" and row["synthetic"] == 100
    ours = {(a["key"], b["key"]) for _, a, b in generalisation.expected_pairs(1) if key in (a["key"], b["key"])}
    assert ours == {(key, "c2k-syndiff-photometric")}  # one comparison: what copy-paste adds


def test_the_zoom_variant_trains_with_photometric_augmentation_and_the_zoom_and_is_paired_with_photometric():
    key = "c2k-syndiff-photometric-zoom"
    row = next(r for r in generalisation.select_rows() if r["key"] == key)
    train = experiments.cell_profile({"profile": "cpu"}, row, generalisation.default_budget("cpu")).train
    assert train.photometric_augment and train.zoom_augment and train.fit == "stretch" and not row.get("synthetic")
    ours = {(a["key"], b["key"]) for _, a, b in generalisation.expected_pairs(1) if key in (a["key"], b["key"])}
    assert ours == {(key, "c2k-syndiff-photometric")}
    plain = next(r for r in generalisation.select_rows() if r["key"] == "c2k-syndiff-photometric")
    assert not experiments.cell_profile({"profile": "cpu"}, plain, generalisation.default_budget("cpu")).train.zoom_augment


def test_the_zoom_keeps_image_and_mask_aligned_and_stays_in_the_frame():
    # The image's first channel is the mask itself (as -1 / 1): after the same zoom they must agree.
    y = torch.zeros(8, 1, 32, 32)
    y[:, :, 10:22, 8:20] = 1
    x = (y * 2 - 1).repeat(1, 3, 1, 1)  # [B, 3, S, S]
    zx, zy = augment.random_zooms(x.clone(), y.clone(), torch.Generator().manual_seed(0))
    assert zx.shape == x.shape and zy.shape == y.shape and set(zy.unique().tolist()) <= {0.0, 1.0}
    inside = (zx[:, :1] > 0).float()  # where the blown-up or shrunk image is "polyp"
    assert ((inside - zy).abs().mean(dim=(1, 2, 3)) < 0.03).all()  # nearest vs bilinear: a rim of pixels at most
    assert not torch.equal(zy, y) and zx.min() >= -1 and zx.max() <= 1
    # Zoomed out (s < 1), the frame shrinks inside a black border and the polyp with it.
    small = augment.random_zooms(x.clone(), y.clone(), torch.Generator().manual_seed(0), zoom=(0.5, 0.5))[1]
    assert torch.allclose(small.mean(dim=(1, 2, 3)), y.mean(dim=(1, 2, 3)) / 4, rtol=0.2)
    # Zoomed in (s > 1) by 2, a window of half the side: the polyp's share of the frame cannot shrink
    # unless the window cuts it, and a window of a quarter of the frame's area at most shows it whole.
    big = augment.random_zooms(x.clone(), y.clone(), torch.Generator().manual_seed(0), zoom=(2.0, 2.0))[1]
    assert (big.mean(dim=(1, 2, 3)) <= 4 * y.mean(dim=(1, 2, 3)) + 1e-6).all()
    # s = 1 leaves the pair as it is (no room to move the window).
    same = augment.random_zooms(x.clone(), y.clone(), torch.Generator().manual_seed(0), zoom=(1.0, 1.0))
    assert torch.allclose(same[0], x, atol=1e-5) and torch.equal(same[1], y)
    # Off, the batches are the flips' alone: no draw is taken for it.
    plain = augment.augment_batch(x.clone(), y.clone(), torch.Generator().manual_seed(3), flip=True, rotate=False)
    flips = augment.random_flips(x.clone(), y.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(plain[0], flips[0]) and torch.equal(plain[1], flips[1])


def test_names_glue_keys_and_the_committed_first_look():
    assert generalisation.set_name("cvc-clinicdb:train+val") == "ClinicDB train+val"
    assert generalisation.short_key("c2k-syndiff-photometric") == "c2k_syndiff_photometric"
    assert generalisation.short_key("cvc-clinicdb:train+val") == "clinicdb_trainval"
    plan = generalisation.plan_rows()
    assert len(plan) == len(generalisation.EXPERIMENTS)
    assert all(len(r) == len(generalisation.PLAN_COLUMNS) for r in plan)
    assert plan[0][3] == "ClinicDB" and plan[0][5] == "Kvasir-SEG train+val" and plan[-1][5] == "-"
    assert plan[0][4] == "Kvasir-SEG test + all; ClinicDB test" and plan[-1][3] == "Kvasir-SEG + ClinicDB"
    results = Path(__file__).resolve().parents[1] / "results" / "generalisation"
    look = generalisation.read_first_look(results / "first-look" / "fold0-grid-models.json")
    assert look["scores"][("syndiff", "kvasir-seg", "stretch")]["n"] == 1000
    assert {fit for _, _, fit in look["scores"]} == {"stretch", "letterbox"} and look["what"] and look["code"]


def test_chosen_frames_are_worst_median_best_by_dice_each_once():
    picks = generalisation.chosen_frames({"dice": np.array([0.5, 0.1, 0.9, 0.1, 0.7])})
    assert picks == [("worst", 1), ("worst 2", 3), ("median", 0), ("best", 2)]  # ties: the earlier frame first
    assert generalisation.chosen_frames({"dice": np.array([0.2, 0.8])}) == [("worst", 0), ("worst 2", 1)]
    assert generalisation.chosen_frames({"dice": np.array([0.4])}, n_worst=1) == [("worst", 0)]


def test_the_other_data_set_is_found_beside_the_data_and_counted_by_profile(tmp_path):
    (tmp_path / "cvc-clinicdb").mkdir()
    assert generalisation.find_kvasir("toy") is None
    assert generalisation.find_kvasir(tmp_path / "cvc-clinicdb") is None
    (tmp_path / "kvasir-seg").mkdir()
    assert generalisation.find_kvasir(tmp_path / "cvc-clinicdb") == tmp_path / "kvasir-seg"
    assert generalisation.find_kvasir("toy", tmp_path / "kvasir-seg") == tmp_path / "kvasir-seg"
    assert generalisation.find_kvasir("toy", tmp_path / "elsewhere") is None
    assert generalisation.cross_frame_count("tiny", 1000) == 36
    assert generalisation.cross_frame_count("cpu", 1000) == 1000
    assert generalisation.cross_frame_count("tiny", 20) == 20 and generalisation.cross_frame_count("cpu", 1000, 5) == 5


def test_a_runs_test_set_is_of_the_data_it_was_trained_on(tmp_path):
    data.save_split(data.build_split("toy"), tmp_path / "toy-run" / "split.json")
    home, ids = generalisation.run_test_set(tmp_path / "toy-run", "../somewhere/cvc-clinicdb")
    assert home == "toy" and ids == data.build_split("toy")["test"]
    clinicdb = clinicdb_like(tmp_path / "cvc-clinicdb", last=30)
    split = data.build_split(clinicdb) | {"data": "../moved/cvc-clinicdb"}  # recorded from another folder
    data.save_split(split, tmp_path / "run" / "split.json")
    assert generalisation.run_test_set(tmp_path / "run", clinicdb) == (str(clinicdb), split["test"])
    with pytest.raises(ValueError, match="was trained on ../moved/cvc-clinicdb"):
        generalisation.run_test_set(tmp_path / "run", "toy")


def test_the_sets_scored_are_the_runs_test_frames_then_kvasir_or_a_simulated_shift(tmp_path):
    data.save_split(data.build_split("toy"), tmp_path / "run" / "split.json")
    sets, note = generalisation.frame_sets(tmp_path / "run", "toy", tmp_path / "artifacts", "tiny", seed=0, n=4)
    assert list(sets) == ["toy test", "new toy frames", "shifted toy frames"]
    assert sets["toy test"] == ("toy", data.build_split("toy")["test"])
    assert sets["new toy frames"][1] == sets["shifted toy frames"][1] == [f"toy_{i:03d}" for i in range(4)]
    assert "Kvasir-SEG is absent" in note and "seed 1" in note and "trained on the toy dataset" in note
    ids = fake_kvasir_ids(40)
    kvasir = kvasir_like(tmp_path / "kvasir-seg", ids)
    sets, note = generalisation.frame_sets(tmp_path / "run", "toy", tmp_path / "artifacts", "tiny", kvasir=kvasir)
    assert list(sets) == ["toy test", "Kvasir-SEG"]
    assert sets["Kvasir-SEG"] == (kvasir, sorted(ids, key=data.natural_key)[:36])  # 36 at tiny, in id order
    assert note.startswith("Kvasir-SEG found: 36 of its 40 frames")


@pytest.fixture
def frames(tmp_path) -> Path:
    """Five frames of three sizes, none square, with box masks."""
    for i, size in enumerate([(48, 20), (24, 16), (40, 30), (48, 20), (24, 16)]):
        write_pair(tmp_path / "frames", f"f{i}.jpg", f"f{i}.png", size=size)
    return tmp_path / "frames"


def test_scoring_in_chunks_is_scoring_at_once_and_the_shown_masks_are_the_scored_ones(frames, tiny_pipe):
    profile = get_profile("tiny")
    profile.train.image_size = 32
    torch.manual_seed(0)
    baseline = BaselinePipeline(build_baseline_unet(profile), profile)  # random weights: no noise in its output
    ids = ["f3", "f0", "f4", "f1", "f2"]  # not in id order: the caller's order is kept
    summary, per_image = generalisation.score_frames(baseline, frames, ids, chunk=2)
    whole_summary, whole = evaluate(baseline, data.load_dataset(frames, ids=ids))
    assert list(per_image["id"]) == ids
    order = [list(whole["id"]).index(i) for i in ids]
    np.testing.assert_allclose(per_image["dice"], whole["dice"][order])
    assert summary["n"] == 5 and summary["dice"] == pytest.approx(whole_summary["dice"])
    assert summary.keys() == whole_summary.keys() and summary["fit"] == whole_summary["fit"]  # the settings, too
    assert generalisation.by_id(per_image) == pytest.approx(dict(zip(ids, per_image["dice"].tolist())))

    # SynDiff draws noise per call: a frame shown again is predicted in its own chunk, as scored.
    for fit in ("stretch", "letterbox"):
        _, scored = generalisation.score_frames(tiny_pipe, frames, ids, seed=3, fit=fit, chunk=2)
        wanted = [ids[i] for _, i in generalisation.chosen_frames(scored)]
        shown = generalisation.predict_frames(tiny_pipe, frames, ids, wanted, seed=3, fit=fit, chunk=2)
        assert list(shown) == wanted
        for i, (sample, mask) in shown.items():
            assert mask.shape == sample.mask.shape
            assert dice_score(mask, sample.mask) == pytest.approx(scored["dice"][ids.index(i)])


def test_fit_views_show_the_models_square_and_give_the_mask_back_at_the_frames_size(frames, tiny_pipe):
    (sample,) = data.load_dataset(frames, ids=["f0"])  # 48 x 20
    views = generalisation.fit_views(tiny_pipe, sample)
    size = tiny_pipe.profile.train.image_size
    assert set(views) == {"stretch", "letterbox"}
    for view in views.values():
        assert view["input"].shape == (size, size, 3) and view["input"].dtype == np.uint8
        assert view["mask"].shape == (20, 48) and 0 <= view["dice"] <= 1
    band = views["letterbox"]["input"][: size // 4]  # the black padding above the frame
    assert band.max() <= 1 and views["stretch"]["input"][: size // 4].max() > 1
    assert generalisation.widest(frames, ["f1", "f2", "f3", "f0"]) == "f3"  # 48 x 20, before f0 of the same size
    assert generalisation.widest(frames, ["f2", "f4"]) == "f4"


def test_the_simulated_shift_is_the_training_augmentation_scaled(tmp_path):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # [B, 3, S, S]
    same = generalisation.shift_images(x, torch.Generator().manual_seed(5), strength=1.0)
    assert torch.equal(same, augment.photometric_augment(x, torch.Generator().manual_seed(5)))
    assert torch.equal(generalisation.shift_images(x, torch.Generator().manual_seed(5), strength=0.0), x)
    stronger = generalisation.shift_images(x, torch.Generator().manual_seed(5), strength=2.0)
    assert stronger.shape == x.shape and stronger.min() >= -1 and stronger.max() <= 1

    folder = generalisation.write_shifted_toy(tmp_path / "shifted", n=3, seed=1, strength=1.0, size=32)
    again = generalisation.write_shifted_toy(tmp_path / "again", n=3, seed=1, strength=1.0, size=32)
    toy = data.make_toy_dataset(3, 32, seed=1)
    loaded = data.load_dataset(folder)
    assert [s.id for s in loaded] == [s.id for s in toy]
    for shifted, twin, original in zip(loaded, data.load_dataset(again), toy):
        np.testing.assert_array_equal(shifted.image, twin.image)  # seeded
        np.testing.assert_array_equal(shifted.mask, original.mask)  # the masks are the toy's
        assert not np.array_equal(shifted.image, original.image)
    plain = data.load_dataset(generalisation.write_shifted_toy(tmp_path / "plain", n=3, seed=1, strength=0.0, size=32))
    np.testing.assert_array_equal(plain[0].image, toy[0].image)  # strength 0: new frames, the same look
    wide = data.load_dataset(generalisation.write_shifted_toy(tmp_path / "wide", n=2, seed=1, aspect=4 / 3, size=32))
    assert wide[0].image.shape == (24, 32, 3) and wide[0].mask.shape == (24, 32)
    np.testing.assert_array_equal(wide[0].mask, toy[0].mask[4:28])  # cut about the centre


def test_polyp_size_table_bins_shares_and_scores_by_the_kvasir_frames_share(tmp_path):
    # Two masks of known shares, read from disk as polyp_shares reads them.
    root = tmp_path / "set"
    mask = write_pair(root, "a.png", "a.png", size=(10, 10))
    assert generalisation.polyp_shares(root) == {"a": pytest.approx(float((mask > 0).mean()))}
    shares = {generalisation.CLINICDB: {"1": 0.02, "2": 0.08, "3": 0.3, "4": 0.04},
              generalisation.KVASIR: {"k1": 0.01, "k2": 0.25, "k3": 0.5, "k4": 0.12}}
    dice = {"k1": 0.9, "k2": 0.05, "k3": 0.6, "k4": 0.8}
    rows = {r[0]: r for r in generalisation.size_rows(shares, dice)}
    assert list(rows) == ["under 5 %", "5-10 %", "10-20 %", "20 % or more", "all"]
    assert rows["under 5 %"][1:4] == [50.0, 25.0, 1] and rows["5-10 %"][3:] == [0, "-", "-", "-"]
    top = rows["20 % or more"]
    assert top[1:4] == [25.0, 50.0, 2] and top[4] == pytest.approx(32.5) and top[6] == pytest.approx(50.0)
    assert rows["all"][3] == 4 and rows["all"][6] == pytest.approx(25.0)  # one miss (Dice < 0.1) of four
    texts = generalisation.size_texts(shares, dice)
    assert texts["gen_size_large_kvasir"] == "50 %" and texts["gen_size_large_clinicdb"] == "25 %"
    assert texts["gen_size_large_dice"] == "32.5 %" and texts["gen_size_rest_dice"] == "85.0 %"
    absent = generalisation.size_texts(None, None)
    assert set(absent) == set(texts) and absent["gen_size_large_dice"] == generalisation.ABSENT
