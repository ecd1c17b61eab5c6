"""Polyp datasets: loaders, up-front checks, the toy set, and train/val/test splits.

Notebook 01 (data) teaches everything in this module. It imports no model code: arrays
here are plain numpy, channels last.

    H, W   image height and width in pixels
    S      side of a square image (the toy set, or after load_dataset(size=S))
    image  uint8 [H, W, 3], RGB
    mask   bool  [H, W], True on the polyp

Layouts the loaders understand (folder names are matched in any case):

    clinicdb-png    images/1.png ... + masks/1.png ...        (the common CVC-ClinicDB copy)
    clinicdb-tiff   Original/1.tif ... + Ground Truth/1.tif ... (the original distribution)
    kvasir          images/*.jpg + masks/*.jpg                 (Kvasir-SEG)
    folder          images/ + masks/, any of .png .jpg .jpeg .tif .tiff .bmp

In every layout an image and its mask pair up by name, whatever their suffixes (a.jpg with
a.png): the mask is called like its image (masks/a.png) or like it plus one of MASK_SUFFIXES
(masks/a_mask.png, a-mask.png, a_segmentation.png). The id is the image's stem.

CVC-ClinicDB frames come from 29 video sequences whose frames are near-duplicates, so the
"pranet" and "kfold" splits keep a sequence whole wherever they are free to choose, and the
"random" split keeps whole whatever groups it is given. Kvasir-SEG's split is its authors'
(train.txt / val.txt, or KVASIR_TEST_IDS when a copy lacks those files).

Several data sets at once: ``data`` may be a list of folders. Each keeps its own split (the
PraNet split of ClinicDB beside the published one of Kvasir-SEG), the parts are joined
(train = every part's train, and so on), and ids are prefixed with the folder's name
("kvasir-seg/cju0qkwl35piu0993l0dewei2", "cvc-clinicdb/12") so that they stay unique. A list
of one folder is that folder: no prefix.

Resolution and aspect ratio. The model sees square S x S frames, made by one of two fits
(``config.FITS``). "stretch", the default: ``load_dataset(size=S)`` and
``pipeline.images_to_tensor`` squeeze each frame to the square (ClinicDB's 384x288 and
Kvasir's 1920x1072 lose their proportions). "letterbox": :func:`letterbox` pads the frame
with black to a square first (the endoscope's border is black too; a mask is padded with
background), so it is scaled without distortion, and :func:`unletterbox` crops the padding
off the prediction. A model is trained with one fit (``TrainConfig.fit``, applied by
``load_dataset(size=S, fit=...)`` before any augmentation), records it, and is evaluated
and used with it unless ``--fit`` says otherwise; a model saved before the field existed
was trained stretched. Scores and written masks are at each image's own size: the pipeline
resizes its prediction back (``syndiff evaluate --resolution native``, the default).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

from .config import FITS

MASK_THRESHOLD = 127  # a mask pixel is foreground when its grey value is > 127
GREY_LOW, GREY_HIGH = 32, 223  # grey levels strictly between these are "neither black nor white"
MAX_GREY_FRACTION = 0.05  # more such pixels than this -> "not a binary mask" (see check_dataset)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TOY_SIZE = 64  # frames in the built-in toy dataset
PUBLISHED_SPLIT_FILES = ("train.txt", "val.txt")  # a data set's own split (Kvasir-SEG ships these); val.txt is its test set
# Endings a mask's stem may carry beyond its image's (compared in any case): the names other
# data sets use (ISIC's "_segmentation", many Kaggle sets' "_mask").
MASK_SUFFIXES = ("_mask", "-mask", "_segmentation")

# The PraNet test split of CVC-ClinicDB (Fan et al., MICCAI 2020): 62 frames; the other 550 train.
PRANET_TEST_IDS: tuple[str, ...] = (
    "14", "21", "25", "31", "42", "50", "52", "61", "65", "66", "73", "80", "89", "100",
    "106", "119", "134", "148", "154", "163", "166", "171", "179", "181", "185", "191",
    "205", "240", "251", "266", "279", "287", "300", "307", "349", "353", "374", "381",
    "388", "397", "400", "404", "425", "429", "431", "442", "453", "459", "464", "474",
    "481", "483", "492", "526", "529", "545", "555", "559", "561", "569", "571", "575",
)

# Kvasir-SEG's published test split (Jha et al., MMM 2020: the 120 ids of its val.txt); the
# other 880 frames train. Used when a copy of Kvasir-SEG lacks train.txt / val.txt.
KVASIR_TEST_IDS: tuple[str, ...] = (
    "cju0s690hkp960855tjuaqvv0", "cju0sr5ghl0nd08789uzf1raf", "cju0sxqiclckk08551ycbwhno", "cju0t4oil7vzk099370nun5h9",
    "cju0tl3uz8blh0993wxvn7ly3", "cju0u2g7pmnux0801vkk47ivj", "cju0u82z3cuma0835wlxrnrjv", "cju0ue769mxii08019zqgdbxn",
    "cju0vtox5ain6099360pu62rp", "cju13cgqmnhwn0988yrainhcp", "cju13fwthn9mq0835gacxgy01", "cju13hp5rnbjx0835bf0jowgx",
    "cju14g8o4xui30878gkgbrvqj", "cju14hjh2ob2o0835ouz3r5aa", "cju14pxbaoksp0835qzorx6g6", "cju15czxqp3lv0835jvhgzurz",
    "cju15jr8jz8sb0855ukmkswkz", "cju15l5ubz9yh0855b3ivdpse", "cju15mhjczc8z0801kit5c6di", "cju15ptjtppz40988odsm9azx",
    "cju15wdt3zla10801odjiw7sy", "cju160wshltz10993i1gmqxbe", "cju16ach3m1da0993r1dq3sn2", "cju16b6ynq8e40988m8vx0xnj",
    "cju16d65tzw9d0799ouslsw25", "cju16fpvhzypl0799p9phnlx6", "cju16jgnyzp970878melv7r25", "cju16whaj0e7n0855q7b6cjkm",
    "cju32qr9tbvsj08013pkpjenq", "cju32srle1xfq083575i3fl75", "cju32upim1z7u0988l883nqp6", "cju32zhbnc1oy0801iyv1ix6p",
    "cju330ofbc2l30801th5g3hw6", "cju33231uy4gi0993qc7b1jch", "cju334jzo261t0835yqudnfs1", "cju336l68y7if0993wf092166",
    "cju3381d8bz3h07991xtl7ra0", "cju33belnbyhm0878yxl42233", "cju33eqwbcch208012jikwdky", "cju33jon3ygbj0993pu22a4k6",
    "cju33mirdc8mj0799k33wzoes", "cju33o12x2jm50988944mxq0v", "cju33qpdvc9g0087825jhf3s9", "cju33w4sdcivk0855x879zht7",
    "cju33x0f22peh0988g0ln7w5v", "cju7dp3dw2k4n0755zhe003ad", "cju7dqcwi2dz00850gcmr2ert", "cju7druhp2gp308715i6km7be",
    "cju7dsrtb2f8i085064kwugfk", "cju7dtb1e2j0t0818deq51ib3", "cju7dubap2g0w0801fgl42mg9", "cju7dvl5m2n4t0755hlnnjjet",
    "cju7dwe282dc309876rco45ts", "cju7dxffn2eam0817qxosfwch", "cju7dymur2od30755eg8yv2ht", "cju7dz5yy2i7z0801ausi7rna",
    "cju7ea4om2l910801bohqjccy", "cju7ebe962hr409872ovibahw", "cju7ecl9i2i060987xawjp4l0", "cju7eea9b2m0z0801ynqv1fqu",
    "cju85nr8elly209872w9n5m0s", "cju85omszllp30850b6rm9mi3", "cju85plp7lmkw0850rx42jdpf", "cju85qefyln6v0850szeb9byi",
    "cju85rkbnlo1c08503uxcpax1", "cju87kbcen2av0987usezo8kn", "cju87li0zn3yb0817kbwgjiz8", "cju87mrypnb1e0818scv1mxxg",
    "cju87nkyrnb970801q84m47yt", "cju87ox0kncom0801b98hqnd2", "cju87q6yoneim0871dl4phvkd", "cju87r56lnkyp0755hz30leew",
    "cju87tyddnnad0755bj0wxahe", "cju87vqa0ndwg0850onjdz7ol", "cju87xn2snfmv0987sc3d9xnq", "cju87z6o6nh73085045bzsx6o",
    "cju87zv8lni0o0850hbbecbq6", "cju8828oxnool0801qno9luhr", "cju884985nlmx0817vzpax3y4", "cju8ceacrsqkr0755hdz145es",
    "cju8cgi2kspp308011nxdtjp6", "cju8chdlqsu620755azjty1tj", "cju8chxndsre008015uisl4si", "cju8cj10qsrau0871o2dr6ai1",
    "cju8clorgsuwn08714toqb7v6", "cju8cwy02t9eq08185qn12c02", "cju8czvnztbf40871b4m7t78w", "cju8d2q30tfhs0801n7lx77xl",
    "cju8d4jgatgpj0871q2ophhkm", "cju8dic9mtppa0987swn23wbc", "cju8djdqztu6408506pzhlo18", "cju8dk7eztzup08182yxko5zh",
    "cju8dm2cau2km0818jsv9eeq2", "cju8dn0c3u2v50801k8rvq02f", "cju8doa16u5gh0818w1ywda3q", "cju8dpa89u6l80818dj6lldh9",
    "cju8dqkrqu83i0818ev74qpxq", "cjyzjzssvd8pq0838f4nolj5l", "cjyzk8qieoboa0848ogj51wwm", "cjyzkmjy8evns070165gf9dmq",
    "cjyzkpsbjdsjq07211dfi4sru", "cjyzl833ndne80838pzuq6ila", "cjyzlw7f9faqr070129au64sq", "cjyztzaqtrv430848l8xgcerw",
    "cjyzu3reghjya0794w7pwoi50", "cjyzu9th0qt4r0a46pyl4zik0", "cjyzufihqquiw0a46jatrbwln", "cjyzuio1qgh040763k56deohv",
    "cjyzul1qggwwj07216mhiv5sy", "cjyzurzvohqnr0794es1itzek", "cjz14qsk2wci60794un9ozwmw", "ck2395w2mb4vu07480otsu6tw",
    "ck2bxiswtxuw80838qkisqjwz", "ck2bxknhjvs1x0794iogrq49k", "ck2bxlujamu330725szlc2jdu", "ck2bxpfgxu2mk0748gsh7xelu",
    "ck2bxqz3evvg20794iiyv5v2m", "ck2bxskgxxzfv08386xkqtqdy", "ck2bxw18mmz1k0725litqq2mc", "ck2da7fwcjfis07218r1rvm95",
)

# (first frame, last frame) of each of ClinicDB's 29 video sequences, from its README.
CLINICDB_SEQUENCES: tuple[tuple[int, int], ...] = (
    (1, 25), (26, 50), (51, 67), (68, 78), (79, 103), (104, 126), (127, 151), (152, 177),
    (178, 199), (200, 205), (206, 227), (228, 252), (253, 277), (278, 297), (298, 317),
    (318, 342), (343, 363), (364, 383), (384, 408), (409, 428), (429, 447), (448, 466),
    (467, 478), (479, 503), (504, 528), (529, 546), (547, 571), (572, 591), (592, 612),
)


class DataError(ValueError):
    """Raised with ONE message that names the folder and lists every offending file and its problem."""


@dataclass
class Sample:
    """One image and its polyp mask (notebook 01)."""

    id: str  # file stem, e.g. "17"
    image: np.ndarray  # uint8 [H, W, 3] RGB
    mask: np.ndarray  # bool [H, W], grey value > MASK_THRESHOLD
    source: str = "real"  # "real" | "toy" | "synthetic"

    def __post_init__(self):
        image, mask = self.image, self.mask
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"Sample {self.id}: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        if mask.dtype != bool or mask.shape != image.shape[:2]:
            raise ValueError(f"Sample {self.id}: mask must be bool {image.shape[:2]}, got {mask.dtype} {mask.shape}")


def natural_key(text: str) -> list:
    """Sort key that puts "2" before "10": digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


# ----------------------------------------------------------------------------- reading files


_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # PIL modes with 16 or 32 bits per pixel: refused


def _read_pixels(path: Path, want: str) -> np.ndarray:
    """Read one file as uint8 RGB [H, W, 3] (want="rgb") or grey [H, W] (want="grey")."""
    mode = None
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            pixels = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                mode = im.mode
                if mode not in _WIDE_MODES:
                    pixels = np.asarray(im.convert("RGB" if want == "rgb" else "L"))
    except Exception as error:  # PIL and tifffile raise many types for a broken file
        raise ValueError(f"cannot be read ({type(error).__name__}: {error})") from None
    if mode in _WIDE_MODES:
        raise ValueError(f"is a {mode} image, expected 8 bits per channel")
    if pixels.size == 0:  # tifffile returns an empty array for a TIFF it cannot parse
        raise ValueError("cannot be read (no pixels found)")
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.dtype != np.uint8:
        raise ValueError(f"has dtype {pixels.dtype}, expected 8 bits per channel")
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        pixels = pixels[..., :3]  # drop alpha
    elif pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    elif pixels.ndim != 2:
        raise ValueError(f"has shape {pixels.shape}, cannot be read as RGB or grey")
    if want == "rgb" and pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)  # grey -> [H, W, 3]
    if want == "grey" and pixels.ndim == 3:
        return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)  # [H, W]
    return np.ascontiguousarray(pixels)


def read_image(path) -> np.ndarray:
    """Read one image file as uint8 [H, W, 3] RGB, or raise a DataError naming the file (notebook 01)."""
    path = Path(path)
    try:
        return _read_pixels(path, "rgb")
    except (ValueError, OSError) as error:
        raise DataError(f"{path}: {error}") from None


def read_mask(path) -> np.ndarray:
    """Read one mask file as bool [H, W] (grey value > MASK_THRESHOLD), or raise a DataError (notebook 01)."""
    path = Path(path)
    try:
        return _read_pixels(path, "grey") > MASK_THRESHOLD
    except (ValueError, OSError) as error:
        raise DataError(f"{path}: {error}") from None


def files_to_segment(inputs, out_dir) -> list[Path]:
    """The image files ``syndiff segment`` will read, checked before any model is loaded.

    ``inputs`` are files and folders; a folder gives its image files (hidden files and other
    suffixes left out), a file named twice counts once. One DataError lists every problem:
    a missing input, a file that is not an image or cannot be read, two inputs that would
    write the same mask name (51.png and 51.jpg both give 51.png), a mask that would
    overwrite a file already in ``out_dir``, and an ``out_dir`` that is a file. Each image is
    opened and dropped again, so the check holds one image in memory at a time.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: --out names a file, not a folder; choose a new or empty folder")
    files, problems = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(_image_files(item), key=lambda p: natural_key(p.name))
        elif not item.exists():
            problems.append(f"{item}: no such file or folder")
        elif item.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{item}: not an image file ({' '.join(IMAGE_SUFFIXES)})")
        else:
            files.append(item)
    files = list({f.resolve(): f for f in files}.values())  # the same file named twice is segmented once
    by_mask: dict[str, Path] = {}
    for f in files:
        name = f"{f.stem}.png"
        if name in by_mask:
            problems.append(f"{f}: would write the same mask {name} as {by_mask[name]}; rename one or segment them apart")
        by_mask.setdefault(name, f)
        if (out_dir / name).exists():
            problems.append(f"{out_dir / name}: already exists and would be overwritten; choose a new or empty --out")
        try:
            _read_pixels(f, "rgb")
        except (ValueError, OSError) as error:
            problems.append(f"{f}: {error}")
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        listing = "\n".join(f"  {p}" for p in problems)
        raise DataError(f"{len(problems)} problems with the images to segment:\n{listing}")
    if not files:
        raise DataError(f"no images ({' '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, inputs))}")
    return files


def _grey_fraction(grey: np.ndarray) -> float:
    """Fraction of pixels that are clearly neither black nor white."""
    return float(((grey > GREY_LOW) & (grey < GREY_HIGH)).mean())


# ----------------------------------------------------------------------------- finding pairs


def _child_dir(root: Path, name: str) -> Path | None:
    """The subfolder of root called `name`, in any case, or None."""
    for child in root.iterdir():
        if child.is_dir() and child.name.lower() == name:
            return child
    return None


def _image_files(folder: Path) -> list[Path]:
    """The image files of a folder, hidden files and other suffixes left out."""
    return [p for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES]


def _folders(root) -> tuple[str, Path, Path]:
    """(layout, image folder, mask folder) of a dataset root, or DataError."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    original, ground_truth = _child_dir(root, "original"), _child_dir(root, "ground truth")
    if original and ground_truth:
        return "clinicdb-tiff", original, ground_truth
    images, masks = _child_dir(root, "images"), _child_dir(root, "masks")
    if images and masks:
        files = _image_files(images)
        suffixes, stems = {p.suffix.lower() for p in files}, [p.stem for p in files]
        if suffixes and suffixes <= {".jpg", ".jpeg"}:
            return "kvasir", images, masks
        if suffixes == {".png"} and all(s.isdigit() and 1 <= int(s) <= 612 for s in stems):
            return "clinicdb-png", images, masks
        return "folder", images, masks
    found = sorted(child.name + "/" for child in root.iterdir() if child.is_dir())
    missing = "masks/" if images else "images/" if masks else "images/ and masks/ (or Original/ and Ground Truth/)"
    raise DataError(f"{root}: no dataset layout recognised, missing {missing}; subfolders found: {found or 'none'}")


def detect_layout(root) -> str:
    """Name the layout of a dataset folder: "clinicdb-png", "clinicdb-tiff", "kvasir" or "folder" (notebook 01)."""
    return _folders(root)[0]


def _mask_owners(stem: str, image_stems) -> list[str]:
    """The image stems a mask's stem can belong to: its own, and its own less a MASK_SUFFIXES ending."""
    owners = [stem] if stem in image_stems else []
    for suffix in MASK_SUFFIXES:
        if stem.lower().endswith(suffix) and stem[: -len(suffix)] in image_stems:
            owners.append(stem[: -len(suffix)])
    return owners


def _scan(root) -> tuple[str, list[tuple[str, Path, Path]], list[str]]:
    """(layout, pairs, problems): pairs matched by name (see the module docstring), problems as
    "file: what is wrong"; a mask that fits two images, or a second mask of one image, is a problem."""
    root = Path(root)
    layout, image_dir, mask_dir = _folders(root)
    problems, by_stem = [], []
    for folder in (image_dir, mask_dir):
        files = {}
        for path in sorted(_image_files(folder), key=lambda p: natural_key(p.name)):
            if path.stem in files:
                problems.append(f"{path.relative_to(root)}: same stem as {files[path.stem].name}")
            else:
                files[path.stem] = path
        if not files:
            problems.append(f"{folder.relative_to(root)}/: empty folder (no {' '.join(IMAGE_SUFFIXES)} files)")
        by_stem.append(files)
    images, masks = by_stem
    mask_of, disputed = {}, set()  # image stem -> its mask file; images a mask fits ambiguously
    for stem, path in masks.items():
        owners = _mask_owners(stem, images)
        name = path.relative_to(root)
        if len(owners) > 1:
            problems.append(f"{name}: ambiguous, it could be the mask of {' or '.join(images[o].name for o in owners)}; "
                            "rename it")
            disputed.update(owners)
        elif not owners:
            problems.append(f"{name}: mask without an image in {image_dir.name}/")
        elif owners[0] in mask_of:
            problems.append(f"{name}: a second mask for {images[owners[0]].name} (beside {mask_of[owners[0]].name}); "
                            "keep one")
        else:
            mask_of[owners[0]] = path
    for stem in images.keys() - mask_of.keys() - disputed:
        problems.append(f"{images[stem].relative_to(root)}: image without a mask in {mask_dir.name}/")
    ids = sorted(mask_of, key=natural_key)
    return layout, [(i, images[i], mask_of[i]) for i in ids], sorted(problems, key=natural_key)


def _raise_problems(root, problems: list[str]) -> None:
    """One DataError: one line for one problem, else a count and one line per problem."""
    if len(problems) == 1:
        raise DataError(f"dataset {root}: {problems[0]}")
    if problems:
        listing = "\n".join(f"  {p}" for p in problems)
        raise DataError(f"dataset {root} has {len(problems)} problem(s):\n{listing}")


def find_pairs(root) -> list[tuple[str, Path, Path]]:
    """List (id, image_path, mask_path), sorted naturally by id (1, 2, ..., 10) (notebook 01).

    Raises one DataError for every image without a mask, mask without an image, mask that
    could belong to two images, and second mask of one image.
    """
    _, pairs, problems = _scan(root)
    _raise_problems(root, problems)
    return pairs


def _try_read(path: Path, want: str, root: Path, problems: list[str]) -> np.ndarray | None:
    """_read_pixels, but a failure is appended to problems (named relative to root) and gives None."""
    try:
        return _read_pixels(path, want)
    except (ValueError, OSError) as error:
        problems.append(f"{path.relative_to(root)}: {error}")
        return None


def check_dataset(root) -> dict:
    """Open every pair up front and raise ONE DataError listing every problem found (notebook 01).

    Problems: a missing or empty folder, an image without a mask or a mask without an image,
    a file that cannot be read or is not 8-bit RGB/grey, an image and mask of different
    sizes, and a mask that is not binary. The binary rule: after converting the mask to
    grey, more than MAX_GREY_FRACTION (5%) of its pixels strictly between GREY_LOW (32)
    and GREY_HIGH (223) -> "not a binary mask". ClinicDB's anti-aliased edges (at most
    0.04% of a frame) and JPEG noise around Kvasir masks pass; a photo saved as a mask
    (mostly mid-grey) or a soft probability map does not. Masks that pass are binarised
    with > MASK_THRESHOLD by the loaders.

    Two label conventions that would read as empty masks are refused too, each in one line
    that says how to fix it: masks stored as {0, 1} (or any labels all at or below
    MASK_THRESHOLD) instead of {0, 255}, and a data set whose masks are all empty.

    Returns {"root", "layout", "n", "sizes": {"384x288": 612}, "foreground_fraction_mean",
    "n_empty_masks"}; sizes are written width x height.
    """
    root = Path(root)
    layout, pairs, problems = _scan(root)
    sizes, foreground, faint = {}, [], []
    for _, image_path, mask_path in pairs:
        image, grey = _try_read(image_path, "rgb", root, problems), _try_read(mask_path, "grey", root, problems)
        mask_name = mask_path.relative_to(root)
        if grey is not None and _grey_fraction(grey) > MAX_GREY_FRACTION:
            problems.append(
                f"{mask_name}: not a binary mask ({_grey_fraction(grey):.1%} of pixels are grey "
                f"between {GREY_LOW} and {GREY_HIGH}, at most {MAX_GREY_FRACTION:.0%} allowed)"
            )
        elif image is not None and grey is not None and image.shape[:2] != grey.shape:
            (h, w), (mh, mw) = image.shape[:2], grey.shape
            problems.append(f"{mask_name}: size {mw}x{mh} differs from its image {w}x{h}")
        elif image is not None and grey is not None:
            h, w = grey.shape
            sizes[f"{w}x{h}"] = sizes.get(f"{w}x{h}", 0) + 1
            foreground.append(float((grey > MASK_THRESHOLD).mean()))
            if 0 < grey.max() <= MASK_THRESHOLD:  # labelled, but every label reads as background
                faint.append((mask_name, int(grey.max())))
    problems += _label_convention_problems(f"{_folders(root)[2].name}/", faint, foreground)
    _raise_problems(root, sorted(problems, key=natural_key))
    return {
        "root": str(root),
        "layout": layout,
        "n": len(pairs),
        "sizes": sizes,
        "foreground_fraction_mean": float(np.mean(foreground)),
        "n_empty_masks": foreground.count(0.0),
    }


def _label_convention_problems(mask_dir: str, faint: list, foreground: list) -> list[str]:
    """One problem line for masks whose labels all read as background, one for a data set
    without any polyp pixel; each says how to fix the files (check_dataset)."""
    problems = []
    if faint:
        (first, value), more = faint[0], len(faint) - 1
        others = f" and {more} more mask(s)" if more else ""
        problems.append(f"{first}{others}: labels at most {value}, so every pixel reads as background (polyp is > "
                        f"{MASK_THRESHOLD}); masks stored as {{0, 1}} must be saved as {{0, 255}} (multiply by 255)")
    if foreground and not faint and max(foreground) == 0:
        problems.append(f"{mask_dir}: all {len(foreground)} masks are empty (no pixel > {MASK_THRESHOLD}), so there is "
                        "no polyp to learn or score; check that these are the right masks")
    return problems


def letterbox(frames) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    """Pad each frame, an image [H, W, 3] or a mask [H, W], with zeros to [L, L(, 3)],
    L = max(H, W), the frame in the middle: black for an image, as the endoscope's own border
    is, and background for a mask. A square then scales without distortion. Returns
    (squares, boxes): box = (top, left, H, W) of the frame in its square (notebook 08).

    The one definition of a letterbox: training (:func:`load_dataset` with ``fit="letterbox"``)
    and inference (``pipeline.predict_native``) pad alike, so the model sees the same squares."""
    squares, boxes = [], []
    for frame in frames:
        h, w = frame.shape[:2]
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        square = np.zeros((side, side, *frame.shape[2:]), frame.dtype)  # [L, L, 3] or [L, L]
        square[top:top + h, left:left + w] = frame
        squares.append(square)
        boxes.append((top, left, h, w))
    return squares, boxes


def unletterbox(masks, boxes) -> list[np.ndarray]:
    """Crop the padding off predictions made on letterbox's squares: [L, L] -> each frame's [H, W]."""
    return [np.asarray(m)[top:top + h, left:left + w] for m, (top, left, h, w) in zip(masks, boxes)]


def check_fit(fit: str) -> None:
    """Refuse a ``fit`` that is not one of FITS, before any work."""
    if fit not in FITS:
        raise ValueError(f"fit (--fit) must be one of {', '.join(FITS)}, got {fit!r}")


def _resize(image: np.ndarray, mask: np.ndarray, size: int, fit: str = "stretch") -> tuple[np.ndarray, np.ndarray]:
    """The sample as a size x size square: "stretch" resizes it as it is (aspect ratio NOT
    kept), "letterbox" pads image and mask to a square first (:func:`letterbox`). Area or
    bilinear for the image, nearest for the mask."""
    if fit == "letterbox":
        (image, mask), _ = letterbox([image, mask])  # one box for both: they share H and W
    shrinking = size < min(image.shape[:2])
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    image = cv2.resize(image, (size, size), interpolation=interpolation)  # [S, S, 3]
    mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0  # [S, S]
    return image, mask


def _pick(ids, available: dict, root) -> list[str]:
    """The requested ids (all when ids is None), sorted naturally; DataError naming any not available."""
    wanted = list(available) if ids is None else [str(i) for i in ids]
    unknown = [i for i in wanted if i not in available]
    if unknown:
        raise DataError(f"dataset {root}: ids not found: {', '.join(unknown[:20])}")
    return sorted(wanted, key=natural_key)


def load_dataset(root, size: int | None = None, ids=None, check: bool = True, fit: str = "stretch") -> list[Sample]:
    """Load a dataset folder as a list of Samples, sorted naturally by id (notebook 01).

    root: a dataset folder (any layout above), or "toy" / None for make_toy_dataset().
    size: resize every sample to size x size, as ``fit`` says: "stretch" does not keep the
        aspect ratio (ClinicDB's 384x288 frames are squeezed), "letterbox" pads image and
        mask to a square first (black, background: :func:`letterbox`). The mask is
        thresholded first, then resized nearest. Without ``size``, ``fit`` changes nothing.
    ids: load only these ids (DataError if one is not there).
    check: run check_dataset first, so every problem is reported before any work starts.
    The toy set is the default make_toy_dataset(n=64, seed=0) drawn at size (default 128);
    its frames are square, so both fits give the same samples.
    A list of several folders loads each in turn, ids prefixed with its name (dataset_ids).
    """
    check_fit(fit)
    datasets = as_datasets(root)
    if len(datasets) > 1:
        named = _named(datasets)
        unknown = [i for i in map(str, ids or ()) if "/" not in i or i.split("/", 1)[0] not in named]
        if unknown:
            raise DataError(f"ids not found in {', '.join(named)}: {', '.join(unknown[:20])} (ids of several data "
                            "sets start with the data set's name, e.g. kvasir-seg/cju0qkwl35piu0993l0dewei2)")
        samples = []
        for name, part in named.items():
            wanted = None if ids is None else _unprefixed(ids, name)
            if wanted == []:
                continue  # none of this data set's frames asked for
            for sample in load_dataset(part, size, wanted, check, fit):
                sample.id = f"{name}/{sample.id}"
                samples.append(sample)
        return samples
    root = datasets[0]
    if root is None or str(root) == "toy":
        toy = {sample.id: sample for sample in make_toy_dataset(size=size or 128)}
        return [toy[i] for i in _pick(ids, toy, "toy")]
    if check:
        check_dataset(root)
    pairs = {id_: (image_path, mask_path) for id_, image_path, mask_path in find_pairs(root)}
    samples = []
    for id_ in _pick(ids, pairs, root):
        image_path, mask_path = pairs[id_]
        image, mask = read_image(image_path), read_mask(mask_path)  # [H, W, 3], [H, W]
        if image.shape[:2] != mask.shape:
            raise DataError(f"{mask_path}: size {mask.shape[::-1]} differs from its image {image.shape[1::-1]}")
        if size is not None:
            image, mask = _resize(image, mask, size, fit)
        samples.append(Sample(id_, image, mask))
    return samples


# ----------------------------------------------------------------------------- the toy dataset


def _toy_sample(index: int, size: int, seed: int) -> Sample:
    """One procedural endoscopy-like frame: mucosa, vessels, one polyp, highlights, black border."""
    rng = np.random.default_rng([seed, index])  # sample i does not depend on n
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5  # [S, S] each, in [-0.5, 0.5)

    def smooth_noise(cells: int) -> np.ndarray:
        grid = rng.standard_normal((cells, cells)).astype(np.float32)
        return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)  # [S, S]

    # 1. Mucosa: pinkish red, smooth texture, light falling off towards the edge.
    texture = 0.08 * smooth_noise(6) + 0.04 * smooth_noise(16)  # [S, S]
    light = 1.0 - 1.2 * (x**2 + y**2) + texture  # [S, S]
    base = np.array([200, 95, 85], np.float32) * rng.uniform(0.85, 1.1, 3).astype(np.float32)
    image = base * light[..., None]  # [S, S, 3]

    # 2. Vessels: a few thin darker curves.
    vessels = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(2, 5)):
        heading = rng.uniform(0, 2 * np.pi) + rng.normal(0, 0.4, 12).cumsum()  # a slowly turning direction
        points = (size / 16 * np.stack([np.cos(heading), np.sin(heading)], 1)).cumsum(0) + rng.uniform(0, size, 2)
        cv2.polylines(vessels, [points.astype(np.int32)], False, 1.0, thickness=max(1, size // 96))
    image *= 1.0 - 0.25 * cv2.GaussianBlur(vessels, (3, 3), 0)[..., None]

    # 3. Polyp: an ellipse whose radius wobbles with a few Fourier terms, lighter and domed.
    cx, cy = rng.uniform(-0.18, 0.18, 2)
    rx, ry = rng.uniform(0.09, 0.2, 2)
    angle = np.arctan2(y - cy, x - cx)  # [S, S]
    wobble = 1.0 + sum(rng.uniform(0, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    distance = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) / wobble  # [S, S], 1 on the boundary
    mask = distance <= 1.0  # [S, S]
    dome = np.clip(1.0 - distance**2, 0, 1) * (1.0 - 0.6 * (y - cy) / ry).clip(0.3, 1.6)  # lit from above
    polyp_colour = np.array([225, 125, 105], np.float32)
    image = np.where(mask[..., None], polyp_colour * (0.75 + 0.35 * dome[..., None] + texture[..., None]), image)
    rim = (distance > 1.0) & (distance < 1.15)
    image[rim] *= 0.8  # a shadow around the polyp

    # 4. Specular highlights: small white spots, some on the polyp.
    highlights = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(2, 6)):
        on_polyp = rng.random() < 0.5
        centre = (np.array([cx, cy]) + rng.normal(0, 0.04, 2)) if on_polyp else rng.uniform(-0.35, 0.35, 2)
        px, py = ((centre + 0.5) * size).astype(int)
        axes = (int(rng.integers(1, max(2, size // 40) + 1)), int(rng.integers(1, max(2, size // 64) + 1)))
        cv2.ellipse(highlights, (int(px), int(py)), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    highlights = cv2.GaussianBlur(highlights, (3, 3), 0)[..., None]
    image = image * (1 - highlights) + 250.0 * highlights

    # 5. Endoscope border: an octagon with black corners; the mask stays inside it.
    visible = (np.abs(x) < 0.47) & (np.abs(y) < 0.47) & (np.abs(x) + np.abs(y) < 0.68)
    image[~visible] = rng.uniform(0, 6)
    image = np.clip(image + rng.normal(0, 2.0, image.shape), 0, 255).astype(np.uint8)  # [S, S, 3]
    return Sample(f"toy_{index:03d}", image, mask & visible, source="toy")


def make_toy_dataset(n: int = TOY_SIZE, size: int = 128, seed: int = 0) -> list[Sample]:
    """A procedural, seeded, endoscopy-like dataset: n frames of size x size, one polyp each (notebook 01).

    Every toy mask holds exactly one polyp and is never empty (ClinicDB has no empty
    masks either). Sample i depends only on (i, size, seed), not on n. Ids are "toy_000", ...
    """
    if n < 1 or size < 16:
        raise ValueError(f"make_toy_dataset needs n >= 1 and size >= 16, got n={n}, size={size}")
    return [_toy_sample(i, size, seed) for i in range(n)]


def write_toy_dataset(dest, n: int = TOY_SIZE, size: int = 128, seed: int = 0) -> Path:
    """Write the toy dataset as dest/images/<id>.png + dest/masks/<id>.png, usable as --data (notebook 01)."""
    dest = Path(dest)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "masks").mkdir(parents=True, exist_ok=True)
    for sample in make_toy_dataset(n, size, seed):
        Image.fromarray(sample.image).save(dest / "images" / f"{sample.id}.png")
        Image.fromarray(sample.mask.astype(np.uint8) * 255).save(dest / "masks" / f"{sample.id}.png")
    return dest


# ----------------------------------------------------------------------------- Kvasir-SEG


def unpack_archive(archive, dest, sha256: str) -> Path:
    """Check a downloaded archive's SHA-256, unpack it safely into dest, and return the folder
    holding images/ and masks/ (notebook 01).

    Nothing in this project downloads at run time: fetch the archive yourself (Kvasir-SEG is
    at https://datasets.simula.no/kvasir-seg/) and pass the checksum you trust. Members that
    would land outside dest (absolute paths, "..", links) are refused before anything is written.
    """
    archive, dest = Path(archive), Path(dest)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != str(sha256).lower():
        raise DataError(f"{archive}: checksum mismatch, expected sha256 {sha256}, got {digest}")
    with zipfile.ZipFile(archive) as zf:
        unsafe = [
            info.filename
            for info in zf.infolist()
            if info.filename.startswith(("/", "\\"))
            or ".." in re.split(r"[/\\]", info.filename)
            or ":" in info.filename
            or (info.external_attr >> 16) & 0o170000 == 0o120000  # a symbolic link
        ]
        if unsafe:
            raise DataError(f"{archive}: refusing to unpack members outside the folder: {', '.join(unsafe)}")
        zf.extractall(dest)
    for folder in sorted([dest, *dest.rglob("*")], key=lambda p: len(p.parts)):
        if folder.is_dir() and _child_dir(folder, "images") and _child_dir(folder, "masks"):
            return folder
    raise DataError(f"{archive}: no folder with images/ and masks/ inside the archive")


# ----------------------------------------------------------------------------- splits


def clinicdb_frame(frame_id) -> int | None:
    """The frame number of a ClinicDB id ("17" -> 17), or None for anything else."""
    text = str(frame_id)
    return int(text) if text.isdigit() and 1 <= int(text) <= CLINICDB_SEQUENCES[-1][1] else None


def clinicdb_sequence(frame_id) -> int:
    """The video sequence (1..29) of a ClinicDB frame id such as "17" or 17 (notebook 01)."""
    frame = clinicdb_frame(frame_id)
    if frame is None:
        raise ValueError(f"{frame_id!r} is not a CVC-ClinicDB frame id (1..612)")
    return next(k for k, (first, last) in enumerate(CLINICDB_SEQUENCES, start=1) if first <= frame <= last)


def _carve(ids: list[str], group_of: dict, fraction: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Take whole groups, in a seeded random order, until about fraction * len(ids) ids are taken."""
    count = Counter(group_of[i] for i in ids)  # frames per group
    groups = sorted(count, key=lambda g: natural_key(str(g)))
    target, taken, n_taken = fraction * len(ids), set(), 0
    for k in rng.permutation(len(groups)):
        if abs(n_taken + count[groups[k]] - target) < abs(n_taken - target):  # closer to the target with it
            taken.add(groups[k])
            n_taken += count[groups[k]]
    return [i for i in ids if group_of[i] in taken], [i for i in ids if group_of[i] not in taken]


def _deal_into_folds(count: Counter, folds: int, rng: np.random.Generator) -> dict:
    """Assign each group (count: frames per group) to a fold so that folds hold near-equal numbers of frames."""
    groups = sorted(count, key=lambda g: natural_key(str(g)))
    groups = [groups[k] for k in rng.permutation(len(groups))]  # the seed breaks ties
    fold_of, size = {}, [0] * folds
    for group in sorted(groups, key=lambda g: -count[g]):  # biggest group to the lightest fold
        fold_of[group] = int(np.argmin(size))
        size[fold_of[group]] += count[group]
    while True:  # then swap a group of the heaviest fold with a smaller one of the lightest
        heavy, light = int(np.argmax(size)), int(np.argmin(size))
        gap = size[heavy] - size[light]
        swaps = [(abs(gap - 2 * (count[a] - count[b])), a, b) for a in groups if fold_of[a] == heavy
                 for b in groups if fold_of[b] == light and 0 < count[a] - count[b] < gap]
        best = min(swaps, key=lambda swap: swap[0], default=None)
        if best is None or best[0] >= gap:
            return fold_of
        _, a, b = best
        fold_of[a], fold_of[b] = light, heavy
        size[heavy] += count[b] - count[a]
        size[light] += count[a] - count[b]


def make_split(ids, scheme: str = "pranet", *, fold: int = 0, folds: int = 5, val_fraction: float = 0.1,
               test_fraction: float = 0.1, seed: int = 0, groups: dict | None = None) -> dict:
    """Split ids into disjoint train / val / test lists (notebook 01).

    "pranet": test = PRANET_TEST_IDS found in ids (ids must be ClinicDB frame ids);
        val = whole video sequences carved from the rest (seeded), train = the remainder.
        The PraNet test frames share sequences with train: the benchmark is leaky, kfold is not.
    "kfold": the groups (default: ClinicDB's 29 sequences) are dealt into `folds` folds of
        near-equal frame counts, each group wholly in one fold; test = fold `fold`; val =
        whole groups carved from the other folds.
    "random": for other data and the toy set; test and val are drawn at random, keeping
        each group whole when `groups` ({id: group}) is given.
    val_fraction is a fraction of the ids left after the test set; test_fraction is used
    by "random" only. Returns {"scheme", "seed", "fold", "folds", "train", "val", "test"}.
    """
    ids = [str(i) for i in ids]
    not_clinicdb = [i for i in ids if clinicdb_frame(i) is None]
    if scheme not in ("pranet", "kfold", "random"):
        raise ValueError(f"make_split: scheme must be 'pranet', 'kfold' or 'random', got {scheme!r}")
    if len(set(ids)) != len(ids):
        raise ValueError("make_split: ids contain duplicates")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise ValueError(f"make_split: fractions must be in [0, 1), got val={val_fraction}, test={test_fraction}")
    if not 0 <= fold < folds:
        raise ValueError(f"make_split: fold must be in 0..{folds - 1}, got {fold}")
    if scheme == "pranet" and not_clinicdb:
        raise ValueError(f"make_split: scheme 'pranet' needs CVC-ClinicDB frame ids (1..612), got {not_clinicdb[:5]}; "
                         "use scheme='random' for other data")

    # 1. The groups that must stay whole.
    if groups is not None:
        group_of = {str(k): v for k, v in groups.items()}
        missing = [i for i in ids if i not in group_of]
        if missing:
            raise ValueError(f"make_split: groups has no entry for ids {missing[:10]}")
    elif scheme == "random":
        group_of = {i: i for i in ids}  # each frame on its own
    elif not_clinicdb:
        raise ValueError(f"make_split: scheme 'kfold' needs CVC-ClinicDB frame ids or groups=, got {not_clinicdb[:5]}")
    else:
        group_of = {i: clinicdb_sequence(i) for i in ids}  # ClinicDB: one group per video sequence
    rng = np.random.default_rng(seed)

    # 2. The test set, then val carved from the rest by whole groups.
    if scheme == "pranet":
        test = [i for i in ids if i in PRANET_TEST_IDS]
        rest = [i for i in ids if i not in PRANET_TEST_IDS]
    elif scheme == "kfold":
        fold_of = _deal_into_folds(Counter(group_of[i] for i in ids), folds, rng)
        test = [i for i in ids if fold_of[group_of[i]] == fold]
        rest = [i for i in ids if fold_of[group_of[i]] != fold]
    else:
        test, rest = _carve(ids, group_of, test_fraction, rng)
    val, train = _carve(rest, group_of, val_fraction, rng)
    return {"scheme": scheme, "seed": seed, "fold": fold, "folds": folds,
            "train": sorted(train, key=natural_key), "val": sorted(val, key=natural_key),
            "test": sorted(test, key=natural_key)}


SPLIT_SCHEMES = ("pranet", "kfold", "published", "random", "all")


def is_toy(data) -> bool:
    """True for the built-in toy dataset (``None`` or ``"toy"``)."""
    return data is None or str(data) == "toy"


def as_datasets(data) -> list:
    """``data`` as a list of data sets: a list or tuple as it is, anything else (one folder,
    "toy", None) as a list of one."""
    datasets = list(data) if isinstance(data, (list, tuple)) else [data]
    if not datasets:
        raise ValueError("no data set given")
    return datasets


def dataset_name(data) -> str:
    """The name that prefixes a data set's ids among several: its folder's name, or "toy"."""
    return "toy" if is_toy(data) else Path(data).resolve().name


def _named(datasets: list) -> dict:
    """{name: data set} for several data sets; a ValueError when two have one name."""
    named = {}
    for data in datasets:
        name = dataset_name(data)
        if name in named:
            raise ValueError(f"two data sets are called {name!r} ({named[name]} and {data}); ids are prefixed with "
                             "the folder's name, so each needs a folder of its own name")
        named[name] = data
    return named


def _unprefixed(ids, name: str) -> list[str]:
    """The ids of data set ``name`` among prefixed ids ("name/id"), without the prefix."""
    return [i[len(name) + 1:] for i in map(str, ids) if i.startswith(f"{name}/")]


def published_split(root) -> tuple[list[str], list[str]] | None:
    """A data set's own (train ids, test ids), or None: from ROOT/train.txt and ROOT/val.txt,
    else, for a Kvasir-SEG copy without them (JPEG layout, holding all of KVASIR_TEST_IDS),
    the embedded KVASIR_TEST_IDS against every other frame.

    Kvasir-SEG's authors published such a split (880 / 120); its ``val.txt`` is the held-out
    test set by convention, so our validation frames are carved from ``train.txt``.
    """
    if is_toy(root):
        return None
    root = Path(root)
    if all((root / name).is_file() for name in PUBLISHED_SPLIT_FILES):
        train, test = ([line.strip() for line in (root / name).read_text().splitlines() if line.strip()]
                       for name in PUBLISHED_SPLIT_FILES)
        return train, test
    if root.is_dir() and detect_layout(root) == "kvasir":
        ids = dataset_ids(root)
        if set(KVASIR_TEST_IDS) <= set(ids):
            return [i for i in ids if i not in KVASIR_TEST_IDS], list(KVASIR_TEST_IDS)
    return None


def default_scheme(data) -> str:
    """The split a data set gets unless told otherwise (notebook 01): "pranet" for CVC-ClinicDB,
    "published" for a folder with its own train.txt / val.txt, or for Kvasir-SEG, "random" for
    anything else, the toy set included. Also accepts a layout name."""
    if is_toy(data) or str(data) in ("kvasir", "folder"):
        return "random"
    if str(data) in ("clinicdb-png", "clinicdb-tiff"):
        return "pranet"
    if published_split(data) is not None:
        return "published"
    return default_scheme(detect_layout(data))


def dataset_ids(data) -> list[str]:
    """The ids of a data set, sorted naturally, without reading any pixels; for several data
    sets, each one's ids prefixed with its name ("kvasir-seg/cju0qkwl35piu0993l0dewei2")."""
    datasets = as_datasets(data)
    if len(datasets) > 1:
        return [f"{name}/{i}" for name, part in _named(datasets).items() for i in dataset_ids(part)]
    if is_toy(datasets[0]):
        return [f"toy_{i:03d}" for i in range(TOY_SIZE)]
    return [id_ for id_, _, _ in find_pairs(datasets[0])]


def build_split(data, *, scheme: str | None = None, fold: int | None = None, folds: int = 5, seed: int = 0,
                val_fraction: float = 0.1) -> dict:
    """THE split of a data set: train, evaluate, segment, synth, the experiments and the
    notebooks all make theirs here, so that a fold means the same frames everywhere (notebook 01).

    scheme None -> :func:`default_scheme`; ``fold=K`` -> "kfold" (sequence-grouped, CVC-ClinicDB).
    "published": the data set's own train.txt / val.txt (test = val.txt; val carved from train).
    "all": every frame is test (cross-dataset testing; nothing to train on).
    The others are :func:`make_split`'s. Returns make_split's dict plus "data" (the folder or "toy").

    ``data`` a list of several folders: each is split on its own with these options (its own
    default scheme), and the parts are joined with prefixed ids; "data" is then the list,
    "scheme" the parts' schemes ("pranet+published"), and "parts" holds each part's own split
    (unprefixed ids) with its "name".
    """
    datasets = as_datasets(data)
    if len(datasets) > 1:
        parts = [build_split(part, scheme=scheme, fold=fold, folds=folds, seed=seed, val_fraction=val_fraction)
                 | {"name": name} for name, part in _named(datasets).items()]
        joined = {key: [f"{part['name']}/{i}" for part in parts for i in part[key]] for key in ("train", "val", "test")}
        return {"scheme": "+".join(dict.fromkeys(part["scheme"] for part in parts)), "seed": seed, "fold": fold,
                "folds": folds, **joined, "data": [part["data"] for part in parts], "parts": parts}
    data = datasets[0]
    if fold is not None:
        if scheme not in (None, "kfold"):
            raise ValueError(f"a fold is a part of the 'kfold' split, not of {scheme!r}")
        scheme = "kfold"
    scheme = scheme or default_scheme(data)
    if scheme not in SPLIT_SCHEMES:
        raise ValueError(f"unknown split scheme {scheme!r}; choose one of {', '.join(SPLIT_SCHEMES)}")
    ids = dataset_ids(data)
    if scheme == "kfold" and any(clinicdb_frame(i) is None for i in ids):
        raise ValueError(f"{data}: --fold needs CVC-ClinicDB (its video sequences define the folds)")
    if scheme == "all":
        split = {"scheme": "all", "seed": seed, "fold": None, "folds": None, "train": [], "val": [], "test": ids}
    elif scheme == "published":
        listed = published_split(data)
        if listed is None:
            raise ValueError(f"{data}: the 'published' split needs {' and '.join(PUBLISHED_SPLIT_FILES)} in the folder "
                             "(or a Kvasir-SEG copy)")
        train, test = listed
        unknown = sorted(set(train + test) - set(ids), key=natural_key)
        if unknown:
            raise DataError(f"{data}: {len(unknown)} ids of {'/'.join(PUBLISHED_SPLIT_FILES)} have no image/mask pair, "
                            f"e.g. {', '.join(unknown[:5])}")
        val, train = _carve(sorted(train, key=natural_key), {i: i for i in train}, val_fraction, np.random.default_rng(seed))
        split = {"scheme": "published", "seed": seed, "fold": None, "folds": None,
                 "train": train, "val": val, "test": sorted(test, key=natural_key)}
    else:
        split = make_split(ids, scheme, fold=fold or 0, folds=folds, seed=seed, val_fraction=val_fraction)
    return split | {"data": "toy" if is_toy(data) else str(data)}


def same_data(a, b) -> bool:
    """True when two ``data`` values name the same data set (the toy set, or one folder), or
    the same several data sets in any order."""
    a, b = as_datasets(a), as_datasets(b)
    if len(a) > 1 or len(b) > 1:
        return len(a) == len(b) and all(any(same_data(x, y) for y in b) for x in a)
    a, b = a[0], b[0]
    if is_toy(a) or is_toy(b):
        return is_toy(a) and is_toy(b)
    return Path(a).resolve() == Path(b).resolve()


def split_part(split: dict, data) -> dict | None:
    """The split of ``data`` inside ``split``: ``split`` itself when it is of ``data``; the part
    of ``data`` (its own, unprefixed ids) when ``split`` joins several data sets; else None."""
    if same_data(split.get("data"), data):
        return split
    return next((part for part in split.get("parts", []) if same_data(part["data"], data)), None)


def save_split(split: dict, path) -> Path:
    """Write a split to JSON (notebook 01)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=1) + "\n")
    return path


def load_split(path) -> dict:
    """Read a split written by save_split, checking that train / val / test are present and disjoint (notebook 01)."""
    split = json.loads(Path(path).read_text())
    missing = [key for key in ("train", "val", "test") if key not in split]
    if missing:
        raise DataError(f"{path}: split has no {', '.join(missing)} list")
    parts = [set(split[key]) for key in ("train", "val", "test")]
    overlap = (parts[0] & parts[1]) | (parts[0] & parts[2]) | (parts[1] & parts[2])
    if overlap:
        overlap = sorted(overlap, key=natural_key)
        raise DataError(f"{path}: ids in more than one of train/val/test: {overlap[:10]}")
    return split
