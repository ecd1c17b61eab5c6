"""The paper's ablation tables (Tables 2 and 3) as data, and the loop that trains and scores them.

Taught in notebook 06 (ablations). Each row of a table is a training configuration: the
notebook's profile with a few fields replaced. A row either trains a model of its own
(``"key"``: the run folder's name) or reuses another row's model (``"model"``), e.g. the
"multi-step inference" row, whose only change is 50 DDIM steps at inference time.

How we read the paper's rows: "Baseline" is real data with no augmentation (= Table 3's
"None"); "+ Text-guided augmentation" is the full model (= "Text-guided (100)"); the other
rows change one thing of that model, except "+ Traditional augmentation", which is Table 3's
"Traditional" row (real data + flips and a small rotation). Synthetic counts are the paper's,
on its 488 training frames; :func:`scaled_count` scales them to our training set. The GAN
row's samples come from a pix2pix inpainting GAN trained on the fold's training frames
(gan.py); every other synthetic row uses the backend the grid is given.

Every count and budget the notebooks print is computed here, not in a cell: how many
synthetic samples notebook 02 makes (:func:`synthetic_set_size`), what each row of the grid
may train (:func:`grid_budget`), and, for notebook 05, the t_infer study
(:func:`inference_study`) and the setting chosen from it on validation (:func:`best_single_step`).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from .config import Profile, get_profile

NO_FLIPS = {"flip_augment": False}
TRADITIONAL = {"flip_augment": True, "rotate_augment": True}

# Each row: the paper's (Dice, IoU) in %, mean over 5 folds on CVC-ClinicDB, and what it changes.
# "train" / "diffusion": fields of TrainConfig / DiffusionConfig; "synthetic": the paper's
# number of synthetic samples; "steps": inference steps (1 = single step).
TABLE2 = [
    {"row": "Baseline (real data only)", "paper": (93.7, 89.6), "key": "real", "train": NO_FLIPS},
    {"row": "+ Text-guided augmentation", "paper": (96.0, 92.9), "key": "text100",
     "train": NO_FLIPS, "synthetic": 100},
    {"row": "+ Multi-step inference (T = 50)", "paper": (96.1, 93.0), "model": "text100", "steps": 50},
    {"row": "+ Frozen vision encoder", "paper": (95.2, 91.8), "key": "frozen",
     "train": NO_FLIPS | {"freeze_encoder": True}, "synthetic": 100},
    {"row": "+ Noise loss only (λ = 0)", "paper": (95.4, 92.1), "key": "noise_only",
     "train": NO_FLIPS, "diffusion": {"lambda_latent": 0.0}, "synthetic": 100},
    {"row": "+ Traditional augmentation", "paper": (94.8, 90.7), "key": "traditional", "train": TRADITIONAL},
]
TABLE3 = [
    {"row": "None", "samples": 0, "paper": (93.7, 89.6), "model": "real"},
    {"row": "Traditional (rotation, flip)", "samples": "-", "paper": (94.8, 90.7), "model": "traditional"},
    {"row": "GAN-based", "samples": 100, "paper": (95.2, 91.8), "key": "gan100",
     "train": NO_FLIPS, "synthetic": 100, "backend": "gan"},
    {"row": "Text-guided (20)", "samples": 20, "paper": (94.1, 90.2), "key": "text20",
     "train": NO_FLIPS, "synthetic": 20},
    {"row": "Text-guided (50)", "samples": 50, "paper": (95.1, 91.5), "key": "text50",
     "train": NO_FLIPS, "synthetic": 50},
    {"row": "Text-guided (100)", "samples": 100, "paper": (96.0, 92.9), "model": "text100"},
    {"row": "Text-guided (200)", "samples": 200, "paper": (95.6, 92.1), "key": "text200",
     "train": NO_FLIPS, "synthetic": 200},
]


PAPER_TRAIN_FRAMES = 488  # the paper's training frames: its synthetic counts are for this many
TINY_GRID_STEPS = 30  # the tiny profile's steps per row: enough to run the grid, far too few to learn anything
SMOKE_STEPS = 500  # under this many steps per row, the grid checks the machinery; its numbers are not results


def synthetic_set_size(n_train: int, n: int | None = None) -> int:
    """How many synthetic samples notebook 02 makes: ``n``, else the paper's largest Table 3
    row (200 on 488 frames) scaled to ``n_train``, and at least 8 (enough for Fig. 2's grid)."""
    largest = max(r["synthetic"] for r in TABLE3 if r.get("synthetic"))
    return n or max(8, round(largest * n_train / PAPER_TRAIN_FRAMES))


def scaled_counts(n_train: int, available: int) -> dict[int, int]:
    """The paper's synthetic counts of Tables 2 and 3 -> ours (:func:`scaled_count`), ascending (notebook 06)."""
    paper = sorted({r["synthetic"] for r in TABLE2 + TABLE3 if r.get("synthetic")})
    return {count: scaled_count(count, n_train, available) for count in paper}


def grid_budget(base: Profile, steps: int | None = None, minutes: float | None = None) -> dict:
    """The budget every trained row of notebook 06 shares: :func:`row_budget` of ``steps`` and
    ``minutes``; for the tiny profile ``steps`` defaults to TINY_GRID_STEPS (a smoke test).
    Whatever is left None stays the profile's own."""
    if base.name == "tiny" and steps is None:
        steps = TINY_GRID_STEPS
    return row_budget(base, steps, minutes)


def budget_text(base: Profile, budget: dict) -> str:
    """The budget in words, e.g. "at most 30 steps or 1 min", as the profile with it trains (notebook 06)."""
    train = dataclasses.replace(base.train, **budget)
    if train.max_minutes is None:
        return f"at most {train.max_steps} steps (no time limit)"
    return f"at most {train.max_steps} steps or {train.max_minutes:g} min"


def is_smoke_budget(base: Profile, budget: dict) -> bool:
    """True if a row trains for fewer than SMOKE_STEPS steps: the grid's numbers mean nothing then (notebook 06)."""
    return dataclasses.replace(base.train, **budget).max_steps < SMOKE_STEPS


def row_budget(base: Profile, steps: int | None = None, minutes: float | None = None) -> dict:
    """TrainConfig fields that every row shares: a step and/or time budget (None: the profile's)."""
    budget: dict = {}
    if steps:
        budget |= {"max_steps": steps, "val_every": steps, "checkpoint_every": steps,
                   "lr_warmup_steps": min(base.train.lr_warmup_steps, steps)}
    if minutes:
        budget["max_minutes"] = minutes
    return budget


def row_profile(profile_name: str, row: dict, budget: dict | None = None) -> Profile:
    """The profile of one row: ``profile_name``'s, with the budget and the row's fields replaced."""
    profile = get_profile(profile_name)
    profile.train = dataclasses.replace(profile.train, **(budget or {}) | row.get("train", {}))
    profile.diffusion = dataclasses.replace(profile.diffusion, **row.get("diffusion", {}))
    return profile


def scaled_count(paper_count: int, n_train: int, available: int) -> int:
    """The paper's synthetic count on 488 real frames, scaled to ``n_train`` (and to what exists)."""
    return min(available, round(paper_count * n_train / PAPER_TRAIN_FRAMES))


def synthetic_subset(synthetic_dir, records: list[dict], k: int, dest) -> Path:
    """Copy the first k kept samples of a synthetic run into ``dest`` (a folder of its own).

    Sample i of a synthetic run depends only on the seed and i, so the first k samples of a
    run are exactly a k-sample run. The run's split.json (the frames it was made from) goes
    with them, so ``train --synthetic`` can still refuse samples made from held-out frames.
    """
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    for record in records[:k]:
        for kind in ("image", "mask"):
            (dest / record[kind]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(synthetic_dir) / record[kind], dest / record[kind])
    if (Path(synthetic_dir) / "split.json").exists():
        shutil.copy(Path(synthetic_dir) / "split.json", dest / "split.json")
    return dest


def run_grid(rows, profile_name: str, data, out, test, *, vae_dir, synthetic_dir=None, n_train: int,
             budget: dict | None = None, seed: int = 0, device: str = "cpu", log=print) -> tuple[dict, dict]:
    """Train every row that has a "key" into OUT/<key> and score every row on ``test``.

    The frozen autoencoder of ``vae_dir`` is copied into each run, so every row shares it.
    Returns (scores: row name -> metrics summary, added: key -> synthetic samples used).
    """
    from .pipeline import SynDiffPipeline, evaluate  # late: the tables above load without torch
    from .synthesis import read_manifest
    from .train import train

    out = Path(out)
    kept = [r for r in read_manifest(synthetic_dir) if r["kept"]] if synthetic_dir else []
    made_by = {r["backend"] for r in kept}
    scores, added = {}, {}
    for row in rows:
        if row.get("backend") and row.get("backend") not in made_by:
            continue  # a row of another backend's samples (the GAN row): these samples cannot stand in for them
        if "key" in row:
            run_dir = out / row["key"]
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(vae_dir, run_dir / "vae")
            k = added[row["key"]] = scaled_count(row.get("synthetic", 0), n_train, len(kept))
            extra = [synthetic_subset(synthetic_dir, kept, k, out / f"synthetic-{k}")] if k else []
            train(row_profile(profile_name, row, budget), data, run_dir, seed=seed, synthetic=extra,
                  log=lambda message: None)
        model = row.get("key") or row.get("model")
        if model is None or row["row"] in scores:
            continue
        pipe = SynDiffPipeline.from_pretrained(out / model, device=device)
        scores[row["row"]] = evaluate(pipe, test, row.get("steps", 1), seed=seed)[0]
        log(f"{row['row']:34s} Dice {scores[row['row']]['dice']:.3f}  IoU {scores[row['row']]['iou']:.3f}")
    return scores, added


def table_rows(table, scores: dict, added: dict | None = None) -> list[list]:
    """Rows for viz.table: the paper's Dice and IoU beside ours (in %; None where not run)."""
    def ours(row, metric):
        return 100 * scores[row["row"]][metric] if row["row"] in scores else None

    rows = []
    for row in table:
        ours_cells = [ours(row, "dice"), ours(row, "iou")]
        if "samples" in row:  # Table 3: how many synthetic samples, the paper's and ours
            ours_count = (added or {}).get(row.get("key") or row.get("model"), "-")
            rows.append([row["row"], row["samples"], ours_count, *row["paper"], *ours_cells])
        else:
            rows.append([row["row"], *row["paper"], *ours_cells])
    return rows


def inference_study(pipe, splits: dict, t_values=(50, 250, 500, 750, 999), ddim_steps=(10, 50),
                    seeds=(0, 1, 2), log=print) -> list[dict]:
    """The t_infer study: one model, many ways to query it, several noise seeds.

    ``splits`` maps a name ("val", "test") to samples. Each setting is one step at each t in
    ``t_values``, then DDIM with each count in ``ddim_steps``; each is scored once per seed of
    the inference noise. Returns one dict per setting with, per split, the mean and std over
    seeds of the mean Dice (and the mean IoU), e.g. {"steps": 1, "t_infer": 50,
    "val_dice": .., "val_dice_std": .., "test_dice": .., ...}.
    """
    import numpy as np

    from .pipeline import evaluate

    settings = [(1, t) for t in t_values] + [(n, None) for n in ddim_steps]
    rows = []
    for steps, t in settings:
        row = {"steps": steps, "t_infer": t if steps == 1 else "DDIM"}
        for name, samples in splits.items():
            runs = [evaluate(pipe, samples, steps, t, seed)[0] for seed in seeds]
            for metric in ("dice", "iou"):
                values = np.array([r[metric] for r in runs])
                row[f"{name}_{metric}"], row[f"{name}_{metric}_std"] = float(values.mean()), float(values.std())
        rows.append(row)
        log(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return rows


def best_single_step(study: list[dict], split: str = "val") -> dict:
    """The single-step row of :func:`inference_study` with the highest mean Dice on ``split``
    (notebook 05). Choose on validation, never on test: the test score of the chosen row is
    then an honest estimate."""
    single = [row for row in study if row["steps"] == 1]
    if not single:
        raise ValueError("study: no single-step row (inference_study's t_values was empty)")
    return max(single, key=lambda row: row[f"{split}_dice"])


def study_table_rows(study: list[dict]) -> list[list[str]]:
    """Rows for viz.table from :func:`inference_study`: the setting, then val Dice, test Dice
    and test IoU as "mean ± std" over the noise seeds (notebook 05)."""
    def spread(row, key):
        return f"{row[key]:.3f} ± {row[key + '_std']:.3f}"

    return [[f"1 step, t = {r['t_infer']}" if r["steps"] == 1 else f"DDIM, {r['steps']} steps",
             spread(r, "val_dice"), spread(r, "test_dice"), spread(r, "test_iou")] for r in study]
