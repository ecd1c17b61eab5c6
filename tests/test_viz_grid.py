"""The experiment grid's tables and figures (notebook 06) from synthetic report lines and cell
records: no training, only that they build, label and format what they are given."""

import math

import pytest
from matplotlib.figure import Figure

from syndiff_lib import experiments, viz

METRICS = {"dice": 0.9, "dice_std": 0.01, "iou": 0.82, "iou_std": 0.02, "hd95": 7.5, "hd95_std": 1.25,
           "nsd": 0.88, "nsd_std": 0.03}
LINES = [
    {"row": "Baseline", "key": "real", "paper": (93.7, 89.6), "cells": 5, "of": 5} | METRICS,
    {"row": "+ Text", "key": "text100", "paper": (96.0, 92.9), "cells": 5, "of": 5} | METRICS
    | {"diff": 0.012, "diff_low": -0.004, "diff_high": 0.031, "n_paired": 612, "verdict": "no detectable difference"},
    {"row": "+ Frozen", "key": "frozen", "paper": (95.2, 91.8), "cells": 2, "of": 5} | METRICS,
    {"row": "GAN", "key": None, "paper": (95.2, 91.8), "cells": 0, "of": 5, "note": "not run"},
    {"row": "Noise only", "key": "noise_only", "paper": None, "cells": 0, "of": 5},
]


def cell(key, row, fold, seed, dice):
    return {"key": key, "row": row, "fold": fold, "seed": seed, "metrics": {"dice": dice, "hd95": 10.0 * dice}}


CELLS = [cell("real", "Baseline", f, 0, 0.8 + 0.01 * f) for f in range(5)] + [cell("text100", "+ Text", 0, 0, 0.85)]


def test_grid_table_rows_format_ours_the_difference_and_the_paper():
    rows = viz.grid_table_rows(LINES, reference="real")
    assert all(len(r) == len(viz.GRID_COLUMNS) for r in rows)
    assert rows[0] == ["Baseline", "5/5", "90.0 \u00b1 1.0", "82.0 \u00b1 2.0", "7.5 \u00b1 1.2 px", "88.0 \u00b1 3.0",
                       "reference", "-", "93.7", "89.6"]
    assert rows[1][6:8] == ["+1.2 [-0.4, +3.1]", "no detectable difference"]
    assert rows[2][6:8] == ["-", "not yet (2 of 5 cells)"]
    assert rows[3][2:8] == ["-", "-", "-", "-", "-", "not run"]
    assert rows[4][1:] == ["0/5", "-", "-", "-", "-", "-", "not yet (0 of 5 cells)", "-", "-"]


def test_grid_table_marks_the_papers_other_methods_reported_not_rerun():
    tab = viz.grid_table(LINES[:1], reference="real", reported=experiments.REPORTED, caption="Table 1")
    assert len(tab.rows) == 1 + len(experiments.REPORTED) and tab.columns == viz.GRID_COLUMNS
    sdseg = next(r for r in tab.rows if r[0] == "SDSeg")
    assert sdseg[1] == sdseg[7] == viz.NOT_RERUN and sdseg[4] == "7.9 \u00b1 1.3 mm" and sdseg[8] == "95.8"


def test_forest_plot_draws_complete_rows_and_labels_the_others():
    fig = viz.forest_plot(LINES, reference="real", title="Table 2")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [line["row"] for line in LINES]  # first row at the top
    notes = {t.get_text() for t in ax.texts}
    assert {"reference", "not run", "not yet (2 of 5 cells)", "not yet (0 of 5 cells)"} <= notes
    assert any(line.get_xdata()[0] == 0.0 for line in ax.get_lines())  # the line at 0
    assert isinstance(viz.forest_plot(LINES[2:]), Figure)  # nothing to draw yet: still a figure


def test_fold_spread_plot_one_dot_per_fold_and_an_empty_grid():
    assert viz.fold_means(CELLS)["Baseline"] == pytest.approx({f: 0.8 + 0.01 * f for f in range(5)})
    fig = viz.fold_spread_plot(CELLS)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["Baseline", "+ Text"]
    assert len([l for l in fig.axes[0].get_lines() if l.get_marker() == "o"]) == 6
    assert isinstance(viz.fold_spread_plot(CELLS, metric="hd95"), Figure)
    empty = viz.fold_spread_plot([])
    assert [t.get_text() for t in empty.axes[0].texts] == ["no cells done yet"]


def test_seed_spread_and_the_smallest_detectable_difference():
    cells = [cell("syndiff", "SynDiff", 0, s, d) for s, d in enumerate([0.80, 0.82, 0.84])]
    cells += [cell("baseline", "U-Net", 0, 0, 0.7), cell("syndiff", "SynDiff", 1, 0, 0.5)]
    spread = viz.seed_spread(cells)
    assert spread["syndiff"]["seeds"] == {0: 0.80, 1: 0.82, 2: 0.84}
    assert spread["syndiff"]["std"] == pytest.approx(0.02)
    assert spread["baseline"]["std"] is None  # one seed: no spread yet
    assert viz.detectable_difference(0.02) == pytest.approx(1.96 * math.sqrt(2) * 0.02)


def test_progress_note_says_when_the_means_are_not_yet_the_grids():
    assert viz.progress_note({"done": 1, "cells": 30}).startswith("1 of 30 cells done: the row means are not yet")
    assert viz.progress_note({"done": 30, "cells": 30}).startswith("all 30 cells done")


def test_one_fold_shows_no_spread():
    from syndiff_lib import viz

    one = {"row": "r", "key": "r", "cells": 1, "of": 5, "n_folds": 1, "dice": 0.62, "dice_std": 0.0, "iou": 0.5,
           "iou_std": 0.0, "hd95": 70.0, "hd95_std": 0.0, "nsd": 0.2, "nsd_std": 0.0}
    row = viz.grid_table_rows([one], "r")[0]
    assert row[2] == "62.0 (1 fold)" and "±" not in " ".join(map(str, row[2:6]))


def test_the_reference_model_at_another_step_count_is_a_row_not_the_reference():
    one = {"row": "+ synthetic", "key": "text100", "steps": 1, "cells": 5, "of": 5, "against": "text100"}
    fifty = one | {"row": "+ multi-step (T = 50)", "steps": 50, "cells": 3}
    assert viz._difference(one, "text100") == ("reference", "-")
    assert viz._difference(fifty, "text100") == ("-", "not yet (3 of 5 cells)")
