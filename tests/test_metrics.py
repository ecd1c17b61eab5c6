"""Metrics against hand-computed values, the empty-mask rule, and the viz helpers (fast, CPU)."""

import json
import math

import matplotlib

matplotlib.use("Agg")  # headless tests; the library itself never picks a backend

import numpy as np
import pytest
from matplotlib.figure import Figure

from syndiff_lib import viz
from syndiff_lib.metrics import dice_score, segmentation_metrics, summarize, summarize_folds

SIZE = 32  # test images are SIZE x SIZE


def square(row: int, col: int, side: int = 8) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[row : row + side, col : col + side] = True
    return mask


EMPTY = np.zeros((SIZE, SIZE), dtype=bool)


def metrics_of(pred, target, **kwargs) -> dict[str, float]:
    """The four metrics of one pair, as plain floats."""
    result = segmentation_metrics(pred, target, **kwargs)
    return {name: float(result[name][0]) for name in ("dice", "iou", "hd95", "nsd")}


# ---- hand-computed cases ----


def test_dice_and_iou_of_two_overlapping_squares():
    # two 8x8 squares, the second shifted 3 columns: they share 8 rows x 5 columns
    a, b = square(8, 8), square(8, 11)
    area_a, area_b, overlap = 64, 64, 8 * 5
    m = metrics_of(a, b)
    assert m["dice"] == pytest.approx(2 * overlap / (area_a + area_b))  # 0.625
    assert m["iou"] == pytest.approx(overlap / (area_a + area_b - overlap))  # 40 / 88
    assert dice_score(a, b) == pytest.approx(0.625)


@pytest.mark.parametrize("shift", [1, 2, 3, 5])
def test_hd95_of_a_shifted_square_is_the_shift(shift):
    assert metrics_of(square(8, 8), square(8, 8 + shift))["hd95"] == pytest.approx(shift)


def test_nsd_is_one_within_tolerance_and_below_one_beyond():
    assert metrics_of(square(8, 8), square(8, 10), nsd_tolerance_px=2)["nsd"] == pytest.approx(1.0)
    # Shift 3, tolerance 2. MONAI's boundary is the 28 inner edge pixels of each square.
    # Of A's, 10 are > 2 px from B's boundary: the 6 inner pixels of its left column,
    # the left end of its top and bottom rows, and 2 mid pixels of its right column.
    # B mirrors A, so NSD = (18 + 18) / (28 + 28) = 9 / 14.
    assert metrics_of(square(8, 8), square(8, 11), nsd_tolerance_px=2)["nsd"] == pytest.approx(9 / 14)


def test_identical_masks_are_perfect():
    assert metrics_of(square(4, 6), square(4, 6)) == pytest.approx({"dice": 1, "iou": 1, "hd95": 0, "nsd": 1})


# ---- the empty-mask rule ----


def test_both_empty_is_a_correct_no_polyp():
    assert metrics_of(EMPTY, EMPTY) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
    assert dice_score(EMPTY, EMPTY) == 1.0


@pytest.mark.parametrize("pred, target", [(square(8, 8), EMPTY), (EMPTY, square(8, 8))], ids=["invented", "missed"])
def test_exactly_one_empty_is_the_worst_case(pred, target):
    diagonal = math.hypot(SIZE, SIZE)
    assert metrics_of(pred, target) == pytest.approx({"dice": 0, "iou": 0, "hd95": diagonal, "nsd": 0})
    assert dice_score(pred, target) == 0.0


def test_empty_cases_are_counted_and_mixed_batches_work():
    preds = np.stack([square(8, 8), EMPTY, EMPTY, square(8, 8)])
    targets = np.stack([square(8, 11), EMPTY, square(8, 8), EMPTY])
    per_image = segmentation_metrics(preds, targets)
    assert per_image["dice"] == pytest.approx([0.625, 1.0, 0.0, 0.0])
    assert per_image["pred_empty"].tolist() == [False, True, True, False]
    summary = summarize(per_image)
    assert (summary["n"], summary["n_both_empty"], summary["n_one_empty"]) == (4, 1, 2)


# ---- input checks ----


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        segmentation_metrics(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))


def test_non_binary_raises():
    soft = np.full((8, 8), 0.7)
    with pytest.raises(ValueError, match="binary"):
        segmentation_metrics(soft, np.zeros((8, 8)))


def test_wrong_rank_raises():
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        segmentation_metrics(np.zeros(8), np.zeros(8))


def test_integer_01_masks_and_single_2d_pair():
    per_image = segmentation_metrics(square(8, 8).astype(np.uint8), square(8, 11).astype(np.int64))
    assert per_image["dice"].shape == (1,)


# ---- aggregation ----


def test_summarize_mean_and_std():
    per_image = {"dice": np.array([0.5, 1.0]), "iou": np.array([0.2, 0.4]),
                 "hd95": np.array([2.0, 4.0]), "nsd": np.array([1.0, 1.0])}  # fmt: skip
    summary = summarize(per_image)
    assert summary["n"] == 2
    assert summary["dice"] == pytest.approx(0.75) and summary["dice_std"] == pytest.approx(0.25)
    assert summary["hd95"] == pytest.approx(3.0) and summary["hd95_std"] == pytest.approx(1.0)
    assert not any(key.startswith("n_nan") for key in summary)


def test_summarize_never_averages_nan_silently():
    per_image = {"dice": np.array([0.5, np.nan, 1.0]), "iou": np.ones(3), "hd95": np.zeros(3), "nsd": np.ones(3)}
    summary = summarize(per_image)
    assert summary["dice"] == pytest.approx(0.75)
    assert summary["n_nan_dice"] == 1


def test_summarize_folds_is_mean_and_std_over_folds():
    folds = [{"n": 10, "dice": 0.8, "iou": 0.7, "hd95": 4.0, "nsd": 0.9, "n_one_empty": 1},
             {"n": 12, "dice": 0.9, "iou": 0.8, "hd95": 2.0, "nsd": 0.9, "n_one_empty": 0}]  # fmt: skip
    summary = summarize_folds(folds)
    assert (summary["n_folds"], summary["n"], summary["n_one_empty"]) == (2, 22, 1)
    assert summary["dice"] == pytest.approx(0.85) and summary["dice_std"] == pytest.approx(0.05)
    assert summary["hd95"] == pytest.approx(3.0) and summary["nsd_std"] == pytest.approx(0.0)


# ---- viz ----


def test_overlay_blends_inside_the_mask_only():
    image = np.full((SIZE, SIZE, 3), 100, dtype=np.uint8)
    mask = square(8, 8)
    out = viz.overlay(image, mask, color=(0, 255, 0), alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert out[10, 10].tolist() == [50, 178, 50]  # 0.5 * 100 + 0.5 * colour, rounded
    assert out[0, 0].tolist() == [100, 100, 100]
    contour = viz.overlay(image, mask, contour_only=True)
    assert contour[8, 8].tolist() == [0, 255, 0] and contour[11, 11].tolist() == [100, 100, 100]


def test_overlay_rejects_a_mask_of_the_wrong_size():
    with pytest.raises(ValueError, match="mask"):
        viz.overlay(np.zeros((8, 8, 3), dtype=np.uint8), np.zeros((8, 9), dtype=bool))


def test_running_mean_by_hand():
    assert viz.running_mean(np.array([1.0, 3.0, 5.0, 7.0]), window=2) == pytest.approx([1.0, 2.0, 4.0, 6.0])


def test_figures_are_built(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    targets = np.stack([square(8, 8), square(4, 4), EMPTY])
    preds = np.stack([square(8, 11), EMPTY, EMPTY])
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 1 / (s + 1)}) for s in range(20)))
    figures = [
        viz.show_grid(list(images) + [targets[0]], titles=["a", "b", "c", "mask"], ncols=2),
        viz.compare_figure(images, targets, preds, n=2, row_titles=["x", "y"]),
        viz.plot_training_log(log, keys=("loss",), smooth=5),
        viz.plot_training_log([{"step": 0, "loss": 1.0, "val_dice": 0.5}, {"step": 1, "loss": 0.5}],
                              keys=("loss", "val_dice")),  # fmt: skip
        viz.latent_grid(rng.normal(size=(4, 8, 8))),
    ]
    for fig in figures:
        assert isinstance(fig, Figure)
    assert len(figures[1].axes) == 2 * 3
    assert len(figures[4].axes) == 4 + 4  # four channels and their colour bars


def test_table_renders_html_and_text():
    tab = viz.table([["dice", 0.12345, None], ["hd95", float("nan"), 3]], ["metric", "ours", "paper"], caption="c")
    assert tab.rows == [["dice", "0.123", "\u2014"], ["hd95", "\u2014", "3"]]
    assert "<th>metric</th>" in tab._repr_html_() and "<caption>c</caption>" in tab._repr_html_()
    assert repr(tab).splitlines()[1].split() == ["metric", "ours", "paper"]
    with pytest.raises(ValueError, match="3 values"):
        viz.table([[1, 2]], ["a", "b", "c"])
