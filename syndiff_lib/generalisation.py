"""Generalisation: train on one polyp data set, score on another.

A model that segments CVC-ClinicDB's frames well may only have learned ClinicDB's
endoscope, light and colours; frames of Kvasir-SEG, taken with other equipment, tell
whether it learned polyps. The experiments are data (:data:`EXPERIMENTS`),
one row per trained model:

    key          the cell's folder name
    row          a readable name
    experiment   1, 2 or 3 (:data:`TITLES`)
    variant      what the row adds ("plain", "copy-paste", "photometric"); rows of one
                 experiment and variant are the SynDiff / baseline pairs of the report
    data         the training data sets, as folder names under the data root; each keeps its
                 own split (data.build_split): ClinicDB PraNet's, Kvasir-SEG its authors'
    model_kind   "syndiff" (default) or "baseline"
    train        TrainConfig fields the row changes, e.g. {"photometric_augment": True}
    synthetic    the paper's count of copy-paste frames (on 488 real frames), scaled to the
                 run's training frames and made from those frames only (experiments.synthetic_folder)
    tests        the sets it is scored on, each (data set, part)
    selection    the set that chooses between variants, or None

A part of a data set is "test" (its split's test frames: ClinicDB's PraNet 62, Kvasir-SEG's
120 of val.txt), "train+val" (every other frame: Kvasir-SEG's 880 of train.txt) or "all".

Choosing between variants on a test set would make its score optimistic, so the choice is
made on a selection set that holds no test frame of its data set (checked): for ClinicDB ->
Kvasir-SEG that is Kvasir-SEG's 880 train.txt frames, and the chosen variant's clean
cross-domain score is then Kvasir-SEG's 120 test frames. Its "all" (1000 frames) is
reported beside, for comparison with papers that score every frame, and holds the selection
frames. A set that shares a frame with the run's training or validation frames is refused
before anything trains: the leak check. ClinicDB's PraNet test frames share video sequences
with its training frames (data.make_split), so an in-domain ClinicDB score, and the drop from
it to another data set, are on the generous side.

A cell is one (row, seed), run as an experiment grid's cell is (experiments.py: the same
locks, the same resume, fp32, steps and no wall clock):

    1. OUT/runs/<key>/seed<s>/: train.train on the row's data sets, the cpu profile's own
       step counts (SynDiff max_steps, the baseline baseline_steps) unless given a budget;
    2. scored on every test set and the selection set, at each frame's own resolution;
    3. OUT/cells/<key>/seed<s>/: per_image.<data set>.<part>.jsonl per set and cell.json
       (row, data set names, code commit, hardware, steps, seconds per step, metrics per
       set), written last: the cell is done once cell.json exists.

    syndiff generalise run --data-root ../shared/data --out results/generalisation
    syndiff generalise status --out results/generalisation
    syndiff generalise report --out results/generalisation
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import ablations
from . import data as data_lib
from . import experiments
from .config import get_profile

CLINICDB, KVASIR = "cvc-clinicdb", "kvasir-seg"  # the folder names under the data root
PARTS = ("test", "train+val", "all")
SEEDS = (0,)
SPLIT_SEED = experiments.SPLIT_SEED  # the data sets' own splits; only the validation carve depends on it

# --- the experiments, as data ------------------------------------------------------------------
TITLES = {
    1: "CVC-ClinicDB (PraNet train) -> Kvasir-SEG",
    2: "Kvasir-SEG (880 train.txt) -> CVC-ClinicDB",
    3: "PraNet protocol: Kvasir-SEG 880 + CVC-ClinicDB 550 -> Kvasir-SEG 120, CVC-ClinicDB 62",
}
CLINICDB_TO_KVASIR = {"experiment": 1, "data": [CLINICDB], "variant": "plain",
                      "tests": [(KVASIR, "test"), (KVASIR, "all"), (CLINICDB, "test")],
                      "selection": (KVASIR, "train+val")}
KVASIR_TO_CLINICDB = {"experiment": 2, "data": [KVASIR], "variant": "plain",
                      "tests": [(CLINICDB, "test"), (CLINICDB, "all"), (KVASIR, "test")],
                      "selection": (CLINICDB, "train+val")}
# Trained on both, every test frame is in-domain: variants would be chosen on validation.
BOTH = {"experiment": 3, "data": [KVASIR, CLINICDB], "variant": "plain",
        "tests": [(KVASIR, "test"), (CLINICDB, "test")], "selection": None}
PHOTOMETRIC = {"photometric_augment": True}
EXPERIMENTS = [
    CLINICDB_TO_KVASIR | {"key": "c2k-syndiff", "row": "SynDiff"},
    CLINICDB_TO_KVASIR | {"key": "c2k-baseline", "row": "Pixel U-Net", "model_kind": "baseline"},
    CLINICDB_TO_KVASIR | {"key": "c2k-syndiff-copypaste", "row": "SynDiff + 100 copy-paste synthetic",
                          "variant": "copy-paste", "synthetic": 100},
    CLINICDB_TO_KVASIR | {"key": "c2k-syndiff-photometric", "row": "SynDiff + photometric augmentation",
                          "variant": "photometric", "train": PHOTOMETRIC},
    CLINICDB_TO_KVASIR | {"key": "c2k-baseline-photometric", "row": "Pixel U-Net + photometric augmentation",
                          "variant": "photometric", "model_kind": "baseline", "train": PHOTOMETRIC},
    KVASIR_TO_CLINICDB | {"key": "k2c-syndiff", "row": "SynDiff"},
    KVASIR_TO_CLINICDB | {"key": "k2c-baseline", "row": "Pixel U-Net", "model_kind": "baseline"},
    BOTH | {"key": "pranet-syndiff", "row": "SynDiff"},
    BOTH | {"key": "pranet-baseline", "row": "Pixel U-Net", "model_kind": "baseline"},
]
# Beside experiment 3, mean Dice as published (not rerun here, and not comparable like for like).
REPORTED = [
    {"row": "PraNet (Fan et al., MICCAI 2020)", "backbone": "Res2Net-50",
     "dice": {f"{KVASIR}:test": 0.898, f"{CLINICDB}:test": 0.899}},
    {"row": "Polyp-PVT (Dong et al., 2023)", "backbone": "PVTv2-B2",
     "dice": {f"{KVASIR}:test": 0.917, f"{CLINICDB}:test": 0.937}},
]
REPORTED_NOTE = ("reported, not rerun: 352x352 inputs, ImageNet-pretrained backbones, trained on PraNet's 900 "
                 "Kvasir-SEG + 550 CVC-ClinicDB frames; PraNet's Kvasir-SEG test set is 100 frames, not the "
                 "authors' 120 scored here")


def model_kind(row: dict) -> str:
    return row.get("model_kind", "syndiff")


def label(test: tuple[str, str]) -> str:
    """A test set's name in records and reports: "kvasir-seg:test"."""
    return f"{test[0]}:{test[1]}"


def scored_sets(row: dict) -> list[tuple[str, str]]:
    """The sets a row is scored on: its tests, then its selection set."""
    return [*map(tuple, row["tests"]), *([tuple(row["selection"])] if row.get("selection") else [])]


def role(row: dict, test: tuple[str, str]) -> str:
    """"selection", "in-domain" (a data set the row trains on) or "cross-domain"."""
    if row.get("selection") and tuple(row["selection"]) == tuple(test):
        return "selection"
    return "in-domain" if test[0] in row["data"] else "cross-domain"


def select_rows(keys=None, rows=None) -> list[dict]:
    """The rows named by ``keys`` (all when None) of ``rows`` (default EXPERIMENTS), checked."""
    rows = EXPERIMENTS if rows is None else rows
    known = [row["key"] for row in rows]
    if len(set(known)) != len(known):
        raise ValueError(f"two rows share a key: {sorted(k for k in known if known.count(k) > 1)}")
    unknown = [k for k in keys or () if k not in known]
    if unknown:
        raise ValueError(f"unknown experiment row(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    for row in rows:
        if model_kind(row) not in ("syndiff", "baseline"):
            raise ValueError(f"{row['key']}: model_kind must be 'syndiff' or 'baseline', got {row['model_kind']!r}")
        if row.get("selection") and tuple(row["selection"]) in map(tuple, row["tests"]):
            raise ValueError(f"{row['key']}: {label(row['selection'])} is a test set; it cannot also choose the variant")
        bad = [label(t) for t in scored_sets(row) if t[1] not in PARTS]
        if bad:
            raise ValueError(f"{row['key']}: unknown part in {', '.join(bad)}; a part is one of {', '.join(PARTS)}")
    return [row for row in rows if keys is None or row["key"] in keys]


# --- test sets and the leak check ----------------------------------------------------------------
def part_ids(data_root, name: str, part: str) -> list[str]:
    """The ids of one part of data set ``name``, from its own split (data.build_split)."""
    folder = Path(data_root) / name
    split = data_lib.build_split(folder, seed=SPLIT_SEED)
    ids = {"test": split["test"], "train+val": split["train"] + split["val"], "all": data_lib.dataset_ids(folder)}[part]
    return sorted(ids, key=data_lib.natural_key)


def trained_part(split: dict, name: str) -> dict | None:
    """A run's split of data set ``name`` (its own ids, unprefixed), or None if the run has
    none of its frames. Matched by folder name, so a data root moved since still matches."""
    if "parts" in split:
        return next((part for part in split["parts"] if part["name"] == name), None)
    return split if data_lib.dataset_name(split["data"]) == name else None


def check_sets(row: dict, data_root) -> dict[str, list[str]]:
    """{label: ids} of every set a row is scored on, after the leak check: a ValueError for a
    set holding a frame the run trains or validates on, and for a selection set holding a
    test frame of its data set. Needs no training: the run's split is build_split's."""
    missing = [n for n in {*row["data"], *(t[0] for t in scored_sets(row))} if not (Path(data_root) / n).is_dir()]
    if missing:
        raise ValueError(f"{row['key']}: no data set folder {', '.join(sorted(missing))} in {data_root}")
    split = data_lib.build_split([Path(data_root) / n for n in row["data"]], seed=SPLIT_SEED)
    sets = {}
    for test in scored_sets(row):
        ids = part_ids(data_root, *test)
        seen = trained_part(split, test[0])
        leaked = sorted(set(ids) & set(seen["train"] + seen["val"]), key=data_lib.natural_key) if seen else []
        if leaked:
            raise ValueError(f"{row['key']}: {label(test)} holds {len(leaked)} frames the run trains or validates on "
                             f"(e.g. {', '.join(leaked[:3])}); score it on {test[0]}:test instead")
        if role(row, test) == "selection" and (tested := set(ids) & set(part_ids(data_root, test[0], "test"))):
            raise ValueError(f"{row['key']}: the selection set {label(test)} holds {len(tested)} test frames of "
                             f"{test[0]}; choose on {test[0]}:train+val")
        sets[label(test)] = ids
    return sets


# --- one cell -------------------------------------------------------------------------------------
def cell_folder(out, row: dict, seed: int) -> Path:
    return Path(out) / "cells" / row["key"] / f"seed{seed}"


def run_folder(out, row: dict, seed: int) -> Path:
    return Path(out) / "runs" / row["key"] / f"seed{seed}"


def default_budget(profile: str) -> experiments.GridBudget:
    """The profile's own step counts: they define its models (config.py)."""
    train = get_profile(profile).train
    return experiments.GridBudget(syndiff_steps=train.max_steps, baseline_steps=train.baseline_steps,
                                  val_every=train.val_every, checkpoint_every=train.checkpoint_every)


def run_cell(row: dict, seed: int, data_root, out, sets: dict[str, list[str]], profile: str = "cpu",
             budget: experiments.GridBudget | None = None, log=print) -> dict | None:
    """Train (or resume) and score one cell; returns its cell.json, or None if another process
    holds it. ``sets`` is :func:`check_sets`' answer for the row."""
    from .checkpoint import find_checkpoint
    from .metrics import per_image_rows
    from .pipeline import evaluate, load_pipeline
    from .train import finished_run, train

    folder, run_dir = cell_folder(out, row, seed), run_folder(out, row, seed)
    if (folder / "cell.json").exists():
        return json.loads((folder / "cell.json").read_text())
    if not experiments.take_cell(folder):
        return None
    try:
        start = time.time()
        name = f"{row['key']}/seed{seed}"
        # The grid's cell profile: fp32 unless the row says otherwise, steps and never the clock.
        cfg = experiments.cell_profile({"profile": profile}, row, budget or default_budget(profile))
        data = [Path(data_root) / n for n in row["data"]]
        split = data_lib.build_split(data, seed=SPLIT_SEED)

        # 1. Train, resume, or reuse a finished run (a cell killed while scoring).
        results = finished_run(run_dir, split, cfg.to_dict())
        if results is None:
            count = ablations.scaled_count(row["synthetic"], len(split["train"]), 10**6) if row.get("synthetic") else 0
            synthetic = [experiments.synthetic_folder(out, data, None, seed, count)] if count else []
            resume = find_checkpoint(run_dir) is not None
            if run_dir.exists() and not resume:  # killed before its first checkpoint: start it again
                shutil.rmtree(run_dir)
            model = model_kind(row)
            log(f"{name}: {'resuming' if resume else 'training'} "
                f"({cfg.train.baseline_steps if model == 'baseline' else cfg.train.max_steps} steps)")
            results = train(cfg, data, run_dir, model=model, seed=seed, split_seed=SPLIT_SEED, synthetic=synthetic,
                            resume=resume, log=lambda message: None)

        # 2. Score every set at its frames' own resolution.
        pipe, metrics = load_pipeline(run_dir), {}
        for test in scored_sets(row):
            samples = data_lib.load_dataset(Path(data_root) / test[0], ids=sets[label(test)])
            summary, per_image = evaluate(pipe, samples, seed=seed)
            lines = "".join(json.dumps(r) + "\n" for r in per_image_rows(per_image))
            (folder / f"per_image.{test[0]}.{test[1]}.jsonl").write_text(lines)
            metrics[label(test)] = summary | {"role": role(row, test)}
            log(f"{name}: Dice {summary['dice']:.3f} on {summary['n']} frames of {label(test)} ({role(row, test)})")

        # 3. The record, written last.
        record = {
            "experiment": row["experiment"], "row": row["row"], "key": row["key"], "variant": row["variant"],
            "seed": seed, "split_seed": SPLIT_SEED, "data": list(row["data"]), "model": results["model"],
            "profile": results["profile"], "recipe": results["recipe"], "overrides": results["overrides"],
            "synthetic": [{"n": s["n"], "folder": os.path.relpath(s["folder"], out)} for s in results["synthetic"]],
            "split": results["split"], "steps": results["steps"], "train_seconds": results["train_seconds"],
            "seconds_per_step": results["seconds_per_step"], "best_step": results["best_step"],
            "val_dice": results["val_dice"], "code": results["code"], "hardware": results["hardware"],
            "cell_wall_seconds": round(time.time() - start, 1), "metrics": metrics, "config": results["config"],
        }
        (folder / "cell.json.tmp").write_text(json.dumps(record, indent=1))
        os.replace(folder / "cell.json.tmp", folder / "cell.json")  # the cell is done from here on
        return record
    finally:
        experiments.release_cell(folder)


def run_all(data_root, out, keys=None, profile: str | None = None, log=print, *, seeds=SEEDS,
            budget: experiments.GridBudget | None = None, rows=None) -> dict:
    """Run every cell of the rows ``keys`` (all when None) that is not done and not held by
    another process; every row's sets pass the leak check before anything trains. Returns status()."""
    rows, profile = select_rows(keys, rows), profile or "cpu"
    sets = {row["key"]: check_sets(row, data_root) for row in rows}
    for row in rows:
        for seed in seeds:
            run_cell(row, seed, data_root, out, sets[row["key"]], profile, budget, log)
    return status(out, keys, seeds=seeds, rows=rows)


# --- status and report ----------------------------------------------------------------------------
def status(out, keys=None, *, seeds=SEEDS, rows=None) -> dict:
    """Done / running / left cells, and the median time of a done one."""
    done, running, left, seconds = [], [], [], []
    for row in select_rows(keys, rows):
        for seed in seeds:
            folder, name = cell_folder(out, row, seed), f"{row['key']}/seed{seed}"
            if (folder / "cell.json").exists():
                done.append(name)
                seconds.append(json.loads((folder / "cell.json").read_text())["cell_wall_seconds"])
            elif (folder / "lock").exists():
                running.append(name)
            else:
                left.append(name)
    return {"done": len(done), "running": running, "left": len(left), "cells": len(done) + len(running) + len(left),
            "median_cell_seconds": float(np.median(seconds)) if seconds else None}


def load_cells(out, row: dict, seeds) -> list[dict]:
    """A row's finished cell.json records, each with "per_image": {label: [rows]}."""
    records = []
    for seed in seeds:
        folder = cell_folder(out, row, seed)
        if (folder / "cell.json").exists():
            record = json.loads((folder / "cell.json").read_text())
            record["per_image"] = {label((n, p)): [json.loads(line) for line in
                                                   (folder / f"per_image.{n}.{p}.jsonl").read_text().splitlines()]
                                   for n, p in scored_sets(row)}
            records.append(record)
    return records


def per_image(records: list[dict], test: str, metric: str) -> dict[str, float]:
    """{frame id: ``metric`` on set ``test``, averaged over the records' seeds}."""
    values: dict[str, list[float]] = {}
    for record in records:
        for line in record["per_image"][test]:
            values.setdefault(line["id"], []).append(line[metric])
    return {i: float(np.mean(v)) for i, v in values.items()}


def mean_dice(records: list[dict], test: str) -> float:
    return float(np.mean(list(per_image(records, test, "dice").values())))


def paired(ours: dict[str, float], theirs: dict[str, float]) -> dict:
    """The mean paired difference and its 95 % bootstrap interval, resampling ClinicDB's video
    sequences whole (their frames are near-duplicates) and Kvasir-SEG's frames one by one."""
    ids = sorted(set(ours) & set(theirs), key=data_lib.natural_key)
    diff = np.array([ours[i] - theirs[i] for i in ids])  # [N]
    groups = np.array([str(data_lib.clinicdb_sequence(i)) if data_lib.clinicdb_frame(i) else i for i in ids])  # [N]
    mean, low, high = experiments.paired_bootstrap(diff, groups)
    return {"diff": mean, "diff_low": low, "diff_high": high, "n_paired": len(ids), "n_groups": len(set(groups)),
            "verdict": "better" if low > 0 else "worse" if high < 0 else "no detectable difference"}


def pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(a, b) pairs of one experiment's rows compared in the report: SynDiff against the
    baseline of the same variant, and each variant against the plain row of its model."""
    across = [(a, b) for a in rows for b in rows
              if model_kind(a) == "syndiff" and model_kind(b) == "baseline" and a["variant"] == b["variant"]]
    within = [(a, b) for a in rows for b in rows
              if model_kind(a) == model_kind(b) and a["variant"] != "plain" and b["variant"] == "plain"]
    return across + within


def report(out, keys=None, *, seeds=SEEDS, rows=None, metric: str = "dice") -> list[dict]:
    """Lines per experiment and set: "score" (each row's mean ± std over frames of each
    metric, seeds averaged first, and for a cross-domain set the drop from the row's
    in-domain test set, else from its validation Dice), "pair" (the paired difference in
    ``metric`` with a 95 % bootstrap interval, for rows with every seed done), "choice" (the
    variant the selection set picks for each model) and, beside experiment 3, "reported"."""
    from .metrics import METRIC_NAMES

    rows, lines = select_rows(keys, rows), []
    cells = {row["key"]: load_cells(out, row, seeds) for row in rows}
    for experiment in dict.fromkeys(row["experiment"] for row in rows):
        members = [row for row in rows if row["experiment"] == experiment]
        head = {"experiment": experiment, "title": TITLES.get(experiment, str(experiment))}
        for test in dict.fromkeys(t for row in members for t in scored_sets(row)):
            scored = [row for row in members if test in scored_sets(row)]
            for row in scored:
                records = cells[row["key"]]
                line = head | {"kind": "score", "test": label(test), "role": role(row, test), "key": row["key"],
                               "row": row["row"], "variant": row["variant"], "cells": len(records), "of": len(seeds)}
                for m in METRIC_NAMES if records else ():
                    values = np.array(list(per_image(records, label(test), m).values()))  # [N]
                    line |= {m: float(values.mean()), f"{m}_std": float(values.std()), "n": len(values)}
                if records and line["role"] == "cross-domain":
                    home = next((tuple(t) for t in row["tests"] if role(row, t) == "in-domain"), None)
                    line["in_domain"] = label(home) if home else "validation"
                    line["in_domain_dice"] = (mean_dice(records, label(home)) if home
                                              else float(np.mean([r["val_dice"] for r in records])))
                    line["drop"] = line["in_domain_dice"] - line["dice"]
                lines.append(line)
            for a, b in pairs(scored):
                if len(cells[a["key"]]) == len(cells[b["key"]]) == len(seeds):
                    ours, theirs = (per_image(cells[r["key"]], label(test), metric) for r in (a, b))
                    lines.append(head | {"kind": "pair", "test": label(test), "key": a["key"], "against": b["key"],
                                         "metric": metric, **paired(ours, theirs)})
        lines += choices(members, cells, head)
        if experiment == 3:
            lines += [head | {"kind": "reported", "row": r["row"], "backbone": r["backbone"], "dice": r["dice"],
                              "note": REPORTED_NOTE} for r in REPORTED]
    return lines


def choices(members: list[dict], cells: dict, head: dict) -> list[dict]:
    """For each model with several variants in an experiment, all scored: the variant with the
    best mean Dice on the selection set, and its Dice on the cross-domain test frames."""
    lines = []
    for kind in ("syndiff", "baseline"):
        rows = [row for row in members if model_kind(row) == kind]
        if len(rows) < 2 or not rows[0].get("selection") or not all(cells[row["key"]] for row in rows):
            continue  # one variant, no selection set, or not every variant scored yet
        by = label(rows[0]["selection"])
        score = {row["key"]: mean_dice(cells[row["key"]], by) for row in rows}
        best = max(rows, key=lambda row: score[row["key"]])
        line = head | {"kind": "choice", "model": kind, "by": by, "selection_dice": score, "chosen": best["key"]}
        target = next((label(t) for t in best["tests"] if role(best, t) == "cross-domain" and t[1] == "test"), None)
        if target:
            line |= {"test": target, "dice": mean_dice(cells[best["key"]], target)}
        lines.append(line)
    return lines
