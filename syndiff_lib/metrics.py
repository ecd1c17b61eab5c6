"""Segmentation metrics: Dice, IoU, HD95 and NSD, computed by MONAI. Taught in notebook 05 (evaluation).

Every number comes from a MONAI function; this module only (1) checks the inputs, (2) applies
one explicit rule for empty masks, and (3) aggregates per image, then over folds.

Notation: N = number of images, H x W = the evaluation resolution.

Units. Distances (HD95, the NSD tolerance) are in pixels at the evaluation resolution.
The SynDiff paper quotes "mm", but endoscopy frames carry no pixel-to-mm calibration, so
we do not pretend to have one.

The empty-mask rule (MONAI 1.x leaves these cases as NaN, or 0, depending on the metric):

    pred empty, target empty  -> Dice = IoU = NSD = 1, HD95 = 0        (a correct "no polyp")
    exactly one of them empty -> Dice = IoU = NSD = 0, HD95 = diagonal  (the worst case)

where diagonal = sqrt(H^2 + W^2), longer than any distance between two pixels of the image.
`segmentation_metrics` also returns which masks were empty, and `summarize` counts both cases,
so a reader can see how much of the average the rule decided.
"""

import math
import warnings

import numpy as np
import torch

METRIC_NAMES = ("dice", "iou", "hd95", "nsd")

# 2 px: a hand-drawn polyp outline, resized to the evaluation resolution, is uncertain by about
# a pixel on each side, so boundaries that agree to within 2 px are treated as the same boundary.
# That is under 1% of a 256-pixel side; a wider tolerance (say 8 px, one latent cell of the
# autoencoder) would let NSD saturate near 1 and stop separating good models from very good ones.
DEFAULT_NSD_TOLERANCE_PX = 2.0


def check_inputs(pred, target) -> tuple[np.ndarray, np.ndarray]:
    """Return `pred` and `target` as bool arrays [N, H, W]; raise ValueError if they are not valid.

    Accepts numpy arrays or CPU tensors of shape [N, H, W] or [H, W], holding bool or {0, 1}.
    Soft masks are refused rather than thresholded here: choosing the threshold is the
    caller's decision.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"pred and target must be [H, W] or [N, H, W], got shape {pred.shape}")
    for name, mask in (("pred", pred), ("target", target)):
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{name} must be binary (bool or 0/1); threshold soft masks first")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    return pred.astype(bool), target.astype(bool)


def _monai_metrics(pred: np.ndarray, target: np.ndarray, nsd_tolerance_px: float) -> dict[str, np.ndarray]:
    """Run the four MONAI metrics on pairs where both masks are non-empty."""
    # Imported here: MONAI takes seconds to import, and most `syndiff` verbs never need it.
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice

    # MONAI wants one-hot [N, C, H, W]; our single channel is the polyp, so keep it
    # (include_background=True) instead of letting MONAI drop channel 0.
    y_pred = torch.from_numpy(pred[:, None]).float()  # [N, 1, H, W]
    y = torch.from_numpy(target[:, None]).float()  # [N, 1, H, W]
    with warnings.catch_warnings():
        # A deprecation notice raised inside MONAI's own code; nothing for us to change.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        values = {
            "dice": compute_dice(y_pred, y, include_background=True),
            "iou": compute_iou(y_pred, y, include_background=True),
            "hd95": compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95),
            "nsd": compute_surface_dice(y_pred, y, class_thresholds=[nsd_tolerance_px], include_background=True),
        }
    return {name: value[:, 0].numpy().astype(np.float64) for name, value in values.items()}  # [N] each


def segmentation_metrics(pred, target, nsd_tolerance_px: float = DEFAULT_NSD_TOLERANCE_PX) -> dict[str, np.ndarray]:
    """Per-image Dice, IoU, HD95 (pixels) and NSD for binary masks [N, H, W] (or one [H, W]).

    Returns arrays of length N: "dice", "iou", "hd95", "nsd", and the bool flags
    "pred_empty" and "target_empty". Empty masks follow the rule in the module docstring.
    `nsd_tolerance_px`: how far (in pixels) two boundaries may be apart and still count as
    agreeing; see DEFAULT_NSD_TOLERANCE_PX for why 2.
    """
    pred, target = check_inputs(pred, target)
    n, height, width = pred.shape
    pred_empty = ~pred.any(axis=(1, 2))  # [N]
    target_empty = ~target.any(axis=(1, 2))  # [N]
    both_empty = pred_empty & target_empty  # [N]
    one_empty = pred_empty ^ target_empty  # [N]
    neither_empty = ~(pred_empty | target_empty)  # [N]

    # 1. Empty-mask rule: a correct "no polyp" is perfect, a missed or invented polyp is the worst case.
    diagonal = math.hypot(height, width)
    results = {name: np.full(n, np.nan) for name in METRIC_NAMES}
    for name, perfect, worst in (("dice", 1.0, 0.0), ("iou", 1.0, 0.0), ("hd95", 0.0, diagonal), ("nsd", 1.0, 0.0)):
        results[name][both_empty] = perfect
        results[name][one_empty] = worst

    # 2. Everything else: MONAI.
    if neither_empty.any():
        computed = _monai_metrics(pred[neither_empty], target[neither_empty], nsd_tolerance_px)
        for name in METRIC_NAMES:
            results[name][neither_empty] = computed[name]

    results["pred_empty"] = pred_empty
    results["target_empty"] = target_empty
    return results


def dice_score(pred, target) -> float:
    """Dice of a single pair of binary masks [H, W], with the same empty-mask rule (MONAI underneath)."""
    pred, target = check_inputs(pred, target)
    if pred.shape[0] != 1:
        raise ValueError(f"dice_score takes one pair of [H, W] masks, got {pred.shape[0]}")
    if not pred.any() and not target.any():
        return 1.0
    if not pred.any() or not target.any():
        return 0.0
    from monai.metrics import compute_dice

    y_pred, y = torch.from_numpy(pred[:, None]).float(), torch.from_numpy(target[:, None]).float()  # [1, 1, H, W]
    return float(compute_dice(y_pred, y, include_background=True))


def per_image_rows(per_image: dict[str, np.ndarray]) -> list[dict]:
    """{metric: [N] array} -> N dicts of plain Python values, one per image (for JSON Lines)."""
    n = len(next(iter(per_image.values())))
    return [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in per_image.items()} for i in range(n)]


def summarize(per_image: dict[str, np.ndarray]) -> dict:
    """Mean and std (numpy's, ddof=0) of each metric over images, plus counts.

    Returns {"dice": mean, "dice_std": std, ... for iou, hd95, nsd, "n": N} and, when the
    empty flags are present, "n_both_empty" and "n_one_empty". NaNs are never averaged in:
    `segmentation_metrics` makes none, but if an input holds some, the mean is over the
    other images and "n_nan_<metric>" says how many were left out.
    """
    summary = {"n": len(per_image["dice"])}
    for name in METRIC_NAMES:
        values = np.asarray(per_image[name], dtype=np.float64)
        is_nan = np.isnan(values)
        valid = values[~is_nan]
        summary[name] = float(valid.mean()) if valid.size else math.nan
        summary[f"{name}_std"] = float(valid.std()) if valid.size else math.nan
        if is_nan.any():
            summary[f"n_nan_{name}"] = int(is_nan.sum())
    if "pred_empty" in per_image and "target_empty" in per_image:
        pred_empty, target_empty = np.asarray(per_image["pred_empty"]), np.asarray(per_image["target_empty"])
        summary["n_both_empty"] = int((pred_empty & target_empty).sum())
        summary["n_one_empty"] = int((pred_empty ^ target_empty).sum())
    return summary


def summarize_folds(fold_summaries: list[dict]) -> dict:
    """Mean ± std over folds of each fold's mean metric, as the paper reports over 5 folds.

    Returns {"dice": mean of fold means, "dice_std": std across folds (ddof=0), ... ,
    "n_folds": K, "n": total images}, and the summed empty-mask and NaN counts when present.
    """
    if not fold_summaries:
        raise ValueError("fold_summaries is empty")
    summary = {"n_folds": len(fold_summaries), "n": sum(fold["n"] for fold in fold_summaries)}
    for name in METRIC_NAMES:
        fold_means = np.array([fold[name] for fold in fold_summaries], dtype=np.float64)  # [K]
        summary[name] = float(fold_means.mean())
        summary[f"{name}_std"] = float(fold_means.std())
    count_keys = sorted({key for fold in fold_summaries for key in fold if key.startswith("n_") and key != "n_folds"})
    for key in count_keys:
        summary[key] = sum(fold.get(key, 0) for fold in fold_summaries)
    return summary
