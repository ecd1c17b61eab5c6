"""Tests for syndiff_lib.data: loaders on tiny fixture folders, up-front checks, toy set, splits.

Every fixture file is written into tmp_path; nothing touches the network. The check of the
real CVC-ClinicDB runs only when the shared copy is next to the checkout (or SYNDIFF_DATA).
"""

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from syndiff_lib import data
from syndiff_lib.data import DataError


def _real_clinicdb() -> Path | None:
    """The real CVC-ClinicDB folder: $SYNDIFF_DATA (the folder itself or its parent), else ../shared/data."""
    candidates = []
    if os.environ.get("SYNDIFF_DATA"):
        env = Path(os.environ["SYNDIFF_DATA"])
        candidates += [env, env / "cvc-clinicdb"]
    candidates.append(Path(__file__).resolve().parents[2] / "shared/data/cvc-clinicdb")
    return next((p for p in candidates if (p / "images").is_dir() and (p / "masks").is_dir()), None)


REAL = _real_clinicdb()
needs_real = pytest.mark.skipif(
    REAL is None, reason="real CVC-ClinicDB not found (set SYNDIFF_DATA or place it at ../shared/data/cvc-clinicdb)"
)


def toy(n=3, size=32, seed=0):
    return data.make_toy_dataset(n=n, size=size, seed=seed)


def write(path: Path, array: np.ndarray, **save_args) -> Path:
    """Write an array as an image file whose format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path, **save_args)
    return path


def write_dataset(root: Path, stems, image_dir="images", mask_dir="masks", image_ext=".png", mask_ext=".png",
                  **save_args):
    """A dataset folder made of toy samples; returns the samples written, in stem order."""
    samples = toy(n=len(stems))
    for stem, sample in zip(stems, samples):
        write(root / image_dir / f"{stem}{image_ext}", sample.image, **save_args)
        write(root / mask_dir / f"{stem}{mask_ext}", sample.mask.astype(np.uint8) * 255, **save_args)
    return samples


# ----------------------------------------------------------------------------- loaders per layout


def test_png_layout_is_clinicdb_and_sorted_naturally(tmp_path):
    samples = write_dataset(tmp_path, ["1", "2", "10"])
    assert data.detect_layout(tmp_path) == "clinicdb-png"
    assert [i for i, _, _ in data.find_pairs(tmp_path)] == ["1", "2", "10"]
    report = data.check_dataset(tmp_path)
    assert report["n"] == 3 and report["sizes"] == {"32x32": 3} and report["layout"] == "clinicdb-png"
    loaded = data.load_dataset(tmp_path)
    assert [s.id for s in loaded] == ["1", "2", "10"]
    for got, want in zip(loaded, samples):
        np.testing.assert_array_equal(got.image, want.image)
        np.testing.assert_array_equal(got.mask, want.mask)
        assert got.mask.dtype == bool and got.source == "real"


@pytest.mark.parametrize("names", [("Original", "Ground Truth"), ("original", "ground truth")])
def test_tiff_layout(tmp_path, names):
    samples = write_dataset(tmp_path, ["1", "2"], *names, image_ext=".tif", mask_ext=".tiff")
    assert data.detect_layout(tmp_path) == "clinicdb-tiff"
    loaded = data.load_dataset(tmp_path)
    np.testing.assert_array_equal(loaded[1].image, samples[1].image)
    np.testing.assert_array_equal(loaded[1].mask, samples[1].mask)


def test_kvasir_jpeg_masks_are_binarised_above_127(tmp_path):
    stems = ["cju0qkwl35piu0993l0dewei2", "cju0roawvklrq0799vmjorwfv"]
    samples = write_dataset(tmp_path, stems, image_ext=".jpg", mask_ext=".jpg", quality=75)
    assert data.detect_layout(tmp_path) == "kvasir"
    data.check_dataset(tmp_path)  # JPEG noise around the mask edge must pass
    for got, want in zip(data.load_dataset(tmp_path), samples):
        assert (got.mask == want.mask).mean() > 0.98


def test_generic_folder_pairs_by_stem(tmp_path):
    sample = toy(1)[0]
    write(tmp_path / "Images" / "case_a.png", sample.image)
    write(tmp_path / "Masks" / "case_a.bmp", sample.mask.astype(np.uint8) * 255)
    (tmp_path / "Images" / "notes.txt").write_text("not an image, ignored")
    assert data.detect_layout(tmp_path) == "folder"
    (loaded,) = data.load_dataset(tmp_path)
    assert loaded.id == "case_a"
    np.testing.assert_array_equal(loaded.mask, sample.mask)


def test_resize_to_square_and_ids(tmp_path):
    image = np.zeros((20, 40, 3), np.uint8)
    mask = np.zeros((20, 40), np.uint8)
    mask[5:15, 10:30] = 255
    write(tmp_path / "images" / "7.png", image)
    write(tmp_path / "masks" / "7.png", mask)
    write_dataset(tmp_path, ["8"])
    (sample,) = data.load_dataset(tmp_path, size=16, ids=["7"])
    assert sample.image.shape == (16, 16, 3) and sample.mask.shape == (16, 16) and sample.mask.dtype == bool
    assert sample.mask[8, 8] and not sample.mask[0, 0]
    with pytest.raises(DataError, match="99"):
        data.load_dataset(tmp_path, ids=["99"])


def test_letterboxed_samples_keep_the_frames_proportions_with_black_bars(tmp_path):
    """A 48 x 24 frame with a round polyp: letterboxed to 32 x 32 it keeps its proportions
    (the disc stays round) between black bars whose mask is background; stretched, it does not."""
    image = np.full((24, 48, 3), 180, np.uint8)  # [H, W, 3], no pixel black
    yy, xx = np.mgrid[:24, :48]
    mask = ((yy - 12) ** 2 + (xx - 24) ** 2 <= 8 ** 2).astype(np.uint8) * 255  # a disc of radius 8
    image[mask > 0] = (230, 120, 100)
    write(tmp_path / "images" / "1.png", image)
    write(tmp_path / "masks" / "1.png", mask)
    (boxed,) = data.load_dataset(tmp_path, size=32, fit="letterbox")
    (stretched,) = data.load_dataset(tmp_path, size=32)
    assert boxed.image.shape == (32, 32, 3) and boxed.mask.shape == (32, 32) and boxed.mask.dtype == bool

    # The 48 x 48 square is scaled by 2/3: the frame fills rows 8..23, black above and below.
    assert (boxed.image[:8] == 0).all() and (boxed.image[24:] == 0).all()
    assert not boxed.mask[:8].any() and not boxed.mask[24:].any()
    assert (boxed.image[8:24] > 0).all()

    def height_over_width(m):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        return (rows[-1] - rows[0] + 1) / (cols[-1] - cols[0] + 1)

    assert height_over_width(boxed.mask) == pytest.approx(1.0, abs=0.1)  # round, as in the frame
    assert height_over_width(stretched.mask) == pytest.approx(2.0, abs=0.2)  # squeezed: twice as tall as wide
    (kept,) = data.letterbox([image])[0]
    assert kept.shape == (48, 48, 3) and (kept[12:36] == image).all()  # the frame itself, unscaled, in the middle

    # Without a size there is nothing to square; a fit that is neither is refused.
    assert data.load_dataset(tmp_path, fit="letterbox")[0].image.shape == (24, 48, 3)
    with pytest.raises(ValueError, match="fit"):
        data.load_dataset(tmp_path, size=32, fit="crop")


def test_read_image_converts_grey_and_names_broken_file(tmp_path):
    grey = write(tmp_path / "grey.png", np.full((4, 5), 80, np.uint8))
    assert data.read_image(grey).shape == (4, 5, 3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        data.read_image(broken)
    broken_tiff = tmp_path / "broken.tif"
    broken_tiff.write_bytes(b"II*\x00 not a real TIFF")
    with pytest.raises(DataError, match="broken.tif"):
        data.read_image(broken_tiff)


# ----------------------------------------------------------------------------- bad inputs


def _corrupt_image(root):
    (root / "images" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return "images/2.png"


def _mask_of_other_size(root):
    write(root / "masks" / "2.png", np.zeros((10, 12), np.uint8))
    return "masks/2.png"


def _photo_saved_as_mask(root):
    write(root / "masks" / "2.png", toy(1, size=32, seed=5)[0].image)
    return "masks/2.png"


def _image_without_mask(root):
    (root / "masks" / "2.png").unlink()
    return "images/2.png"


def _mask_without_image(root):
    (root / "images" / "2.png").unlink()
    return "masks/2.png"


def _sixteen_bit_image(root):
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(root / "images" / "2.png")
    return "images/2.png"


@pytest.mark.parametrize(
    "spoil",
    [_corrupt_image, _mask_of_other_size, _photo_saved_as_mask, _image_without_mask, _mask_without_image,
     _sixteen_bit_image],
)
def test_check_names_the_offending_file(tmp_path, spoil):
    write_dataset(tmp_path, ["1", "2", "3"])
    offender = spoil(tmp_path)
    with pytest.raises(DataError) as error:
        data.check_dataset(tmp_path)
    assert offender in str(error.value) and str(tmp_path) in str(error.value)
    with pytest.raises(DataError, match="2.png"):
        data.load_dataset(tmp_path)


def test_check_lists_every_problem_in_one_message(tmp_path):
    write_dataset(tmp_path, ["1", "2", "3"])
    _corrupt_image(tmp_path)
    _photo_saved_as_mask(tmp_path)
    (tmp_path / "masks" / "3.png").unlink()
    with pytest.raises(DataError) as error:
        data.check_dataset(tmp_path)
    message = str(error.value)
    assert "3 problem(s)" in message and "not a binary mask" in message and "images/3.png" in message


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="images/: empty folder"):
        data.check_dataset(tmp_path)
    (tmp_path / "masks").rmdir()
    with pytest.raises(DataError, match="missing masks/"):
        data.detect_layout(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        data.detect_layout(tmp_path / "nowhere")


@needs_real
def test_real_clinicdb_passes_the_check():
    report = data.check_dataset(REAL)
    assert report["n"] == 612 and report["sizes"] == {"384x288": 612} and report["layout"] == "clinicdb-png"
    assert report["n_empty_masks"] == 0


# ----------------------------------------------------------------------------- ClinicDB facts


def test_pranet_ids():
    assert len(data.PRANET_TEST_IDS) == 62 == len(set(data.PRANET_TEST_IDS))
    file = (REAL or Path("/nonexistent")) / "test_ids_pranet.txt"
    if not file.exists():
        pytest.skip("test_ids_pranet.txt not found beside the real data")
    assert set(data.PRANET_TEST_IDS) == set(file.read_text().split())


def test_clinicdb_sequences_cover_all_612_frames():
    assert len(data.CLINICDB_SEQUENCES) == 29
    firsts, lasts = zip(*data.CLINICDB_SEQUENCES)
    assert firsts == (1, *(last + 1 for last in lasts[:-1]))  # contiguous, no gap
    assert lasts[-1] == 612
    assert [data.clinicdb_sequence(f) for f in ("1", 25, "26", 612)] == [1, 1, 2, 29]
    for bad in (0, 613, "toy_001"):
        with pytest.raises(ValueError):
            data.clinicdb_sequence(bad)


# ----------------------------------------------------------------------------- splits

ALL_IDS = [str(i) for i in range(1, 613)]


def _check_disjoint_and_complete(split, ids):
    train, val, test = (set(split[k]) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(ids)


def _sequences(ids):
    return {data.clinicdb_sequence(i) for i in ids}


def test_pranet_split():
    split = data.make_split(ALL_IDS, "pranet", seed=1)
    _check_disjoint_and_complete(split, ALL_IDS)
    assert set(split["test"]) == set(data.PRANET_TEST_IDS)
    assert not _sequences(split["val"]) & _sequences(split["train"])  # val takes whole sequences
    assert 40 <= len(split["val"]) <= 75
    with pytest.raises(ValueError, match="ClinicDB"):
        data.make_split(["toy_000", "toy_001"], "pranet")


def test_kfold_covers_every_id_once_with_whole_sequences():
    seen = []
    for fold in range(5):
        split = data.make_split(ALL_IDS, "kfold", fold=fold, folds=5)
        _check_disjoint_and_complete(split, ALL_IDS)
        assert not _sequences(split["test"]) & _sequences(split["train"] + split["val"])
        assert not _sequences(split["val"]) & _sequences(split["train"])
        seen += split["test"]
    assert sorted(seen, key=int) == ALL_IDS
    sizes = [len(data.make_split(ALL_IDS, "kfold", fold=k)["test"]) for k in range(5)]
    assert max(sizes) - min(sizes) <= 10  # balanced frame counts


def test_random_split_is_seeded_and_keeps_groups_whole():
    ids = [f"toy_{i:03d}" for i in range(40)]
    a, b = data.make_split(ids, "random", seed=3), data.make_split(ids, "random", seed=3)
    assert a == b and a != data.make_split(ids, "random", seed=4)
    _check_disjoint_and_complete(a, ids)
    groups = {i: int(i[-3:]) // 4 for i in ids}  # 10 groups of 4
    split = data.make_split(ids, "random", groups=groups, test_fraction=0.2, val_fraction=0.2)
    _check_disjoint_and_complete(split, ids)
    parts = [{groups[i] for i in split[k]} for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_split_round_trip_and_default_scheme(tmp_path):
    split = data.make_split(ALL_IDS, "pranet")
    assert data.load_split(data.save_split(split, tmp_path / "split.json")) == split
    bad = dict(split, val=split["val"] + split["test"][:1])
    with pytest.raises(DataError, match="more than one"):
        data.load_split(data.save_split(bad, tmp_path / "bad.json"))
    assert data.default_scheme("clinicdb-tiff") == "pranet"
    assert data.default_scheme("kvasir") == data.default_scheme(None) == "random"


# ----------------------------------------------------------------------------- toy data and Kvasir


def test_toy_dataset_is_seeded_and_never_empty(tmp_path):
    a, b, c = toy(4, 64, seed=0), toy(4, 64, seed=0), toy(4, 64, seed=1)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, c[0].image)
    assert all(s.mask.any() and s.source == "toy" and s.image.dtype == np.uint8 for s in a)
    assert np.array_equal(toy(2, 64)[1].image, a[1].image)  # sample i does not depend on n
    root = data.write_toy_dataset(tmp_path / "toy", n=4, size=64)
    assert data.detect_layout(root) == "folder" and data.default_scheme(root) == "random"
    loaded = data.load_dataset(root)
    assert [s.id for s in loaded] == [s.id for s in a]
    np.testing.assert_array_equal(loaded[2].image, a[2].image)
    assert len(data.load_dataset("toy", size=32)) == 64


def _zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return path


def _jpeg(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG")
    return buffer.getvalue()


def test_kvasir_unpack_checksum_and_traversal(tmp_path):
    sample = toy(1)[0]
    archive = _zip(tmp_path / "kvasir-seg.zip", {
        "Kvasir-SEG/images/a1.jpg": _jpeg(sample.image),
        "Kvasir-SEG/masks/a1.jpg": _jpeg(sample.mask.astype(np.uint8) * 255),
    })
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    folder = data.unpack_archive(archive, tmp_path / "out", digest)
    assert folder == tmp_path / "out" / "Kvasir-SEG" and data.detect_layout(folder) == "kvasir"
    with pytest.raises(DataError, match="checksum mismatch"):
        data.unpack_archive(archive, tmp_path / "out2", "0" * 64)
    assert not (tmp_path / "out2").exists()
    evil = _zip(tmp_path / "evil.zip", {"Kvasir-SEG/images/a.jpg": b"x", "../escaped.txt": b"x"})
    with pytest.raises(DataError, match="escaped.txt"):
        data.unpack_archive(evil, tmp_path / "out4", hashlib.sha256(evil.read_bytes()).hexdigest())
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out4").exists()


# ----------------------------------------------------------------------------- the one split builder


def _write_pairs(root: Path, ids, size=16, suffix=".png") -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    sample = toy(1, size=size)[0]
    for i in ids:
        Image.fromarray(sample.image).save(root / "images" / f"{i}{suffix}")
        Image.fromarray(sample.mask.astype(np.uint8) * 255).save(root / "masks" / f"{i}.png")
    return root


def test_build_split_uses_each_data_sets_own_default(tmp_path):
    clinicdb = _write_pairs(tmp_path / "clinicdb", ALL_IDS)
    pranet = data.build_split(clinicdb)
    assert pranet["scheme"] == "pranet" and pranet["test"] == data.make_split(ALL_IDS, "pranet")["test"]
    assert pranet["data"] == str(clinicdb)
    for k in range(5):  # --fold K means the same frames wherever the split is made
        fold = data.build_split(clinicdb, fold=k, seed=2)
        assert fold["scheme"] == "kfold" and fold == data.make_split(ALL_IDS, "kfold", fold=k, seed=2) | {"data": str(clinicdb)}
    everything = data.build_split(clinicdb, scheme="all")
    assert everything["test"] == sorted(ALL_IDS, key=int) and not everything["train"] and not everything["val"]
    toy_split = data.build_split("toy", seed=3)
    assert toy_split["scheme"] == "random" and toy_split["data"] == "toy"
    assert sorted(toy_split["train"] + toy_split["val"] + toy_split["test"]) == data.dataset_ids("toy")
    with pytest.raises(ValueError, match="--fold needs CVC-ClinicDB"):
        data.build_split("toy", fold=1)
    with pytest.raises(ValueError, match="unknown split scheme"):
        data.build_split(clinicdb, scheme="pranett")


def test_published_split_keeps_the_authors_test_set_and_carves_val_from_train(tmp_path):
    ids = [f"c{i:02d}" for i in range(30)]
    root = _write_pairs(tmp_path / "kvasir-like", ids, suffix=".jpg")
    (root / "train.txt").write_text("\n".join(ids[:24]) + "\n")
    (root / "val.txt").write_text("\n".join(ids[24:]) + "\n")
    split = data.build_split(root, seed=1)
    assert split["scheme"] == "published" and split["test"] == ids[24:]
    assert sorted(split["train"] + split["val"]) == ids[:24] and 1 <= len(split["val"]) <= 4
    assert data.build_split(root, seed=1) == split and data.build_split(root, seed=2)["val"] != split["val"]
    (root / "val.txt").write_text("c29\nnot_there\n")
    with pytest.raises(DataError, match="not_there"):
        data.build_split(root)


@pytest.mark.skipif(not (REAL_KVASIR := Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg").is_dir(),
                    reason="Kvasir-SEG is not in ../shared/data/kvasir-seg")
def test_real_kvasir_gets_its_authors_split():
    split = data.build_split(REAL_KVASIR)
    assert split["scheme"] == "published" and len(split["test"]) == 120
    assert len(split["train"]) + len(split["val"]) == 880
