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


def _mean_std(line: dict, metric: str, scale: float = 100.0, unit: str = "") -> str:
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
    if line.get("key") == line.get("against", reference) and line.get("key") is not None:
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
        rows.append([line["row"], f"{line['cells']}/{line['of']}", _mean_std(line, "dice"), _mean_std(line, "iou"),
                     _mean_std(line, "hd95", scale=1.0, unit=" px"), _mean_std(line, "nsd"), difference, verdict,
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
