"""Choosing what the notebooks show by a stated rule (viz.py): frames by rank, failures by kind,
Dice by polyp size, a study against its noise, a training log's average against its raw
weights. Synthetic masks and numbers only: no model."""

import math

import numpy as np
import pytest

from syndiff_lib import viz


def disc(center, radius, size=32):
    """A bool [size, size] mask: a filled disc."""
    yy, xx = np.mgrid[:size, :size]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius ** 2


def test_polyp_fractions_and_latent_cells():
    masks = [np.zeros((16, 16), bool), np.ones((16, 16), bool), np.zeros((16, 16), bool)]
    masks[2][0, 0] = masks[2][9, 9] = True  # two pixels in two different 8 x 8 cells
    assert viz.polyp_fractions(masks) == pytest.approx([0.0, 1.0, 2 / 256])
    assert list(viz.latent_cells_touched(masks, factor=8)) == [0, 4, 2]
    with pytest.raises(ValueError, match="multiple of the latent factor"):
        viz.latent_cells_touched([np.zeros((12, 16), bool)], factor=8)


def test_rank_picks_lowest_median_highest():
    values = [0.5, 0.1, 0.9, 0.3, 0.7]
    assert viz.rank_picks(values) == [("lowest", 1), ("median", 0), ("highest", 2)]
    assert viz.rank_picks([0.2, 0.4, 0.6, 0.8])[1] == ("median", 1)  # even N: the lower middle
    assert viz.rank_picks([0.3, 0.3, 0.3])[0] == ("lowest", 0)  # ties keep the data's order
    labels = ("smallest polyp", "median polyp", "largest polyp")
    assert [label for label, _ in viz.rank_picks(values, labels)] == list(labels)
    assert viz.rank_picks([0.4]) == [("lowest", 0)]  # one frame is shown once
    with pytest.raises(ValueError, match="NaN"):
        viz.rank_picks([0.1, math.nan])
    with pytest.raises(ValueError, match="non-empty"):
        viz.rank_picks([])


def test_classify_failure_one_frame_of_each_kind():
    polyp = disc((16, 16), 6)
    good = viz.classify_failure(polyp, polyp)
    assert good["kind"] is None and good["dice"] == pytest.approx(1.0) and good["false_share"] == 0.0

    elsewhere = disc((5, 5), 3)  # a blob that never touches the polyp
    case = viz.classify_failure(elsewhere, polyp)
    assert case["kind"] == "false detection" and case["coverage"] == 0.0 and case["false_share"] == 1.0

    nothing = viz.classify_failure(np.zeros_like(polyp), polyp)
    assert nothing["kind"] == "missed" and nothing["dice"] == 0.0 and math.isnan(nothing["false_share"])

    speck = np.zeros_like(polyp)
    speck[16, 16] = True  # on the polyp, but a speck of it
    assert viz.classify_failure(speck, polyp)["kind"] == "missed"

    spill = disc((16, 16), 13)  # covers the polyp, three times too wide: one region touching it
    case = viz.classify_failure(spill, polyp)
    assert case["kind"] == "mis-shaped" and case["coverage"] == 1.0 and case["false_share"] == 0.0

    # a good overlap plus a large blob elsewhere: most of the prediction points away
    both = polyp | disc((26, 4), 5) | disc((4, 26), 5)
    assert viz.classify_failure(both, polyp, failure_dice=1.0)["kind"] == "false detection"


def test_classify_failure_without_a_polyp_and_bad_inputs():
    empty = np.zeros((8, 8), bool)
    assert viz.classify_failure(empty, empty)["kind"] is None  # a correct "no polyp"
    blob = empty.copy()
    blob[2:4, 2:4] = True
    assert viz.classify_failure(blob, empty)["kind"] == "false detection"
    with pytest.raises(ValueError, match="bool masks"):
        viz.classify_failure(blob.astype(np.uint8), empty)


def test_worst_of_each_kind_says_none_where_a_kind_is_absent():
    cases = [{"kind": "missed", "dice": 0.1}, {"kind": None, "dice": 0.9}, {"kind": "missed", "dice": 0.0},
             {"kind": "mis-shaped", "dice": 0.4}]
    assert viz.worst_of_each_kind(cases) == {"missed": 2, "false detection": None, "mis-shaped": 3}


def test_by_polyp_size():
    split = viz.by_polyp_size([0.2, 0.4, 0.8, 1.0], [0.01, 0.02, 0.1, 0.3], threshold=0.03)
    assert split == {"n_small": 2, "n_large": 2, "small": pytest.approx(0.3), "large": pytest.approx(0.9)}
    none_small = viz.by_polyp_size([0.5], [0.2], threshold=0.03)
    assert none_small["n_small"] == 0 and math.isnan(none_small["small"])


def test_versus_noise_flat_and_not_flat():
    flat = viz.versus_noise([0.840, 0.8405, 0.8402], [0.003, 0.003, 0.003], n_seeds=3)
    assert flat["flat"] and flat["spread"] == pytest.approx(0.0005)
    assert flat["detectable"] == pytest.approx(1.96 * math.sqrt(2) * 0.003 / math.sqrt(2))
    apart = viz.versus_noise([0.70, 0.84], [0.003, 0.004], n_seeds=3)
    assert not apart["flat"] and apart["highest"] == 1
    with pytest.raises(ValueError, match="n_seeds"):
        viz.versus_noise([0.1, 0.2], [0.01, 0.01], n_seeds=1)
    with pytest.raises(ValueError, match="two or more"):
        viz.versus_noise([0.1], [0.01], n_seeds=3)


def test_ema_summary_with_and_without_the_raw_weights():
    records = [{"step": 10, "loss": 1.0},
               {"step": 100, "val_dice": 0.50, "val_dice_raw": 0.40},
               {"step": 200, "val_dice": 0.60, "val_dice_raw": 0.65},
               {"step": 300, "val_dice": 0.70, "val_dice_raw": 0.55}]
    summary = viz.ema_summary(records)
    assert summary["n_val"] == 3 and summary["n_ema_higher"] == 2
    assert summary["ema_mean"] == pytest.approx(0.6) and summary["raw_mean"] == pytest.approx(0.5333333)
    assert summary["raw_max_jump"] == pytest.approx(0.25)
    off = viz.ema_summary([{"step": 100, "val_dice": 0.5}])
    assert off["n_val"] == 1 and math.isnan(off["n_ema_higher"]) and math.isnan(off["raw_max_jump"])


def test_picks_figure_titles_rows_and_an_empty_pick():
    from types import SimpleNamespace

    from matplotlib.figure import Figure

    masks = [disc((16, 16), r) for r in (3, 6, 9)]
    samples = [SimpleNamespace(id=f"f{k}", image=np.zeros((32, 32, 3), np.uint8), mask=m) for k, m in enumerate(masks)]
    fractions = viz.polyp_fractions(masks)
    picks = viz.rank_picks(fractions, ("smallest polyp", "median polyp", "largest polyp"))
    fig = viz.picks_figure(samples, masks, picks, fractions)
    titles = [ax.get_title() for ax in fig.axes]
    assert isinstance(fig, Figure) and len(fig.axes) == 9
    assert titles[0] == f"smallest polyp: frame f0\npolyp {fractions[0]:.1%} of the frame"
    assert titles[2] == "prediction, Dice 1.000" and titles[6].startswith("largest polyp: frame f2")
    empty = viz.picks_figure(samples, masks, [])
    assert [t.get_text() for t in empty.axes[0].texts] == ["no frame to show"]


def test_wrap_lines_keeps_short_lines_and_indents_continuations():
    assert viz.wrap_lines("short\n  also short", width=20) == "short\n  also short"
    wrapped = viz.wrap_lines("    x = f(alpha, beta, gamma)  # a comment", width=20).splitlines()
    assert all(len(line) <= 20 for line in wrapped)
    assert wrapped[0] == "    x = f(alpha," and all(line.startswith(" " * 8) for line in wrapped[1:])
    assert " ".join(wrapped).split() == "x = f(alpha, beta, gamma)  # a comment".split()  # nothing lost
    assert viz.wrap_lines("a" * 25, width=10).splitlines()[0] == "a" * 10  # no space: cut the word
