"""Overlays and figure grids used by all notebooks (01 data onward).

Each plotting function returns a `matplotlib.figure.Figure`. It is made with pyplot and closed
from pyplot before it is returned, so a notebook shows it once (as the cell's value), scripts
save it with `fig.savefig(path)`, and nothing piles up in memory. No backend is chosen here.
Images are uint8 [H, W, 3]; masks are bool [H, W].
"""

import html
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from .data import read_image, read_mask
from .metrics import dice_score

DPI = 90  # modest: keeps the executed notebooks light
TARGET_COLOR = (0, 255, 0)  # ground truth in green
PRED_COLOR = (255, 0, 255)  # prediction in magenta: stays distinct from green for most colour-blind readers


def overlay(image_uint8, mask, color=(0, 255, 0), alpha: float = 0.4, contour_only: bool = False) -> np.ndarray:
    """Blend `color` into `image_uint8` [H, W, 3] where `mask` [H, W] is True; returns uint8 [H, W, 3].

    contour_only=True paints only the mask's outline (one pixel wide), at full opacity.
    """
    image = np.asarray(image_uint8)
    mask = np.asarray(mask)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image_uint8 must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2] or mask.dtype != bool:
        raise ValueError(f"mask must be bool {image.shape[:2]}, got {mask.dtype} {mask.shape}")
    if contour_only:
        mask = mask & ~ndimage.binary_erosion(mask)  # the mask's own edge pixels
        alpha = 1.0
    out = image.astype(np.float32)  # [H, W, 3]
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(color, dtype=np.float32)
    return out.round().astype(np.uint8)


def _axes_grid(n_panels: int, ncols: int, figsize, panel_inches: float = 2.5):
    """A figure with rows x ncols axes (ticks off); returns the figure and the flat list of axes."""
    ncols = max(1, min(ncols, n_panels))
    nrows = -(-n_panels // ncols)  # ceil division
    figsize = figsize or (panel_inches * ncols, panel_inches * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, dpi=DPI, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)


def _finish(fig: Figure) -> Figure:
    """Tighten the layout and hand the figure over from pyplot to the caller."""
    fig.tight_layout()
    plt.close(fig)
    return fig


def show_grid(images, titles=None, ncols: int = 4, figsize=None) -> Figure:
    """Images ([H, W, 3] colour or [H, W] grey/mask) in a grid, with optional titles."""
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"titles has {len(titles)} entries for {len(images)} images")
    fig, axes = _axes_grid(len(images), ncols, figsize)
    for i, image in enumerate(images):
        image = np.asarray(image)
        axes[i].imshow(image, cmap="gray" if image.ndim == 2 else None)
        if titles is not None:
            axes[i].set_title(titles[i], fontsize=9)
    return _finish(fig)


def compare_figure(images, targets, preds, n: int = 6, row_titles=None) -> Figure:
    """One row per example: image | ground truth overlay | prediction overlay (Dice in its title).

    images: uint8 [N, H, W, 3]; targets and preds: bool [N, H, W]. Shows the first `n`.
    row_titles: optional label per row (e.g. the file name), put over the image.
    """
    n = min(n, len(images))
    fig, axes = _axes_grid(3 * n, ncols=3, figsize=None)
    for row in range(n):
        image, target, pred = np.asarray(images[row]), np.asarray(targets[row]), np.asarray(preds[row])
        panels = [
            (image, "image" if row_titles is None else row_titles[row]),
            (overlay(image, target, TARGET_COLOR), "ground truth"),
            (overlay(image, pred, PRED_COLOR), f"prediction, Dice {dice_score(pred, target):.3f}"),
        ]
        for col, (panel, title) in enumerate(panels):
            axes[3 * row + col].imshow(panel)
            axes[3 * row + col].set_title(title, fontsize=9)
    return _finish(fig)


TEXT_WIDTH = 90  # characters: what the book's column shows without a horizontal scroll bar


def wrap_lines(text: str, width: int = TEXT_WIDTH) -> str:
    """``text`` with every line longer than ``width`` broken at its last space before the
    limit (or at the limit, with no space); the continuation keeps the line's indentation
    plus four spaces, so printed code and log lines fit the book's column (notebook 04)."""
    out = []
    for line in text.splitlines():
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        while len(line) > width:
            cut = line.rfind(" ", len(indent), width + 1)
            cut = cut if cut > len(indent) else width  # no space to break at: cut the word
            out.append(line[:cut].rstrip())
            line = indent + line[cut:].lstrip()
        out.append(line)
    return "\n".join(out)


def print_wrapped(message: str) -> None:
    """print(:func:`wrap_lines` (message)): a ``log`` for train() and friends in the notebooks."""
    print(wrap_lines(message))


def read_jsonl(path) -> list[dict]:
    """The records of a JSONL metrics log, one dict per non-empty line."""
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start); same length as `values`."""
    cumsum = np.cumsum(np.insert(np.asarray(values, dtype=np.float64), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumsum[ends] - cumsum[starts]) / (ends - starts)


def plot_training_log(log_path_or_records, keys=("loss",), smooth: int = 1) -> Figure:
    """One panel per key against "step", from a JSONL log ({"step": int, "loss": float, ...} per line).

    Records without a key are skipped for that key (e.g. validation every k steps).
    smooth > 1 draws the raw curve faintly and a trailing running mean over `smooth` records on top.
    """
    records = log_path_or_records
    if isinstance(records, (str, Path)):
        records = read_jsonl(records)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), dpi=DPI, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        steps, values = np.array(points, dtype=np.float64).reshape(-1, 2).T  # [T], [T]
        if smooth > 1:
            ax.plot(steps, values, alpha=0.3, color="C0")
            ax.plot(steps, running_mean(values, smooth), color="C0", label=f"running mean ({smooth})")
            ax.legend(fontsize=8)
        else:
            ax.plot(steps, values, color="C0")
        ax.set_xlabel("step")
        ax.set_title(key, fontsize=10)
    return _finish(fig)


def latent_grid(latent) -> Figure:
    """The channels of one latent [4, h, w], side by side, each on a colour scale symmetric about 0."""
    latent = np.asarray(latent, dtype=np.float32)
    if latent.ndim != 3:
        raise ValueError(f"latent must be [C, h, w] (e.g. [4, h, w]), got shape {latent.shape}")
    fig, axes = _axes_grid(len(latent), ncols=len(latent), figsize=None)
    for channel, ax in enumerate(axes):
        limit = float(np.abs(latent[channel]).max()) or 1.0
        shown = ax.imshow(latent[channel], cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"channel {channel}", fontsize=9)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    return _finish(fig)


class Table:
    """A small table for notebooks and the book: HTML where a browser shows it, aligned text elsewhere.

    Made by :func:`table`. myst-nb's glue stores both forms, so a table glued in a notebook can be
    pasted into a book page (notebooks 01-07, "Reproducing the paper").
    """

    def __init__(self, rows: list[list[str]], columns: list[str], caption: str | None = None):
        self.rows, self.columns, self.caption = rows, columns, caption

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.rows)
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return f'<table class="table">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def __repr__(self) -> str:
        lines = [self.columns, *self.rows]
        widths = [max(len(line[k]) for line in lines) for k in range(len(self.columns))]
        text = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(([self.caption] if self.caption else []) + text)


def _cell(value, floatfmt: str) -> str:
    """One table cell as text: floats with `floatfmt`, None and NaN as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2014"
    if isinstance(value, (float, np.floating)):
        return format(float(value), floatfmt)
    return str(value)


def table(rows, columns, caption: str | None = None, floatfmt: str = ".3f") -> Table:
    """A :class:`Table` from rows (lists of values, one per column); floats are written with `floatfmt`."""
    rows = [list(row) for row in rows]
    bad = [row for row in rows if len(row) != len(columns)]
    if bad:
        raise ValueError(f"every row needs {len(columns)} values (one per column), got {bad[0]}")
    return Table([[_cell(v, floatfmt) for v in row] for row in rows], [str(c) for c in columns], caption)


def fig2_grid(out_dir, n: int = 8, ncols: int = 4, rejected: bool = False) -> Figure:
    """The paper's Fig. 2: rows of synthetic frames, each over a row of their masks (notebook 02).

    Shows the first n kept samples of the manifest that synthesis.synthesize wrote (rejected=True: the rejected ones).
    """
    records = [r for r in read_jsonl(Path(out_dir) / "manifest.jsonl") if r["kept"] != rejected]
    if not records:
        raise ValueError(f"{out_dir}/manifest.jsonl lists no {'rejected' if rejected else 'kept'} samples")
    ncols = max(1, min(ncols, n, len(records)))
    records = records[:min(n, len(records)) // ncols * ncols]  # whole rows only: each mask sits under its frame
    panels, titles = [], []
    for start in range(0, len(records), ncols):
        row = records[start:start + ncols]
        panels += [read_image(Path(out_dir) / r["image"]) for r in row]
        titles += [f"{r['prompt_id']} {r['attributes']['size']} {r['attributes']['morphology']}" for r in row]
        panels += [read_mask(Path(out_dir) / r["mask"]) for r in row]
        titles += [f"{r['backend']}, consistency {r['consistency']:.2f}" for r in row]
    return show_grid(panels, titles, ncols=ncols)


# --- the experiment grid (notebook 06) ---------------------------------------------------------
# Report lines come from experiments.report: fractions in [0, 1] for Dice, IoU and NSD, pixels for
# HD95; the tables and plots show Dice, IoU and NSD in %, as the paper does.
GRID_COLUMNS = ["row", "cells", "Dice %", "IoU %", "HD95", "NSD %", "\u0394 Dice vs reference [95 % CI]",
                "verdict", "paper Dice", "paper IoU"]
NOT_RERUN = "reported, not rerun"


def mean_std(line: dict, metric: str, scale: float = 100.0, unit: str = "") -> str:
    """ "mean ± std" of a report line's metric (std over folds), "mean (1 fold)" while one
    fold alone is done (a spread over one fold is no spread), or "-" where the row has no cells."""
    if metric not in line:
        return "-"
    if line.get("n_folds", 2) < 2:
        return f"{scale * line[metric]:.1f}{unit} (1 fold)"
    return f"{scale * line[metric]:.1f} \u00b1 {scale * line[f'{metric}_std']:.1f}{unit}"


def _difference(line: dict, reference: str | None) -> tuple[str, str]:
    """The paired difference in Dice points with its interval, and the verdict, as text."""
    if "diff" in line:
        return (f"{100 * line['diff']:+.1f} [{100 * line['diff_low']:+.1f}, {100 * line['diff_high']:+.1f}]",
                line["verdict"])
    if line.get("note"):
        return "-", line["note"]
    is_reference = line.get("key") == line.get("against", reference) and line.get("steps", 1) == 1
    if is_reference and line.get("key") is not None:  # the reference model at another step count is a row
        return "reference", "-"
    return "-", f"not yet ({line['cells']} of {line['of']} cells)"


def grid_table_rows(lines: list[dict], reference: str | None = None) -> list[list[str]]:
    """Rows for :func:`table` with :data:`GRID_COLUMNS`, one per report line (notebook 06).

    Ours: cells done of the row's cells, mean ± std over folds of Dice, IoU, NSD (%) and HD95
    (px); the paired difference in Dice points against ``reference`` (the grid's reference row
    key) with its 95 % bootstrap interval over video sequences, once the row is complete. The
    paper's Dice and IoU where the row has them. "-" wherever there is nothing to show.
    """
    rows = []
    for line in lines:
        paper = line.get("paper") or ("-", "-")
        difference, verdict = _difference(line, reference)
        rows.append([line["row"], f"{line['cells']}/{line['of']}", mean_std(line, "dice"), mean_std(line, "iou"),
                     mean_std(line, "hd95", scale=1.0, unit=" px"), mean_std(line, "nsd"), difference, verdict,
                     *[p if isinstance(p, str) else f"{p:.1f}" for p in paper]])
    return rows


def reported_table_rows(reported: list[dict]) -> list[list[str]]:
    """Rows with :data:`GRID_COLUMNS` for methods the paper reports and we do not rerun
    (experiments.REPORTED: (mean, std) in %, HD95 in mm), marked "reported, not rerun"."""
    def pair(value, unit=""):
        return f"{value[0]:.1f} \u00b1 {value[1]:.1f}{unit}"

    return [[r["row"], NOT_RERUN, pair(r["dice"]), pair(r["iou"]), pair(r["hd95_mm"], " mm"), pair(r["nsd"]),
             "-", NOT_RERUN, f"{r['dice'][0]:.1f}", f"{r['iou'][0]:.1f}"] for r in reported]


def grid_table(lines: list[dict], reference: str | None = None, reported=(), caption: str | None = None) -> Table:
    """A :class:`Table` of a grid's report (:func:`grid_table_rows`), then any ``reported`` rows."""
    return table(grid_table_rows(lines, reference) + reported_table_rows(list(reported)), GRID_COLUMNS, caption)


def forest_plot(lines: list[dict], reference: str | None = None, title: str | None = None) -> Figure:
    """Each row's Dice minus the reference row's, in Dice points, with its 95 % bootstrap
    interval over video sequences (report lines with "diff"); a vertical line at 0. Rows with
    no difference yet are labelled in place: "reference", "not run" or "not yet (k of N cells)"."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(lines) + 1.2), dpi=DPI)
    y = np.arange(len(lines))[::-1]  # first row at the top
    for position, line in zip(y, lines):
        if "diff" in line:
            mean, low, high = 100 * line["diff"], 100 * line["diff_low"], 100 * line["diff_high"]
            ax.errorbar(mean, position, xerr=[[mean - low], [high - mean]], fmt="o", color="C0", capsize=3)
        else:
            difference, verdict = _difference(line, reference)
            text = verdict if difference == "-" else difference  # "reference", "not run" or "not yet (...)"
            ax.annotate(text, (0.5, position), xycoords=("axes fraction", "data"), ha="center", va="center",
                        fontsize=8, color="0.4")
    ax.axvline(0.0, color="0.3", linewidth=1, linestyle="--")
    ax.set_yticks(y, [line["row"] for line in lines], fontsize=8)
    ax.set_ylim(-0.7, len(lines) - 0.3)
    ax.set_xlabel("\u0394 Dice vs reference (points), 95 % CI over video sequences")
    if not any("diff" in line for line in lines):
        ax.set_xlim(-5, 5)  # an empty plot still shows the scale the differences will have
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig)


def fold_means(cells: list[dict], metric: str = "dice") -> dict[str, dict[int, float]]:
    """{row: {fold: mean over seeds of the cell's mean ``metric``}} from experiments.load_cells
    records, rows in the order they come."""
    values: dict[str, dict[int, list[float]]] = {}
    for cell in cells:
        values.setdefault(cell["row"], {}).setdefault(cell["fold"], []).append(cell["metrics"][metric])
    return {row: {fold: float(np.mean(v)) for fold, v in sorted(folds.items())} for row, folds in values.items()}


def fold_spread_plot(cells: list[dict], metric: str = "dice", title: str | None = None) -> Figure:
    """Per row, each fold's mean ``metric`` as a dot (one colour per fold) and their mean as a
    bar: the spread over folds behind a table's ±. Dice, IoU and NSD in %, HD95 in px."""
    scale = 1.0 if metric == "hd95" else 100.0
    means = fold_means(cells, metric)
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(means), 1) + 1.2), dpi=DPI)
    y = np.arange(len(means))[::-1]
    folds = sorted({fold for row in means.values() for fold in row})
    for position, (row, by_fold) in zip(y, means.items()):
        for fold, value in by_fold.items():
            ax.plot(scale * value, position, "o", color=f"C{folds.index(fold)}", alpha=0.8, label=f"fold {fold}")
        ax.plot([scale * np.mean(list(by_fold.values()))] * 2, [position - 0.3, position + 0.3], color="0.2")
    if not means:
        ax.annotate("no cells done yet", (0.5, 0.5), xycoords="axes fraction", ha="center", va="center", color="0.4")
        ax.set_yticks([])
    else:
        ax.set_yticks(y, list(means), fontsize=8)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))  # one legend entry per fold
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    name = {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "nsd": "NSD"}.get(metric, metric)
    ax.set_xlabel(f"{name} per fold ({'px' if metric == 'hd95' else '%'})")
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig)


def seed_spread(cells: list[dict], fold: int = 0, metric: str = "dice") -> dict[str, dict]:
    """Per row key, the mean ``metric`` of each seed on ``fold`` and their std over seeds
    (ddof=1; None with fewer than 2 seeds): the training noise of the noise grid (notebook 06)."""
    values: dict[str, dict[int, float]] = {}
    for cell in cells:
        if cell["fold"] == fold:
            values.setdefault(cell["key"], {})[cell["seed"]] = cell["metrics"][metric]
    return {key: {"seeds": by_seed, "std": float(np.std(list(by_seed.values()), ddof=1)) if len(by_seed) > 1 else None}
            for key, by_seed in values.items()}


def detectable_difference(seed_std: float, z: float = 1.96) -> float:
    """The smallest difference between two single-seed cells that training noise alone makes
    unlikely (two-sided 95 %): z x sqrt(2) x the std over seeds, the std of a difference of two."""
    return z * math.sqrt(2.0) * seed_std


def progress_note(state: dict) -> str:
    """A grid's progress in words, from experiments.status: whether its row means are the 5-fold numbers yet."""
    if state["done"] < state["cells"]:
        return (f"{state['done']} of {state['cells']} cells done: the row means are not yet the paper's "
                "5-fold numbers, and a row's difference is shown only once all its cells are done")
    return f"all {state['cells']} cells done: the row means are over the grid's folds"


# --- choosing what to show, by a stated rule (notebooks 04 and 05) ----------------------------
# A figure of "the first frames" shows whatever the data's order happens to put first. These
# functions pick frames by a rule a caption can state (by Dice, by polyp size, by kind of
# failure) and summarise a run's log and a study, so that the prose can quote what they return.

FAILURE_KINDS = ("missed", "false detection", "mis-shaped")
FAILURE_DICE = 0.5  # a failure: less overlap than half of what a perfect mask has
MISSED_COVERAGE = 0.2  # a prediction that covers under a fifth of the polyp has not found it
FALSE_SHARE = 0.5  # most of the predicted area in regions that never touch the polyp: it points elsewhere


def polyp_fractions(masks) -> np.ndarray:
    """The fraction of each bool mask [H, W] that is polyp: [N] floats in [0, 1] (masks may differ in size)."""
    return np.array([np.asarray(mask, dtype=bool).mean() for mask in masks], dtype=np.float64)


def latent_cells_touched(masks, factor: int) -> np.ndarray:
    """How many cells of the latent grid each mask [H, W] touches: [N] ints. A cell is a
    ``factor`` x ``factor`` block of pixels (8 for SD's autoencoder), touched when any of its
    pixels is polyp, the rule ``diffusion.balanced_l1`` uses."""
    counts = []
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        h, w = mask.shape
        if h % factor or w % factor:
            raise ValueError(f"mask side {mask.shape} is not a multiple of the latent factor {factor}")
        cells = mask.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3))  # [h, w] latent grid
        counts.append(int(cells.sum()))
    return np.array(counts, dtype=np.int64)


def rank_picks(values, labels=("lowest", "median", "highest")) -> list[tuple[str, int]]:
    """(label, index) of the lowest, the median and the highest of ``values`` [N]: the rows of a
    figure chosen by rank, not by position. The median is the lower middle of a stable sort, so
    ties keep the data's order. NaNs are refused: a NaN has no rank."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError("values holds NaN; drop those entries before ranking")
    order = np.argsort(values, kind="stable")  # [N], lowest first
    lowest, median, highest = labels
    picks = [(lowest, int(order[0])), (median, int(order[(len(order) - 1) // 2])), (highest, int(order[-1]))]
    unique = []
    for label, index in picks:  # with N < 3 one frame holds two ranks: show it once, under the first
        if index not in [i for _, i in unique]:
            unique.append((label, index))
    return unique


def picks_figure(samples, preds, picks, fractions=None) -> Figure:
    """:func:`compare_figure` of the frames that ``picks`` names ((label, index) pairs, e.g. from
    :func:`rank_picks`): each row titled with its label, the frame's id and, given
    ``fractions`` [N], its polyp's share of the frame; the prediction's Dice is in its own
    title. samples: objects with .image, .mask and .id; preds: bool [N, H, W]. No picks: a
    figure that says so."""
    if not picks:
        fig, ax = plt.subplots(figsize=(7.5, 0.6), dpi=DPI)
        ax.axis("off")
        ax.annotate("no frame to show", (0.5, 0.5), xycoords="axes fraction", ha="center", va="center", color="0.4")
        return _finish(fig)
    titles = []
    for label, i in picks:
        size = "" if fractions is None else f"\npolyp {fractions[i]:.1%} of the frame"
        titles.append(f"{label}: frame {samples[i].id}{size}")
    return compare_figure([samples[i].image for _, i in picks], [samples[i].mask for _, i in picks],
                          [preds[i] for _, i in picks], n=len(picks), row_titles=titles)


def classify_failure(pred, target, failure_dice: float = FAILURE_DICE, missed_coverage: float = MISSED_COVERAGE,
                     false_share: float = FALSE_SHARE) -> dict:
    """What went wrong in one prediction, by a stated rule (notebook 05's failure cases).

    pred, target: bool [H, W]. With Dice >= ``failure_dice`` the frame is no failure (kind None).
    Below it, in this order:
    1. "false detection": more than ``false_share`` of the predicted pixels lie in connected
       regions that do not touch the polyp (the model points elsewhere); with no polyp in the
       frame, any predicted pixel is one.
    2. "missed": else, if the prediction covers less than ``missed_coverage`` of the polyp
       (nothing, or almost nothing, was predicted on it).
    3. "mis-shaped": else (found, in the right place, with the wrong outline).
    Returns {"kind", "dice", "coverage" (share of the polyp predicted), "false_share" (share
    of the prediction away from the polyp)}; a share of an empty mask is NaN.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape or pred.dtype != bool or target.dtype != bool:
        raise ValueError(f"pred and target must be bool masks of one shape, got {pred.dtype} {pred.shape} "
                         f"and {target.dtype} {target.shape}")
    dice = dice_score(pred, target)
    coverage = float((pred & target).sum() / target.sum()) if target.any() else math.nan
    regions, n_regions = ndimage.label(pred)  # [H, W]: 0 background, 1..n the predicted regions
    touching = np.unique(regions[pred & target])  # the regions that overlap the polyp
    away = pred & ~np.isin(regions, touching)  # [H, W]: predicted pixels in regions that never touch it
    share_away = float(away.sum() / pred.sum()) if pred.any() else math.nan
    kind = None
    if dice < failure_dice:
        if not target.any() or share_away > false_share:  # no polyp: Dice < 1 means something was predicted
            kind = "false detection"
        elif coverage < missed_coverage:
            kind = "missed"
        else:
            kind = "mis-shaped"
    return {"kind": kind, "dice": dice, "coverage": coverage, "false_share": share_away}


def worst_of_each_kind(cases: list[dict]) -> dict[str, int | None]:
    """{kind: index of the lowest-Dice case of that kind, or None when no case has it} for each
    of FAILURE_KINDS, from :func:`classify_failure` results (one per frame)."""
    worst = {}
    for kind in FAILURE_KINDS:
        of_kind = [i for i, case in enumerate(cases) if case["kind"] == kind]
        worst[kind] = min(of_kind, key=lambda i: cases[i]["dice"]) if of_kind else None
    return worst


def by_polyp_size(values, fractions, threshold: float) -> dict:
    """Mean of ``values`` [N] (e.g. per-image Dice) over the frames whose polyp covers less
    than ``threshold`` of the frame ("small") and over the others ("large"), with their counts.
    The mean of an empty group is NaN."""
    values, fractions = np.asarray(values, dtype=np.float64), np.asarray(fractions, dtype=np.float64)
    if values.shape != fractions.shape:
        raise ValueError(f"values and fractions must have one shape, got {values.shape} and {fractions.shape}")
    small = fractions < threshold  # [N]

    def mean(group):
        return float(values[group].mean()) if group.any() else math.nan

    return {"n_small": int(small.sum()), "n_large": int((~small).sum()), "small": mean(small), "large": mean(~small)}


def versus_noise(means, seed_stds, n_seeds: int, z: float = 1.96) -> dict:
    """Do several settings differ by more than their noise? The rule of notebook 05's t study.

    means: each setting's mean Dice over ``n_seeds`` seeds of the inference noise; seed_stds:
    the std over those seeds (numpy's, ddof=0, as ablations.inference_study gives it).
    spread = max - min of the means. A difference between two such means stands out of the
    noise (two-sided 95 %) when it exceeds detectable = z x sqrt(2) x s / sqrt(n_seeds - 1),
    with s the largest of ``seed_stds``: s / sqrt(n_seeds - 1) is the standard error of a mean
    of n_seeds draws estimated from a ddof=0 std. The settings share their seeds, so this
    unpaired test is, if anything, strict. Returns {"spread", "detectable", "flat" (spread <=
    detectable), "highest" (index of the highest mean)}.
    """
    means, seed_stds = np.asarray(means, dtype=np.float64), np.asarray(seed_stds, dtype=np.float64)
    if means.shape != seed_stds.shape or means.size < 2:
        raise ValueError(f"need two or more settings with one std each, got {means.shape} and {seed_stds.shape}")
    if n_seeds < 2:
        raise ValueError(f"n_seeds must be >= 2 (one seed has no spread), got {n_seeds}")
    spread = float(means.max() - means.min())
    detectable = detectable_difference(float(seed_stds.max()) / math.sqrt(n_seeds - 1), z)
    return {"spread": spread, "detectable": detectable, "flat": spread <= detectable, "highest": int(means.argmax())}


def ema_summary(records) -> dict:
    """What averaging the weights did in one training log (notebook 04): at every validation
    the log has "val_dice" (the averaged weights) and "val_dice_raw" (the optimiser's).

    Returns {"n_val", "n_ema_higher", "ema_mean", "raw_mean", "raw_max_jump"} (the largest
    change of the raw weights' Dice from one validation to the next). A log without the raw
    weights' Dice (EMA off) gives n_val and NaN for the rest.
    """
    if isinstance(records, (str, Path)):
        records = read_jsonl(records)
    validations = [r for r in records if "val_dice" in r]
    paired = [r for r in validations if "val_dice_raw" in r]
    if not paired:
        return {"n_val": len(validations), "n_ema_higher": math.nan, "ema_mean": math.nan, "raw_mean": math.nan,
                "raw_max_jump": math.nan}
    ema = np.array([r["val_dice"] for r in paired])  # [V]
    raw = np.array([r["val_dice_raw"] for r in paired])  # [V]
    jumps = np.abs(np.diff(raw))
    return {"n_val": len(validations), "n_ema_higher": int((ema > raw).sum()), "ema_mean": float(ema.mean()),
            "raw_mean": float(raw.mean()), "raw_max_jump": float(jumps.max()) if jumps.size else math.nan}
