"""Experiments: the paper's tables as grids of cells, trained on sequence-grouped folds.

Taught in notebook 06 (ablations). A grid is rows x folds x seeds, declared as data
(:data:`GRIDS`; the rows are the tables of ablations.py). A cell is one (row, fold, seed):

    1. its own run folder, trained by train.train (the one loop of both models) on the
       fold's training frames (+ synthetic frames made from those frames only);
    2. scored on the fold's held-out frames, at their own resolution;
    3. GRID_DIR/cells/<row>/fold<k>-seed<s>/ holds per_image.jsonl and cell.json (config,
       fold, seed, data, code commit, hardware, steps, seconds per step, wall time,
       metrics), written last: a cell is done once cell.json exists. These are small text
       files, committed under results/; the run folders (weights) go to GRID_DIR/runs/ and
       the synthetic sets to GRID_DIR/synthetic/, which git ignores.

A killed grid resumes: done cells are skipped, an interrupted cell resumes from its last
checkpoint. A cell is taken with a lock file created exclusively (``O_EXCL``), so two
processes, or two machines sharing the folder, never train the same cell; a lock whose
process has died on this machine is taken over.

Budgets are step counts (``GridBudget``), never minutes: the grid runs in the background
beside other work, and a wall-clock budget would give its cells unequal training. The
baseline gets the steps that cost it what the SynDiff steps cost (measured seconds per step,
``syndiff bench --train-step``), so the two still have equal compute.

    syndiff experiment run table2 --data DIR --out GRID_DIR
    syndiff experiment status table2 --out GRID_DIR
    syndiff experiment report table2 --out GRID_DIR
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ablations
from . import data as data_lib
from .checkpoint import lock_is_held, take_lock
from .config import Profile, get_profile

# --- the grids, as data ---------------------------------------------------------------------
# Table 1's rows beside the paper's: ours are trained; the others are reported numbers only.
TABLE1 = [
    {"row": "SynDiff (default recipe, real + 100 synthetic)", "key": "syndiff", "synthetic": 100, "paper": (96.0, 92.9)},
    {"row": "SynDiff, the paper's recipe (--config paper)", "key": "paper_recipe", "recipe": "paper", "synthetic": 100},
    {"row": "Pixel U-Net (equal budget)", "key": "baseline", "model_kind": "baseline", "synthetic": 100},
]
# Reported in the paper's Table 1 on CVC-ClinicDB (mean ± std over its 5 folds), not rerun
# here: Dice, IoU and NSD in %, HD95 in mm as the paper gives it.
REPORTED = [
    {"row": "SSFormer", "dice": (94.4, 0.4), "iou": (89.9, 0.6), "hd95_mm": (12.3, 2.1), "nsd": (87.2, 1.8)},
    {"row": "Li-SegPNet", "dice": (92.5, 0.5), "iou": (86.0, 0.7), "hd95_mm": (15.6, 3.2), "nsd": (84.1, 2.3)},
    {"row": "Diff-Trans", "dice": (95.4, 0.3), "iou": (92.0, 0.4), "hd95_mm": (8.7, 1.5), "nsd": (89.8, 1.2)},
    {"row": "SDSeg", "dice": (95.8, 0.2), "iou": (92.6, 0.3), "hd95_mm": (7.9, 1.3), "nsd": (90.4, 1.1)},
    {"row": "SynDiff (paper)", "dice": (96.0, 0.3), "iou": (92.9, 0.5), "hd95_mm": (7.2, 1.1), "nsd": (91.1, 1.0)},
]
SMOKE = [  # two rows for CI: the machinery (resume, lock, report), never a result
    {"row": "real", "key": "smoke_real", "train": ablations.NO_FLIPS},
    {"row": "+ synthetic", "key": "smoke_text", "train": ablations.NO_FLIPS, "synthetic": 100},
]
# Does bf16 autocast training cost Dice? The same cells as the noise grid's, trained in bf16.
def relabel(row: dict, **labels) -> dict:
    """A row of another table in this one: the same model, its paper numbers dropped (they are
    another table's), with new labels such as the row it is compared with ("against")."""
    return {k: v for k, v in row.items() if k != "paper"} | labels


PRECISION = [  # each bf16 row is compared with its own fp32 row ("against")
    relabel(TABLE1[0]),
    {"row": "SynDiff, trained with bf16 autocast", "key": "syndiff_bf16", "synthetic": 100,
     "train": {"mixed_precision": "bf16"}, "against": "syndiff"},
    relabel(TABLE1[2], against="baseline"),
    {"row": "Pixel U-Net, trained with bf16 autocast", "key": "baseline_bf16", "model_kind": "baseline",
     "synthetic": 100, "train": {"mixed_precision": "bf16"}, "against": "baseline"},
]
GRIDS = {
    "table1": {"rows": TABLE1, "reference": "syndiff"},
    "table2": {"rows": ablations.TABLE2, "reference": "real"},
    "table3": {"rows": ablations.TABLE3, "reference": "real"},
    "noise": {"rows": [TABLE1[0], TABLE1[2]], "reference": "syndiff", "folds": (0,), "seeds": (0, 1, 2)},
    "precision": {"rows": PRECISION, "reference": "syndiff", "folds": (0,), "seeds": (0, 1, 2)},
    "smoke": {"rows": SMOKE, "reference": "smoke_real", "folds": (0, 1), "profile": "tiny"},
}
# Table 2 read against its full model ("+ text-guided augmentation") instead of real data only:
# the paper's claims on the trainable encoder, the dual loss and multi-step inference are each
# a difference from that model. The same cells as Table 2's: nothing more to train.
GRIDS["table2_vs_full"] = {"rows": [r for r in ablations.TABLE2 if r.get("key") in ("text100", "frozen", "noise_only")
                                    or r.get("steps", 1) != 1], "reference": "text100"}
# Every row that trains a model, by key: a row of one table may score another table's model.
TRAINED = {row["key"]: row for grid in GRIDS.values() for row in grid["rows"] if "key" in row}
SPLIT_SEED = 0  # every cell of every grid uses the same folds; the training seed varies alone
NO_TIME_LIMIT = 7 * 24 * 60.0  # minutes: a cell is defined by its steps, never stopped by the clock


@dataclass
class GridBudget:
    """The training every cell gets, in steps (see the module docstring). The defaults are the
    cpu grid's, chosen from `syndiff bench --train-step cpu` on two quiet cores; the
    measurement, the hardware and the rule are in results/cpu-clinicdb/budget.json."""

    syndiff_steps: int = 1200  # aims at a quarter of an hour of two cores at 128 x 128
    baseline_steps: int = 366  # the steps that cost the baseline what syndiff_steps cost SynDiff
    val_every: int = 100
    checkpoint_every: int = 100
    autoencoder_steps: int | None = None  # None: the profile's (a test's tiny grid trains fewer)


def grid_spec(name: str) -> dict:
    """The grid ``name`` with its defaults filled in: rows, reference, folds, seeds, profile."""
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(GRIDS)}")
    return {"folds": tuple(range(5)), "seeds": (0,), "profile": "cpu", "name": name} | GRIDS[name]


def row_key(row: dict) -> str | None:
    """The name of the model a row scores: its own ("key") or another row's ("model")."""
    return row.get("key") or row.get("model")


def cell_profile(spec: dict, row: dict, budget: GridBudget) -> Profile:
    """The profile one row trains with: the grid's profile, the row's recipe and fields, and
    the grid's step budget (no wall-clock limit: steps define the cell)."""
    profile = get_profile(spec["profile"], recipe=row.get("recipe"))
    steps = budget.baseline_steps if row.get("model_kind") == "baseline" else budget.syndiff_steps
    # fp32 unless a row says otherwise: a cell must train alike on every machine, and a
    # profile's "auto" precision would pick bf16 on some CPUs and fp32 on others. Photometric
    # augmentation (and the zoom) off unless a row turns it on: the tables are the paper's
    # ablations of one recipe, run fold by fold over many sessions, and the cpu profile took
    # photometric augmentation up after they began, so every cell of a table trains alike and a
    # row says what it adds.
    train = {"mixed_precision": "no", "photometric_augment": False, "zoom_augment": False} | row.get("train", {})
    profile.train = dataclasses.replace(
        profile.train, **train, max_steps=budget.syndiff_steps, baseline_steps=budget.baseline_steps,
        max_minutes=NO_TIME_LIMIT,
        val_every=min(budget.val_every, steps), checkpoint_every=min(budget.checkpoint_every, steps),
        lr_warmup_steps=min(profile.train.lr_warmup_steps, steps))
    profile.diffusion = dataclasses.replace(profile.diffusion, **row.get("diffusion", {}))
    # The autoencoder, too, is defined by its steps: its wall-clock cap must never end it on a busy machine.
    ae_steps = {} if budget.autoencoder_steps is None else {"train_steps": budget.autoencoder_steps}
    profile.autoencoder = dataclasses.replace(profile.autoencoder, train_minutes=NO_TIME_LIMIT, **ae_steps)
    return profile


@dataclass
class Cell:
    """One (row, fold, seed) of a grid."""

    row: dict
    fold: int
    seed: int

    @property
    def name(self) -> str:
        return f"{row_key(self.row)}/fold{self.fold}-seed{self.seed}"

    @property
    def trains(self) -> bool:
        return "key" in self.row

    def folder(self, out: Path) -> Path:
        """Where the cell's results go."""
        steps = f"-steps{self.row['steps']}" if self.row.get("steps", 1) != 1 else ""
        return Path(out) / "cells" / f"{row_key(self.row)}{steps}" / f"fold{self.fold}-seed{self.seed}"

    def run_folder(self, out: Path) -> Path:
        """The run folder of the model the cell scores (another cell's, for a row that reuses one)."""
        return Path(out) / "runs" / row_key(self.row) / f"fold{self.fold}-seed{self.seed}"


def grid_cells(spec: dict) -> list[Cell]:
    """Every cell of a grid that can run: rows with a model (the GAN row has none yet), each
    model once. A row that reuses another table's model with the same inference is that
    model's cell (one folder, trained once, whichever grid runs it first)."""
    cells, seen = [], set()
    for row in spec["rows"]:
        if row_key(row) is None:
            continue
        if "model" in row and row.get("steps", 1) == 1:
            row = TRAINED[row["model"]]
        for fold in spec["folds"]:
            for seed in spec["seeds"]:
                cell = Cell(row, fold, seed)
                if (cell.name, row.get("steps", 1)) not in seen:
                    seen.add((cell.name, row.get("steps", 1)))
                    cells.append(cell)
    return cells


# --- locks -----------------------------------------------------------------------------------
def take_cell(folder: Path) -> bool:
    """Lock a cell (FOLDER/lock, checkpoint.take_lock); True if this process now holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    return take_lock(folder / "lock")


def release_cell(folder: Path) -> None:
    (folder / "lock").unlink(missing_ok=True)


# --- one cell ----------------------------------------------------------------------------------
def make_backend(backend: str, frames, split: dict, folder: Path, seed: int, gan_config=None):
    """The synthesis backend of a fold's set: copy-paste, or a GAN trained on the fold's
    training frames (saved in FOLDER/gan and reused). SDXL needs weights this machine cannot
    download: with a GPU, make its sets with `syndiff synth --backend sdxl`."""
    from .synthesis import CopyPasteBackend

    if backend == "copy-paste":
        return CopyPasteBackend()
    if backend == "gan":
        import torch

        from . import gan

        if not (folder / "gan" / "generator.safetensors").exists():
            cfg = dataclasses.replace(gan_config or gan.GANConfig(), seed=seed)
            gan.save_gan(gan.train_inpainting_gan(frames, cfg, torch.Generator().manual_seed(cfg.seed), log=lambda *_: None),
                         folder / "gan")
        model = gan.load_gan(folder / "gan")
        gan.check_trained_on(model, split["train"])
        return gan.GANInpaintBackend(model, model_id=f"gan-fold{split['fold']}-seed{seed}")
    raise ValueError(f"the grid makes synthetic data offline with copy-paste or gan, not {backend!r}; "
                     "make an SDXL set with `syndiff synth --backend sdxl` and pass it as a folder")


def synthetic_folder(out: Path, data, fold: int | None, seed: int, count: int, backend: str = "copy-paste") -> Path:
    """The fold's synthetic set of ``count`` samples, made (once, then reused) from the fold's
    training frames only, by sample index: the first k samples of a set are a k-sample set.
    ``fold`` None: the data's own split (PraNet's, Kvasir-SEG's published one), and the set is
    named after the data, as the cross-dataset runs (generalisation.py) train on several."""
    from .synthesis import synthesize, training_frames, write_manifest

    where = f"fold{fold}" if fold is not None else "+".join(map(data_lib.dataset_name, data_lib.as_datasets(data)))
    full = Path(out) / "synthetic" / f"{backend}-{where}-seed{seed}"
    subset = full.with_name(full.name + f"-n{count}")
    while not subset.exists():
        if not take_cell(full):  # another process is making this fold's set: wait for it
            time.sleep(10)
            continue
        try:
            if not subset.exists():
                frames, split = training_frames(data, fold=fold, split_seed=SPLIT_SEED)
                synthesize(make_backend(backend, frames, split, full, seed), frames, full, count, seed=seed, resume=True)
                data_lib.save_split(split, full / "split.json")
                records = [json.loads(line) for line in write_manifest(full, count).read_text().splitlines()]
                tmp = subset.with_name(subset.name + ".tmp")
                ablations.synthetic_subset(full, [r for r in records if r["kept"]][:count], count, tmp)
                tmp.rename(subset)  # whole from here on: its split.json came with it
        finally:
            release_cell(full)
    return subset


def data_name(data) -> str:
    """A data set's name for a published record: its folder's name, never a path of this machine."""
    return "toy" if data_lib.is_toy(data) else Path(data).resolve().name


def run_cell(cell: Cell, spec: dict, data, out: Path, budget: GridBudget, log=print) -> dict | None:
    """Train (or resume) and score one cell; returns its cell.json, or None if another process
    holds it or the model it reuses is not trained yet."""
    from .metrics import per_image_rows
    from .pipeline import evaluate, load_pipeline
    from .checkpoint import find_checkpoint
    from .train import train

    folder = cell.folder(out)
    if (folder / "cell.json").exists():
        return json.loads((folder / "cell.json").read_text())
    source = Cell(TRAINED[row_key(cell.row)], cell.fold, cell.seed)
    if not cell.trains and not (source.folder(out) / "cell.json").exists():
        return None  # the row reuses a model that is not trained yet
    if not take_cell(folder):
        return None
    try:
        start = time.time()
        profile = cell_profile(spec, cell.row, budget)
        run_dir = source.run_folder(out)
        if cell.trains:
            paper_count = cell.row.get("synthetic", 0)
            split = data_lib.build_split(data, fold=cell.fold, seed=SPLIT_SEED)
            count = ablations.scaled_count(paper_count, len(split["train"]), 10**6) if paper_count else 0
            backend = cell.row.get("backend", spec.get("backend", "copy-paste"))
            synthetic = [synthetic_folder(out, data, cell.fold, cell.seed, count, backend)] if count else []
            resume = find_checkpoint(run_dir) is not None
            if run_dir.exists() and not resume:  # killed before its first checkpoint: start it again
                shutil.rmtree(run_dir)
            model = cell.row.get("model_kind", "syndiff")
            log(f"{cell.name}: {'resuming' if resume else 'training'} ({profile.train.steps(model)} steps)")
            results = train(profile, data, run_dir, model=model, seed=cell.seed,
                            fold=cell.fold, split_seed=SPLIT_SEED, synthetic=synthetic, resume=resume,
                            log=lambda message: None)
        else:
            results = json.loads((run_dir / "results.json").read_text())
        split = data_lib.load_split(run_dir / "split.json")
        test = data_lib.load_dataset(data, ids=split["test"])  # native resolution: the score is on the real frames
        summary, per_image = evaluate(load_pipeline(run_dir), test, cell.row.get("steps", 1), seed=cell.seed)
        rows = per_image_rows(per_image)
        (folder / "per_image.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        record = {
            "grid": spec["name"], "row": cell.row["row"], "key": row_key(cell.row), "fold": cell.fold, "seed": cell.seed,
            "split_seed": SPLIT_SEED, "inference_steps": cell.row.get("steps", 1), "data": data_name(data),
            "model": results["model"], "recipe": results["recipe"], "overrides": results["overrides"],
            "synthetic": [{"n": s["n"], "folder": os.path.relpath(s["folder"], out)} for s in results["synthetic"]],
            "steps": results["steps"], "train_seconds": results["train_seconds"],
            "seconds_per_step": results["seconds_per_step"], "best_step": results["best_step"],
            "val_dice": results["val_dice"], "code": results["code"], "hardware": results["hardware"],
            "cell_wall_seconds": round(time.time() - start, 1), "metrics": summary, "config": results["config"],
        }
        (folder / "cell.json.tmp").write_text(json.dumps(record, indent=1))
        os.replace(folder / "cell.json.tmp", folder / "cell.json")  # the cell is done from here on
        log(f"{cell.name}: Dice {summary['dice']:.3f} on {summary['n']} held-out frames")
        return record
    finally:
        release_cell(folder)


def run_grid(name: str, data, out, budget: GridBudget | None = None, log=print, only=None, folds=None) -> dict:
    """Run every cell of a grid that is not done and not held by another process; a second
    pass picks up the cells that reuse a model trained in the first. ``only``: the names of
    the cells to run (``<row>/fold<k>-seed<s>``, :attr:`Cell.name`), e.g. to rerun one cell
    after deleting its folder. ``folds``: only the cells of these folds (a grid without them
    has nothing to do), so that several grids can run fold by fold and share each fold's
    autoencoder while it is cached. Returns status()."""
    from .train import progress_bar

    spec, out, budget = grid_spec(name), Path(out), budget or GridBudget()
    cells = grid_cells(spec)
    if only is not None:
        unknown = sorted(set(only) - {c.name for c in cells})
        if unknown:
            raise ValueError(f"grid {name} has no cell {', '.join(unknown)} "
                             f"(its cells are named like {cells[0].name})")
        cells = [c for c in cells if c.name in set(only)]
    if folds is not None:
        cells = [c for c in cells if c.fold in set(folds)]
    bar = progress_bar(len(cells), f"grid {name}", initial=sum(c.folder(out).joinpath("cell.json").exists() for c in cells))
    for _ in range(2):
        for cell in cells:
            if not (cell.folder(out) / "cell.json").exists() and run_cell(cell, spec, data, out, budget, log):
                bar.update(1)
    bar.close()
    return status(name, out)


# --- status and report ---------------------------------------------------------------------------
def status(name: str, out) -> dict:
    """Done / running / left cells of a grid, and an estimate of the time left."""
    spec, out = grid_spec(name), Path(out)
    done, running, left, seconds = [], [], [], []
    for cell in grid_cells(spec):
        folder = cell.folder(out)
        if (folder / "cell.json").exists():
            done.append(cell.name)
            seconds.append(json.loads((folder / "cell.json").read_text())["cell_wall_seconds"])
        elif lock_is_held(folder / "lock"):  # a killed cell's lock is left: it resumes
            running.append(cell.name)
        else:
            left.append(cell.name)
    per_cell = float(np.median(seconds)) if seconds else None
    return {"grid": name, "done": len(done), "running": running, "left": len(left), "cells": len(done) + len(running) + len(left),
            "median_cell_seconds": per_cell,
            "hours_left_estimate": None if per_cell is None else round(per_cell * (len(left) + len(running)) / 3600, 1)}


def grid_cost(out) -> dict:
    """What the finished cells in ``out`` cost, every grid together (grids share cells, so each
    cell counts once): core-hours (each cell's recorded wall time, training and scoring, times
    the threads it had; time lost to a killed run is not recorded) and the range of its seconds
    per step (the two models' steps differ, and cells ran with one thread or two)."""
    records = [json.loads(path.read_text()) for path in sorted(Path(out).glob("cells/*/*/cell.json"))]
    per_step = [r["seconds_per_step"] for r in records if r.get("seconds_per_step")]
    return {"cells": len(records),
            "core_hours": sum(r["cell_wall_seconds"] * r["hardware"]["cpu_threads"] for r in records) / 3600,
            "seconds_per_step": (min(per_step), max(per_step)) if per_step else None}


def load_cells(name: str, out) -> list[dict]:
    """The cell.json records of a grid's finished cells, each with its per-image metrics."""
    spec, out, records = grid_spec(name), Path(out), []
    for cell in grid_cells(spec):
        folder = cell.folder(out)
        if (folder / "cell.json").exists():
            record = json.loads((folder / "cell.json").read_text())
            record["per_image"] = [json.loads(line) for line in (folder / "per_image.jsonl").read_text().splitlines()]
            records.append(record)
    return records


def paired_bootstrap(diff: np.ndarray, groups: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-image differences and its 95 % confidence interval, resampling whole groups
    (video sequences: their frames are near-duplicates, so frames are not independent)."""
    rng = np.random.default_rng(seed)
    names = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in names]
    sums, counts = np.array([diff[m].sum() for m in members]), np.array([len(m) for m in members])
    draws = rng.integers(len(names), size=(n_boot, len(names)))  # [n_boot, G] sequences drawn with replacement
    means = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def report(name: str, out, metric: str = "dice") -> list[dict]:
    """One line per row: mean ± std over folds of each metric, and, against the grid's
    reference row (or the row a row names as "against"), the paired difference in ``metric``
    over all out-of-fold frames with a 95 % bootstrap interval over video sequences. Rows not
    complete are reported as such."""
    from .metrics import METRIC_NAMES, summarize_folds

    spec, cells = grid_spec(name), load_cells(name, out)
    by_row: dict[tuple, list[dict]] = {}
    for c in cells:
        by_row.setdefault((c["key"], c["inference_steps"]), []).append(c)

    def per_image(records):  # {id: metric averaged over seeds}
        values: dict[str, list[float]] = {}
        for r in records:
            for row in r["per_image"]:
                values.setdefault(row["id"], []).append(row[metric])
        return {k: float(np.mean(v)) for k, v in values.items()}

    expected = len(spec["folds"]) * len(spec["seeds"])
    lines = []
    for row in spec["rows"]:
        key, steps = row_key(row), row.get("steps", 1)
        against = row.get("against", spec["reference"])
        reference = per_image(by_row.get((against, 1), []))
        records = by_row.get((key, steps), [])
        line = {"row": row["row"], "key": key, "steps": steps, "paper": row.get("paper"), "cells": len(records),
                "of": expected, "against": against}
        if key is None:
            line["note"] = "not run"
        if records:
            folds = [summarize_folds([r["metrics"] for r in records if r["fold"] == f]) for f in spec["folds"]
                     if any(r["fold"] == f for r in records)]
            line |= {m: float(np.mean([f[m] for f in folds])) for m in METRIC_NAMES}
            line |= {f"{m}_std": float(np.std([f[m] for f in folds])) for m in METRIC_NAMES}
            line["n_folds"] = len(folds)
        if records and len(records) == expected and reference and (key, steps) != (against, 1):
            ours = per_image(records)
            ids = sorted(set(ours) & set(reference), key=data_lib.natural_key)
            diff = np.array([ours[i] - reference[i] for i in ids])
            groups = np.array([data_lib.clinicdb_sequence(i) if data_lib.clinicdb_frame(i) else i for i in ids])
            mean, low, high = paired_bootstrap(diff, groups)
            line |= {"diff": mean, "diff_low": low, "diff_high": high, "n_paired": len(ids),
                     "verdict": "better" if low > 0 else "worse" if high < 0 else "no detectable difference"}
        lines.append(line)
    return lines
