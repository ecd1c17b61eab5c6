"""Generalisation beyond CVC-ClinicDB: Kvasir-SEG's split, masks named other ways, several
data sets at once, scoring at each image's own size, and photometric augmentation.

Every fixture file is written into tmp_path. The check of the real Kvasir-SEG runs only when
the shared copy is next to the checkout (../shared/data/kvasir-seg).
"""

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from syndiff_lib import augment, cli, data
from syndiff_lib.config import get_profile
from syndiff_lib.data import DataError
from syndiff_lib.pipeline import BaselinePipeline, letterbox, segment_files, unletterbox
from syndiff_lib.baseline import build_baseline_unet
from syndiff_lib.train import as_written_now, prepare_data, train

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
    assert profile.train.photometric_augment
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
