"""Text-guided synthetic polyps: prompt bank, mask placement, two backends, consistency check.

Notebook 02 (synthesis) teaches this module. Paper Sec. 3.2 and 4.2: a normal frame i_n, a
clinical prompt d_s and a binary mask m_s go into SDXL inpainting with frozen weights,

    i_s = SDXL_inpaint(i_n, d_s, m_s),        and m_s is the label of i_s.

The paper makes 100 samples from 50 prompts (~20 % more training data) with the negative prompt
"smooth healthy tissue, normal colon wall", and takes its masks from real annotations.

One sample, step by step (`synthesize` runs it for every index i):

    rng        = np.random.default_rng([seed, i])      everything random below comes from here
    prompt     = prompts[i % len(prompts)]             d_s; 100 samples from 50 prompts -> 2 each
    background = a polyp-free frame, or a TRAINING frame that already has a polyp      i_n
    diameter   = drawn from the prompt's size class
    source     = a training annotation whose shape matches the prompt's morphology
    placement  = that annotation scaled, rotated and moved into the field of view,
                 away from the black border, the dark lumen and the existing polyp  m_s
    image      = backend(background, placement, prompt, source, sample_seed)       i_s
    label      = m_s | the background's own polyp mask
    score      = consistency_score(background, image, m_s)

Two backends share that loop: `SDXLInpaintBackend` (the paper; needs the SDXL weights and, in
practice, a GPU) and `CopyPasteBackend` (offline, CPU: Poisson-blends the source polyp itself).
Every sample's manifest line names the backend that made it.

Arrays are numpy, channels last: image uint8 [H, W, 3] RGB, mask bool [H, W]. Test-split frames
are never used: backgrounds and mask sources come from the "train" list of data.build_split.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from .data import IMAGE_SUFFIXES, Sample, build_split, load_dataset, read_image

PROMPT_BANK = Path(__file__).parent / "prompts.jsonl"  # 50 prompts, one JSON object per line
NEGATIVE_PROMPT = "smooth healthy tissue, normal colon wall"  # paper Sec. 4.2
PARIS_CLASSES = {"0-Ip": "pedunculated", "0-Is": "sessile", "0-IIa": "flat elevated", "0-IIb": "flat",
                 "0-IIc": "depressed"}
# An endoscope frame has no fixed mm-per-pixel scale, so a size class is a band of the polyp's
# equivalent diameter (diameter of the disc of equal area) as a fraction of the frame's short
# side; the bands cover the spread of CVC-ClinicDB's own annotations (notebook 02 shows it).
SIZE_CLASSES = {
    "diminutive": (0.10, 0.18),  # < 5 mm
    "small": (0.18, 0.28),  # 6-9 mm
    "large": (0.28, 0.42),  # >= 10 mm; capped so a second polyp still fits beside the first
}
ELONGATED_BELOW = 0.6  # axis ratio under this = elongated (head + stalk); most annotated polyps are rounder
NEAREST_SOURCES = 8  # a mask source is drawn among the 8 whose size is nearest the target: little resampling
DARK_LEVEL = 30  # max(R, G, B) at or below this is the black border (well above its dark grey, well below tissue)
LUMEN_LEVEL = 40  # darker than this inside the field of view is the lumen: no polyp there
BORDER_MARGIN = 0.05  # keep this fraction of the short side between a polyp and the field-of-view edge
POLYP_GAP = 0.04  # ... and between the new polyp and the lumen or an existing polyp
PLACEMENT_TRIES = 200  # centres tried per (background, source) before drawing another pair
MAX_ATTEMPTS = 20  # (background, source) pairs tried per sample before giving up
CHANGE_THRESHOLD = 10.0  # grey levels: a pixel "changed" when mean_c |after - before| exceeds this ...
CHANGE_MIN_PX = 3  # ... inside a 3 x 3 square of changed pixels (an opening): lone noisy pixels do not count
# Default SDXL inpainting weights. The revision is the commit that several public projects pin
# for this repository (found by searching public code; not checked against the hub from here);
# pass --revision main for the newest.
SDXL_INPAINT_MODEL_ID = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
SDXL_INPAINT_REVISION = "115134f363124c53c7d878647567d04daf26e41e"


class SynthesisError(ValueError):
    """Bad input to synthesis, with one message that says what to change (the CLI prints it)."""


# ----------------------------------------------------------------------------- the prompt bank


@dataclass(frozen=True)
class PolypPrompt:
    """One clinical text prompt d_s and its structured attributes (notebook 02)."""

    id: str  # "p01"
    text: str  # what SDXL reads, e.g. "pedunculated polyp on mucosal fold"
    size: str  # a key of SIZE_CLASSES: decides the placed mask's size
    morphology: str = "unspecified"  # a Paris class (PARIS_CLASSES): decides the mask's shape
    surface: str = "unspecified"  # smooth | lobulated | irregular | villous (text only)
    colour: str = "unspecified"  # (text only)
    setting: str = "unspecified"  # wall | fold | lumen (text only; placement does not read it)
    negative_prompt: str = NEGATIVE_PROMPT
    source: str = "user"  # the bank says "paper Sec. 3.2" / "paper Sec. 4.2" for the paper's own prompts

    def attributes(self) -> dict:
        return {"morphology": self.morphology, "size": self.size, "surface": self.surface,
                "colour": self.colour, "setting": self.setting}


def load_prompts(path=None) -> list[PolypPrompt]:
    """Read a prompt file: JSON Lines, one object per line (notebook 02).

    Each line needs "prompt" and "size" (diminutive | small | large); "id", "morphology"
    (a Paris class), "surface", "colour", "setting", "negative_prompt" and "source" are optional.
    Blank lines are skipped. path=None reads the bundled 50-prompt bank.
    """
    path = PROMPT_BANK if path is None else Path(path)
    if not path.is_file():
        raise SynthesisError(f"prompt file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"prompt file {path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SynthesisError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SynthesisError(f'{where}: expected an object with a "prompt" text, e.g. '
                                 '{"prompt": "small sessile polyp", "size": "small"}')
        if row.get("size") not in SIZE_CLASSES:
            raise SynthesisError(f'{where}: "size" must be one of {", ".join(SIZE_CLASSES)}, got {row.get("size")!r}')
        if row.get("morphology", "unspecified") not in (*PARIS_CLASSES, "unspecified"):
            raise SynthesisError(f'{where}: "morphology" must be a Paris class '
                                 f'({", ".join(PARIS_CLASSES)}), got {row["morphology"]!r}')
        known = {"id", "prompt", "size", "morphology", "surface", "colour", "setting", "negative_prompt", "source"}
        if set(row) - known:
            raise SynthesisError(f"{where}: unknown keys {sorted(set(row) - known)}; allowed: {sorted(known)}")
        optional = ("morphology", "surface", "colour", "setting", "negative_prompt", "source")
        fields = {k: str(row[k]) for k in optional if k in row}
        prompt_id = str(row.get("id", f"line{number}"))
        prompts.append(PolypPrompt(id=prompt_id, text=row["prompt"], size=row["size"], **fields))
    if not prompts:
        raise SynthesisError(f"prompt file {path} holds no prompts")
    return prompts


# ----------------------------------------------------------------------------- where a polyp may go


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def field_of_view(image: np.ndarray) -> np.ndarray:
    """bool [H, W]: the endoscope's lit field of view, the convex hull of the largest lit region.

    The hull closes the dark lumen inside the view; the black corners stay outside (notebook 02).
    """
    lit = (image.max(axis=2) > DARK_LEVEL).astype(np.uint8)  # [H, W]
    outlines, _ = cv2.findContours(lit, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    view = np.zeros(image.shape[:2], np.uint8)
    if outlines:
        cv2.fillConvexPoly(view, cv2.convexHull(max(outlines, key=cv2.contourArea)), 1)
    return view.astype(bool)


def forbidden_region(background: Sample) -> np.ndarray:
    """bool [H, W]: where no part of a new polyp may go (notebook 02).

    Outside the field of view shrunk by BORDER_MARGIN, the dark lumen and the existing polyp
    (both grown by POLYP_GAP).
    """
    image, short_side = background.image, min(background.image.shape[:2])
    margin, gap = round(BORDER_MARGIN * short_side), round(POLYP_GAP * short_side)
    view = field_of_view(image).astype(np.uint8)
    inner_view = cv2.erode(view, _disk(margin), borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    lumen = (image.max(axis=2) < LUMEN_LEVEL) & inner_view
    keep_off = (lumen | background.mask).astype(np.uint8)
    return ~inner_view | (cv2.dilate(keep_off, _disk(gap)) > 0)


def mask_shape(mask: np.ndarray) -> tuple[float, float]:
    """(equivalent diameter in px, axis ratio in (0, 1]) of a non-empty mask (notebook 02).

    Equivalent diameter = the diameter of the disc of equal area, sqrt(4 A / pi); axis ratio =
    sqrt(minor / major eigenvalue) of the mask's second central moments (1 for a disc).
    """
    moments = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    area = moments["m00"]
    if area == 0:
        raise ValueError("mask_shape: the mask is empty")
    mu20, mu02, mu11 = moments["mu20"] / area, moments["mu02"] / area, moments["mu11"] / area
    spread = math.hypot((mu20 - mu02) / 2, mu11)
    variance_major, variance_minor = (mu20 + mu02) / 2 + spread, max((mu20 + mu02) / 2 - spread, 0.0)
    return math.sqrt(4 * area / math.pi), math.sqrt(variance_minor / variance_major) if variance_major > 0 else 1.0


def polyp_is_whole(sample: Sample) -> bool:
    """True when the polyp stays inside the field of view, off its edge (notebook 02).

    A polyp cut by the view's edge (a third of ClinicDB's) would paste with a straight cut and
    a dark rim, so it is not used as a mask source.
    """
    inner_view = cv2.erode(field_of_view(sample.image).astype(np.uint8), _disk(3)) > 0
    return bool(sample.mask.any() and not (sample.mask & ~inner_view).any())


def draw_diameter(size: str, frame_shape, rng: np.random.Generator) -> float:
    """A target equivalent diameter in px, uniform in the size class's band of the short side (notebook 02)."""
    low, high = SIZE_CLASSES[size]
    return float(rng.uniform(low, high) * min(frame_shape[:2]))


def choose_mask_source(prompt: PolypPrompt, diameter: float, sources: list[Sample], shapes: list[tuple[float, float]],
                       rng: np.random.Generator, exclude_id: str | None = None) -> Sample:
    """Draw a training annotation whose shape suits the prompt and whose size is near `diameter`.

    shapes[k] = mask_shape(sources[k].mask). A pedunculated polyp (0-Ip, head on a stalk) takes
    an elongated mask; the other Paris classes, seen en face, take compact ones (notebook 02).
    """
    candidates = [k for k, s in enumerate(sources) if s.id != exclude_id]
    if prompt.morphology != "unspecified":
        want_elongated = prompt.morphology == "0-Ip"
        matching = [k for k in candidates if (shapes[k][1] < ELONGATED_BELOW) == want_elongated]
        candidates = matching or candidates  # tiny data sets may lack one kind of shape
    if not candidates:
        raise SynthesisError("no mask source left: the data set has a single training frame")
    candidates.sort(key=lambda k: abs(math.log(shapes[k][0] / diameter)))  # stable: ties keep data order
    return sources[candidates[rng.integers(min(NEAREST_SOURCES, len(candidates)))]]


@dataclass
class Placement:
    """A source annotation moved into a background frame: the new polyp's label m_s (notebook 02)."""

    mask: np.ndarray  # bool [H, W] in the background frame
    matrix: np.ndarray  # float [2, 3], affine map from source-frame to background-frame pixels
    centre: tuple[int, int]  # (x, y) of the source mask's centroid in the background
    angle_deg: float
    scale: float
    diameter_px: float  # equivalent diameter after scaling

    def to_json(self) -> dict:
        return {"centre_xy": list(self.centre), "angle_deg": round(self.angle_deg, 3), "scale": round(self.scale, 4),
                "diameter_px": round(self.diameter_px, 2), "matrix": np.round(self.matrix, 5).tolist()}


def sample_placement(source_mask: np.ndarray, diameter: float, forbidden: np.ndarray,
                     rng: np.random.Generator, tries: int = PLACEMENT_TRIES) -> Placement | None:
    """Scale a source mask to `diameter`, rotate it at random and put it where nothing is forbidden.

    Returns None when none of `tries` random centres fits (notebook 02).
    """
    # 1. Scale and rotate about the centroid into a small square template, centroid at its centre.
    source_diameter, _ = mask_shape(source_mask)
    scale, angle = diameter / source_diameter, float(rng.uniform(0.0, 360.0))
    rows, cols = np.nonzero(source_mask)
    cy, cx = rows.mean(), cols.mean()
    radius = math.ceil(scale * np.sqrt((rows - cy) ** 2 + (cols - cx) ** 2).max()) + 1
    side = 2 * radius + 1
    matrix = cv2.getRotationMatrix2D((float(cx), float(cy)), angle, scale)  # [2, 3]
    matrix[:, 2] += (radius - cx, radius - cy)  # the centroid lands on (radius, radius)
    template = cv2.warpAffine(source_mask.astype(np.uint8), matrix, (side, side), flags=cv2.INTER_NEAREST) > 0

    # 2. Try random allowed centres until the whole template misses the forbidden region.
    height, width = forbidden.shape
    allowed = np.argwhere(~forbidden)  # [K, 2] (row, col)
    for _ in range(tries if len(allowed) else 0):
        y, x = allowed[rng.integers(len(allowed))]
        top, left = y - radius, x - radius
        if top < 0 or left < 0 or top + side > height or left + side > width:
            continue
        if (template & forbidden[top:top + side, left:left + side]).any():
            continue
        mask = np.zeros_like(forbidden)
        mask[top:top + side, left:left + side] = template
        matrix[:, 2] += (left, top)  # now from source frame straight into the background frame
        return Placement(mask, matrix, (int(x), int(y)), angle, scale, mask_shape(mask)[0])
    return None


# ----------------------------------------------------------------------------- backends


class CopyPasteBackend:
    """Offline stand-in for SDXL: Poisson-blend the source polyp itself into the background (notebook 02).

    The source frame is warped with the placement's matrix, so its polyp lands exactly under the
    placed mask, and cv2.seamlessClone solves the Poisson equation in the mask grown by a few
    pixels: the polyp keeps its texture while its colours meet the background at the seam.
    Only the prompt's size and morphology matter here (through the placement); its text is unused.
    """

    name, model_id, revision = "copy-paste", None, None
    seam_px = 3  # the blended region reaches this far past the mask, so the seam sits on background

    def __call__(self, background: np.ndarray, placement: Placement, prompt: PolypPrompt, source: Sample,
                 seed: int) -> np.ndarray:
        height, width = background.shape[:2]
        donor = cv2.warpAffine(source.image, placement.matrix, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)  # [H, W, 3], the source polyp under the placed mask
        region = cv2.dilate(placement.mask.astype(np.uint8) * 255, _disk(self.seam_px))  # [H, W]
        x, y, w, h = cv2.boundingRect(region)
        centre = (x + w // 2, y + h // 2)  # seamlessClone puts the region's box centre here: no shift
        # A copy: OpenCV writes into the mask it is given. It also solves on the region's bounding
        # box and nudges pixels outside the region by a few grey levels, so keep the background there.
        blended = cv2.seamlessClone(donor, background, region.copy(), centre, cv2.NORMAL_CLONE)  # [H, W, 3]
        return np.where(region[..., None] > 0, blended, background)


def sdxl_inpaint_pipeline_class():
    """diffusers' StableDiffusionXLInpaintPipeline, imported here: the copy-paste path never needs it.

    Importing it makes transformers warn that CLIP's image processors fall back to their PIL
    versions without torchvision. That is expected (torchvision does not import beside the
    CPU build of torch this project pins, and the pipeline never uses those processors), so the
    import runs with transformers' warnings silenced.
    """
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionXLInpaintPipeline
    finally:
        logging.set_verbosity(level)
    return StableDiffusionXLInpaintPipeline


def load_sdxl_inpaint(model_id: str = SDXL_INPAINT_MODEL_ID, revision: str = SDXL_INPAINT_REVISION, *,
                      device="cpu", fp16: bool = False, cpu_offload: bool = False):
    """StableDiffusionXLInpaintPipeline.from_pretrained with frozen weights (notebook 02).

    fp16: load the repository's fp16 weight files and run in float16 (GPU only).
    cpu_offload: keep each sub-model on the CPU until it runs (less GPU memory, slower).
    """
    dtype = torch.float16 if fp16 else torch.float32
    pipe = sdxl_inpaint_pipeline_class().from_pretrained(
        model_id, revision=revision, variant="fp16" if fp16 else None, torch_dtype=dtype)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SDXLInpaintBackend:
    """The paper's generator: SDXL inpainting i_s = SDXL_inpaint(i_n, d_s, m_s) (Sec. 3.2, notebook 02).

    pipe: an injected StableDiffusionXLInpaintPipeline (the tests pass a tiny one); None loads
    `model_id` at `revision` with load_sdxl_inpaint. Defaults for steps, guidance and strength are
    the model card's example (20, 8.0, 0.99). SDXL works at about 1024^2: the frame is resized
    so its long side is `resolution` (a multiple of 8 latent pixels), inpainted, and resized
    back; with `padding_mask_crop` the pipeline instead inpaints only a square around the mask
    (mask box + that many px) at resolution^2, which gives small polyps more pixels. Outside the
    mask the result is the background itself, feathered over `feather_px`.
    """

    name = "sdxl"

    def __init__(self, pipe=None, *, model_id: str = SDXL_INPAINT_MODEL_ID, revision: str = SDXL_INPAINT_REVISION,
                 device="cpu", fp16: bool = False, cpu_offload: bool = False, steps: int = 20,
                 guidance: float = 8.0, strength: float = 0.99, resolution: int = 1024,
                 padding_mask_crop: int | None = None, negative_prompt: str | None = None, feather_px: int = 3):
        if pipe is None:
            pipe = load_sdxl_inpaint(model_id, revision, device=device, fp16=fp16, cpu_offload=cpu_offload)
        self.pipe = pipe
        self.model_id, self.revision = model_id, revision
        self.steps, self.guidance, self.strength = steps, guidance, strength
        self.resolution, self.padding_mask_crop = resolution, padding_mask_crop
        self.negative_prompt, self.feather_px = negative_prompt, feather_px

    def processing_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) with the long side near `resolution`, both multiples of 8 latent pixels."""
        multiple = 8 * self.pipe.vae_scale_factor  # 64 px for SDXL: survives the U-Net's downsamplings
        scale = self.resolution / max(height, width)
        return (max(multiple, round(height * scale / multiple) * multiple),
                max(multiple, round(width * scale / multiple) * multiple))

    def __call__(self, background: np.ndarray, placement: Placement, prompt: PolypPrompt, source: Sample,
                 seed: int) -> np.ndarray:
        height, width = background.shape[:2]
        mask = placement.mask.astype(np.uint8) * 255  # [H, W], white = inpaint
        # 1. Frame -> SDXL's working size (or a square crop around the mask, done by the pipeline).
        if self.padding_mask_crop is None:
            work_h, work_w = self.processing_size(height, width)
            image_in = Image.fromarray(cv2.resize(background, (work_w, work_h), interpolation=cv2.INTER_CUBIC))
            mask_in = Image.fromarray(cv2.resize(mask, (work_w, work_h), interpolation=cv2.INTER_NEAREST))
        else:
            work_h = work_w = self.resolution
            image_in, mask_in = Image.fromarray(background), Image.fromarray(mask)
        # 2. Inpaint; the generator is seeded per sample and lives on the CPU, so any device gives the same noise.
        generated = self.pipe(
            prompt=prompt.text, negative_prompt=self.negative_prompt or prompt.negative_prompt,
            image=image_in, mask_image=mask_in, height=work_h, width=work_w,
            padding_mask_crop=self.padding_mask_crop, num_inference_steps=self.steps,
            guidance_scale=self.guidance, strength=self.strength,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
        # 3. Back to the frame's size (the crop path already returns it).
        generated = np.asarray(generated.convert("RGB"))
        if generated.shape[:2] != (height, width):
            generated = cv2.resize(generated, (width, height), interpolation=cv2.INTER_AREA)  # [H, W, 3]
        # 4. Keep the background outside the mask: the label stays honest and the VAE's blur stays out.
        grown = cv2.dilate(mask, _disk(self.feather_px)).astype(np.float32) / 255
        window = 2 * self.feather_px + 1
        alpha = cv2.GaussianBlur(grown, (window, window), 0)[..., None]  # [H, W, 1]: 1 on the mask, 0 far off
        blended = alpha * generated.astype(np.float32) + (1 - alpha) * background.astype(np.float32)
        return blended.round().astype(np.uint8)


# ----------------------------------------------------------------------------- checks and augmentation


def consistency_score(before: np.ndarray, after: np.ndarray, mask: np.ndarray,
                      threshold: float = CHANGE_THRESHOLD) -> float:
    """IoU between where the frame changed and the mask that is supposed to label the change.

    Beyond the paper (notebook 02): inpainting does not always fill its mask, and then the mask
    is a wrong label. changed = opening(mean_c |after - before| > threshold) with a 3 x 3 square,
    which drops isolated pixels without growing the change. Returns NaN when both `changed` and
    `mask` are empty; 0 when only one of them is.
    """
    if before.shape != after.shape or mask.shape != before.shape[:2] or mask.dtype != bool:
        raise ValueError(f"consistency_score: images {before.shape} and {after.shape} and bool mask "
                         f"{mask.shape} ({mask.dtype}) must match")
    difference = np.abs(after.astype(np.float32) - before.astype(np.float32)).mean(axis=2)  # [H, W]
    square = np.ones((CHANGE_MIN_PX, CHANGE_MIN_PX), np.uint8)
    changed = cv2.morphologyEx((difference > threshold).astype(np.uint8), cv2.MORPH_OPEN, square) > 0  # [H, W]
    union = np.count_nonzero(changed | mask)
    return float("nan") if union == 0 else np.count_nonzero(changed & mask) / union


# ----------------------------------------------------------------------------- inputs


def training_frames(data, fold: int | None = None, folds: int = 5, split_seed: int = 0) -> tuple[list[Sample], dict]:
    """The training frames of a data set, the mask sources and default backgrounds, and the
    split they come from (notebook 02).

    The split is data.build_split's, the one ``syndiff train`` makes with the same ``--fold``,
    ``--folds`` and ``--seed`` (= ``split_seed``); only its "train" list is kept, so no test or
    validation frame ever shapes a synthetic sample. ``syndiff synth`` saves the split beside
    the samples, and ``syndiff train --synthetic`` refuses samples made from another split.
    """
    split = build_split(data, fold=fold, folds=folds, seed=split_seed)
    return load_dataset(data, ids=split["train"]), split


def load_backgrounds(folder) -> list[Sample]:
    """Polyp-free frames from a folder (e.g. HyperKvasir's normal frames), with empty masks (notebook 02)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SynthesisError(f"background folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SynthesisError(f"background folder {folder} holds no images ({' '.join(IMAGE_SUFFIXES)})")
    frames = [read_image(p) for p in files]
    return [Sample(p.stem, f, np.zeros(f.shape[:2], bool), source="background") for p, f in zip(files, frames)]


# ----------------------------------------------------------------------------- the loop


def sample_name(index: int) -> str:
    """File stem of sample `index`: syn_0000, syn_0001, ..."""
    return f"syn_{index:04d}"


def _make_one(index: int, seed: int, backend, prompts: list[PolypPrompt], frames: list[Sample], sources: list[Sample],
              shapes: list[tuple[float, float]], backgrounds: list[Sample] | None):
    """Sample `index` of a run: (image [H, W, 3], label [H, W], manifest record). Depends on (seed, index) only."""
    rng = np.random.default_rng([seed, index])
    prompt = prompts[index % len(prompts)]
    pool = backgrounds or frames
    for _ in range(MAX_ATTEMPTS):
        background = pool[rng.integers(len(pool))]
        diameter = draw_diameter(prompt.size, background.image.shape, rng)
        exclude = None if backgrounds else background.id  # never the frame's own polyp
        source = choose_mask_source(prompt, diameter, sources, shapes, rng, exclude_id=exclude)
        placement = sample_placement(source.mask, diameter, forbidden_region(background), rng)
        if placement is not None:
            break
    else:
        raise SynthesisError(f"sample {index}: found no room for a {prompt.size} polyp in {MAX_ATTEMPTS} frames; "
                             "are the backgrounds mostly dark, or full of polyp?")
    sample_seed = int(rng.integers(2**31))
    image = backend(background.image, placement, prompt, source, sample_seed)  # [H, W, 3]
    label = placement.mask | background.mask  # [H, W]
    record = {
        "name": sample_name(index), "index": index, "prompt_id": prompt.id, "prompt": prompt.text,
        "negative_prompt": getattr(backend, "negative_prompt", None) or prompt.negative_prompt,
        "attributes": prompt.attributes(), "background_id": background.id,
        "background_kind": "background folder" if backgrounds else "training frame",
        "mask_source_id": source.id, "placement": placement.to_json(), "seed": seed, "sample_seed": sample_seed,
        "backend": backend.name, "model_id": backend.model_id, "revision": backend.revision,
        "consistency": round(consistency_score(background.image, image, placement.mask), 4),
    }
    return image, label, record


def _save_png(pixels: np.ndarray, path: Path) -> None:
    temporary = path.parent / f".{path.name}.partial"
    Image.fromarray(pixels).save(temporary, format="PNG")
    os.replace(temporary, path)  # atomic: a reader sees the whole file or none


def _remove_unfinished(out_dir: Path, name: str) -> None:
    """Delete what a killed run left of sample `name`: partial files and a pair without a record."""
    for folder in (out_dir, out_dir / "rejected"):
        for kind in ("images", "masks"):
            for path in (folder / kind / f"{name}.png", folder / kind / f".{name}.png.partial"):
                path.unlink(missing_ok=True)


def synthesize(backend, frames: list[Sample], out_dir, n: int, *, prompts: list[PolypPrompt] | None = None,
               backgrounds: list[Sample] | None = None, seed: int = 0, indices=None, resume: bool = False,
               min_consistency: float = 0.0) -> list[dict]:
    """Make samples `indices` (default range(n)) of a run and write them to out_dir (notebook 02).

    Writes images/syn_0000.png + masks/syn_0000.png (rejected/images, rejected/masks when the
    consistency is under min_consistency) and records/syn_0000.json; write_manifest joins the
    records into manifest.jsonl. A sample is finished once its record exists; resume=True skips
    finished samples, resume=False refuses to overwrite them. Sample i depends on (seed, i) only,
    so several processes, each given some indices, write exactly what one process would.
    Returns the records of the samples made now.
    """
    out_dir = Path(out_dir)
    if n <= 0:
        raise SynthesisError(f"n must be a positive number of samples, got {n}")
    prompts = prompts or load_prompts()
    for folder in ("images", "masks", "rejected/images", "rejected/masks", "records"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    sources = [f for f in frames if polyp_is_whole(f)] or frames  # mask sources: whole polyps only
    shapes = [mask_shape(s.mask) for s in sources]
    made = []
    for index in range(n) if indices is None else indices:
        name = sample_name(index)
        if (out_dir / "records" / f"{name}.json").exists():
            if resume:
                continue
            raise SynthesisError(f"{out_dir} already holds sample {name}; pass --resume to continue that run, "
                                 "or choose an empty --out folder")
        _remove_unfinished(out_dir, name)
        image, label, record = _make_one(index, seed, backend, prompts, frames, sources, shapes, backgrounds)
        record["kept"] = bool(record["consistency"] >= min_consistency)  # NaN never passes
        folder = out_dir if record["kept"] else out_dir / "rejected"
        record["image"], record["mask"] = (str((folder / kind / f"{name}.png").relative_to(out_dir))
                                           for kind in ("images", "masks"))
        # Mask, image, record, each written whole: a run killed in between leaves a mask or a pair
        # without a record, and the next run (resume or not) deletes it before making the sample.
        _save_png(label.astype(np.uint8) * 255, out_dir / record["mask"])
        _save_png(image, out_dir / record["image"])
        record_path = out_dir / "records" / f"{name}.json"
        record_path.with_suffix(".partial").write_text(json.dumps(record))
        os.replace(record_path.with_suffix(".partial"), record_path)  # the sample is finished from here on
        made.append(record)
    return made


def write_manifest(out_dir, n: int) -> Path:
    """Join records/syn_*.json for indices < n into manifest.jsonl, in index order (notebook 02)."""
    out_dir = Path(out_dir)
    lines = [(out_dir / "records" / f"{sample_name(i)}.json").read_text()
             for i in range(n) if (out_dir / "records" / f"{sample_name(i)}.json").exists()]
    path = out_dir / "manifest.jsonl"
    path.with_suffix(".partial").write_text("".join(line + "\n" for line in lines))
    os.replace(path.with_suffix(".partial"), path)
    return path


def read_manifest(out_dir) -> list[dict]:
    """The records of out_dir/manifest.jsonl, one dict per sample (notebook 02)."""
    lines = (Path(out_dir) / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
