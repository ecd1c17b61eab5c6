"""Generalisation: train on one polyp data set, score on another.

A model that segments CVC-ClinicDB's frames well may only have learned ClinicDB's
endoscope, light and colours; frames of Kvasir-SEG, taken with other equipment, tell
whether it learned polyps. The experiments are data (:data:`EXPERIMENTS`),
one row per trained model:

    key          the cell's folder name
    row          a readable name
    experiment   1, 2 or 3 (:data:`TITLES`)
    variant      what the row adds ("plain", "copy-paste", "photometric", "photometric + letterbox",
                 "photometric + copy-paste", "photometric + zoom");
                 rows of one experiment and variant are the SynDiff / baseline pairs of the report,
                 and every other variant is compared with its model's plain row, or with the row
                 named by ``builds_on``. A variant may be SynDiff's alone (copy-paste and the
                 photometric rows that build on SynDiff's): it then has no baseline pair
    builds_on    the key of the row a variant adds to (default: its model's plain row)
    data         the training data sets, as folder names under the data root; each keeps its
                 own split (data.build_split): ClinicDB PraNet's, Kvasir-SEG its authors'
    model_kind   "syndiff" (default) or "baseline"
    train        TrainConfig fields the row changes, e.g. {"photometric_augment": True}, or
                 {"fit": "letterbox"}: trained on letterboxed frames (data.letterbox), so that
                 training and test inputs agree where a stretch would squeeze Kvasir-SEG's frames.
                 Photometric augmentation is off unless a row turns it on (experiments.cell_profile)
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
    2. scored on every test set and the selection set, at each frame's own resolution, each
       frame made square by the fit the model was trained with; a frame in several sets
       (Kvasir-SEG's "all" holds its "test" and "train+val") is scored once;
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
from .checkpoint import lock_is_held
from .config import FITS, get_profile

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
PHOTOMETRIC = {"photometric_augment": True}
CLINICDB_TO_KVASIR = {"experiment": 1, "data": [CLINICDB], "variant": "plain",
                      "tests": [(KVASIR, "test"), (KVASIR, "all"), (CLINICDB, "test")],
                      "selection": (KVASIR, "train+val")}
# Experiments 2 and 3 train as the cpu profile does, with the augmentation experiment 1 chose.
KVASIR_TO_CLINICDB = {"experiment": 2, "data": [KVASIR], "variant": "photometric", "train": PHOTOMETRIC,
                      "tests": [(CLINICDB, "test"), (CLINICDB, "all"), (KVASIR, "test")],
                      "selection": (CLINICDB, "train+val")}
# Trained on both, every test frame is in-domain: variants would be chosen on validation.
BOTH = {"experiment": 3, "data": [KVASIR, CLINICDB], "variant": "photometric", "train": PHOTOMETRIC,
        "tests": [(KVASIR, "test"), (CLINICDB, "test")], "selection": None}
# scripts/run_generalisation.sh runs the rows in this order, each once.
EXPERIMENTS = [
    CLINICDB_TO_KVASIR | {"key": "c2k-syndiff", "row": "SynDiff"},
    CLINICDB_TO_KVASIR | {"key": "c2k-baseline", "row": "Pixel U-Net", "model_kind": "baseline"},
    CLINICDB_TO_KVASIR | {"key": "c2k-syndiff-photometric", "row": "SynDiff + photometric augmentation",
                          "variant": "photometric", "train": PHOTOMETRIC},
    CLINICDB_TO_KVASIR | {"key": "c2k-baseline-photometric", "row": "Pixel U-Net + photometric augmentation",
                          "variant": "photometric", "model_kind": "baseline", "train": PHOTOMETRIC},
    # Aspect-preserving inputs on top of the augmentation that helped: does the rest of the
    # shift lie in the frames' shapes?
    CLINICDB_TO_KVASIR | {"key": "c2k-syndiff-photometric-letterbox",
                          "row": "SynDiff + photometric augmentation, letterboxed frames",
                          "variant": "photometric + letterbox", "builds_on": "c2k-syndiff-photometric",
                          "train": PHOTOMETRIC | {"fit": "letterbox"}},
    # The paper's robustness claim for synthetic data, on the plain recipe: against c2k-syndiff.
    CLINICDB_TO_KVASIR | {"key": "c2k-syndiff-copypaste", "row": "SynDiff + 100 copy-paste synthetic",
                          "variant": "copy-paste", "synthetic": 100},
    # The two that helped, together: does copy-paste add to photometric augmentation?
    CLINICDB_TO_KVASIR | {"key": "c2k-syndiff-photometric-copypaste",
                          "row": "SynDiff + photometric augmentation + 100 copy-paste synthetic",
                          "variant": "photometric + copy-paste", "builds_on": "c2k-syndiff-photometric",
                          "train": PHOTOMETRIC, "synthetic": 100},
    # Kvasir-SEG's polyps fill more of the frame than ClinicDB's: does a random zoom in training
    # (augment.random_zooms) carry the model across polyp sizes?
    CLINICDB_TO_KVASIR | {"key": "c2k-syndiff-photometric-zoom",
                          "row": "SynDiff + photometric augmentation + random zoom",
                          "variant": "photometric + zoom", "builds_on": "c2k-syndiff-photometric",
                          "train": PHOTOMETRIC | {"zoom_augment": True}},
    KVASIR_TO_CLINICDB | {"key": "k2c-syndiff", "row": "SynDiff + photometric augmentation"},
    KVASIR_TO_CLINICDB | {"key": "k2c-baseline", "row": "Pixel U-Net + photometric augmentation",
                          "model_kind": "baseline"},
    BOTH | {"key": "pranet-syndiff", "row": "SynDiff + photometric augmentation"},
    BOTH | {"key": "pranet-baseline", "row": "Pixel U-Net + photometric augmentation", "model_kind": "baseline"},
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
        base = row.get("builds_on")
        if base and base not in [r["key"] for r in rows if r["experiment"] == row["experiment"]]:
            raise ValueError(f"{row['key']}: builds_on {base!r} is no row of experiment {row['experiment']}")
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
def frames_to_score(row: dict, sets: dict[str, list[str]]) -> dict[str, list[str]]:
    """{data set: ids}: every frame of a row's scored sets (``sets``, from check_sets), once."""
    frames = {}
    for test in scored_sets(row):
        frames.setdefault(test[0], set()).update(sets[label(test)])
    return {name: sorted(ids, key=data_lib.natural_key) for name, ids in frames.items()}


def restrict(summary: dict, per_image: dict, ids: list[str]) -> tuple[dict, dict]:
    """pipeline.evaluate's (summary, per_image) over the frames ``ids`` only, in that order:
    the metrics summarized again, the settings it scored with (seed, fit, ...) kept."""
    from .metrics import METRIC_NAMES, summarize

    position = {i: k for k, i in enumerate(per_image["id"])}
    at = [position[i] for i in ids]
    rows = {k: v[at] for k, v in per_image.items()}
    settings = {k: v for k, v in summary.items()
                if not (k == "n" or k.startswith("n_") or k.removesuffix("_std") in METRIC_NAMES)}
    return settings | summarize({k: v for k, v in rows.items() if k != "id"}), rows


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
    from .pipeline import load_pipeline
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
            log(f"{name}: {'resuming' if resume else 'training'} ({cfg.train.steps(model)} steps)")
            results = train(cfg, data, run_dir, model=model, seed=seed, split_seed=SPLIT_SEED, synthetic=synthetic,
                            resume=resume, log=lambda message: None)

        # 2. Score each data set's frames once, then give every set its frames' rows.
        pipe, metrics = load_pipeline(run_dir), {}
        scored = {name: score_frames(pipe, Path(data_root) / name, ids, seed=seed)
                  for name, ids in frames_to_score(row, sets).items()}
        for test in scored_sets(row):
            summary, per_image = restrict(*scored[test[0]], sets[label(test)])
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
            elif lock_is_held(folder / "lock"):  # a killed cell's lock is left: it resumes
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


def builds_on(row: dict, b: dict) -> bool:
    """Whether row ``b`` is what variant ``row`` adds to: the row its ``builds_on`` names, else
    its model's plain row."""
    if row["variant"] == "plain" or row is b:
        return False
    if row.get("builds_on"):
        return b["key"] == row["builds_on"]
    return model_kind(row) == model_kind(b) and b["variant"] == "plain"


def pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(a, b) pairs of one experiment's rows compared in the report: SynDiff against the
    baseline of the same variant, and each variant against the row it builds on."""
    across = [(a, b) for a in rows for b in rows
              if model_kind(a) == "syndiff" and model_kind(b) == "baseline" and a["variant"] == b["variant"]]
    within = [(a, b) for a in rows for b in rows if builds_on(a, b)]
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
    """For each model with several variants in an experiment, all scored: the variant the
    selection set keeps, and its Dice on the cross-domain test sets.

    A change is kept only where it helps: from the model's plain row, step to a variant that
    builds on the current row if it is *detectably* better on the selection set (its paired
    interval lies above 0; of several, the one with the best mean Dice), and repeat from there.
    A tie keeps the simpler row, so a variant that wins by a fraction of a point within the
    noise does not become the recipe."""
    lines = []
    for kind in ("syndiff", "baseline"):
        rows = [row for row in members if model_kind(row) == kind]
        if len(rows) < 2 or not rows[0].get("selection") or not all(cells[row["key"]] for row in rows):
            continue  # one variant, no selection set, or not every variant scored yet
        by = label(rows[0]["selection"])
        dice = {row["key"]: per_image(cells[row["key"]], by, "dice") for row in rows}
        score = {key: float(np.mean(list(values.values()))) for key, values in dice.items()}
        best = max((row for row in rows if not any(builds_on(row, b) for b in rows)), key=lambda r: score[r["key"]])
        path = [best["key"]]
        while better := [row for row in rows if builds_on(row, best)
                         and paired(dice[row["key"]], dice[best["key"]])["verdict"] == "better"]:
            best = max(better, key=lambda row: score[row["key"]])
            path.append(best["key"])
        line = head | {"kind": "choice", "model": kind, "by": by, "selection_dice": score, "chosen": best["key"],
                       "path": path}
        cross = [label(t) for t in best["tests"] if role(best, t) == "cross-domain"]
        line["cross_dice"] = {test: mean_dice(cells[best["key"]], test) for test in cross}
        target = next((test for test in cross if test.endswith(":test")), None)
        if target:
            line |= {"test": target, "dice": line["cross_dice"][target]}
        lines.append(line)
    return lines


# --- notebook 08: tables of the report, frames to look at, a simulated shift -----------------------
# Report lines hold fractions (Dice, IoU, NSD) and pixels (HD95); the tables show Dice, IoU and NSD
# in %, as notebook 06 does. A row whose cells are missing is shown as NOT_YET, never guessed.
NOT_YET = "not yet run"
SET_NAMES = {CLINICDB: "ClinicDB", KVASIR: "Kvasir-SEG"}  # short names for the tables
MODEL_NAMES = {"syndiff": "SynDiff", "baseline": "Pixel U-Net"}
REPORTED_INPUTS = "352x352 px, ImageNet-pretrained"  # what REPORTED's methods were trained with (REPORTED_NOTE)
DEFAULT_CROSS_FRAMES = {"tiny": 36}  # frames of the other data set notebook 08 scores; other profiles: all
PLAN_COLUMNS = ["row", "model", "variant", "trained on", "tested on", "variant chosen on"]
SCORE_COLUMNS = ["test set", "row", "Dice %", "IoU %", "HD95 px", "NSD %", "drop (Dice points)"]
PAIR_COLUMNS = ["test set", "comparison", "\u0394 Dice points [95 % CI]", "resampled", "verdict"]
CHOICE_COLUMNS = ["row", "Dice % on the selection set", "\u0394 against the row it builds on [95 % CI]", "choice",
                  "its Dice % on the test set"]
PROTOCOL_COLUMNS = ["method", "inputs", "Kvasir-SEG test Dice %", "ClinicDB test Dice %", "status"]


def set_name(test: str) -> str:
    """A set's label ("kvasir-seg:test") in words for a table: "Kvasir-SEG test"."""
    name, part = test.split(":")
    return f"{SET_NAMES.get(name, name)} {part}"


def short_key(text: str) -> str:
    """A row key or set label as part of a glue key: "c2k-syndiff" -> "c2k_syndiff",
    "kvasir-seg:test" -> "kvasir_test", "cvc-clinicdb:train+val" -> "clinicdb_trainval"."""
    for long, short in ((f"{KVASIR}:", "kvasir_"), (f"{CLINICDB}:", "clinicdb_")):
        text = text.replace(long, short)
    return text.replace("-", "_").replace("+", "").replace(":", "_")


def tests_text(tests) -> str:
    """A row's test sets in words, grouped by data set: "Kvasir-SEG test + all; ClinicDB test"."""
    parts: dict[str, list[str]] = {}
    for name, part in tests:
        parts.setdefault(name, []).append(part)
    return "; ".join(f"{SET_NAMES.get(name, name)} {' + '.join(p)}" for name, p in parts.items())


def plan_rows(rows=None) -> list[list[str]]:
    """One line per row of the experiments (PLAN_COLUMNS): what it trains on, is tested on and
    chooses its variant on; the table of notebook 08 that says what every cell is."""
    out = []
    for row in select_rows(rows=rows):
        trained_on = " + ".join(SET_NAMES.get(n, n) for n in row["data"])
        chosen_on = set_name(label(row["selection"])) if row.get("selection") else "-"
        out.append([row["key"], MODEL_NAMES[model_kind(row)], row["variant"], trained_on, tests_text(row["tests"]),
                    chosen_on])
    return out


def experiment_status(out, *, seeds=SEEDS, rows=None) -> dict[int, dict]:
    """:func:`status` of each experiment's rows, {experiment: status}, in TITLES' order."""
    rows = select_rows(rows=rows)
    return {e: status(out, [r["key"] for r in rows if r["experiment"] == e], seeds=seeds, rows=rows)
            for e in dict.fromkeys(row["experiment"] for row in rows)}


def mean_std(line: dict, metric: str) -> str:
    """ "mean ± std" over frames of a score line's metric (in %; HD95 in px), or NOT_YET."""
    if metric not in line:
        return NOT_YET
    scale = 1.0 if metric == "hd95" else 100.0
    return f"{scale * line[metric]:.1f} \u00b1 {scale * line[f'{metric}_std']:.1f}"


def drop_text(line: dict) -> str:
    """A score line's drop from in-domain to this set, in Dice points, in words."""
    if line["role"] == "in-domain":
        return "in-domain"
    if "drop" not in line:
        return NOT_YET
    home = "validation" if line["in_domain"] == "validation" else set_name(line["in_domain"])
    return f"{100 * line['drop']:+.1f} from {home}"


def score_rows(lines: list[dict], experiment: int) -> list[list[str]]:
    """Rows (SCORE_COLUMNS) of one experiment's test sets, one per (set, row) of the report;
    the selection sets are left out (:func:`choice_rows` shows them). A row whose cells are not
    all done says so once, in the Dice column, with "-" in the other metrics' columns."""
    rows = []
    for ln in lines:
        if ln["kind"] != "score" or ln["experiment"] != experiment or ln["role"] == "selection":
            continue
        metrics = [mean_std(ln, m) for m in ("dice", "iou", "hd95", "nsd")] if "dice" in ln else [NOT_YET, *"---"]
        drop = drop_text(ln) if "dice" in ln or ln["role"] == "in-domain" else "-"
        rows.append([set_name(ln["test"]), ln["row"], *metrics, drop])
    return rows


def expected_pairs(experiment: int, rows=None) -> list[tuple[str, dict, dict]]:
    """(test set, a, b) of every comparison :func:`report` makes in ``experiment`` once both
    rows are done: :func:`pairs` on each test set both rows are scored on."""
    members = [row for row in select_rows(rows=rows) if row["experiment"] == experiment]
    tests = dict.fromkeys(tuple(t) for row in members for t in row["tests"])
    return [(label(t), a, b) for t in tests for a, b in pairs([r for r in members if t in map(tuple, r["tests"])])]


def pair_rows(lines: list[dict], experiment: int, rows=None) -> list[list[str]]:
    """Rows (PAIR_COLUMNS): each expected comparison's paired Dice difference (a - b) with its
    95 % bootstrap interval, or NOT_YET while either row's cells are missing."""
    done = {(ln["test"], ln["key"], ln["against"]): ln for ln in lines if ln["kind"] == "pair"}
    out = []
    for test, a, b in expected_pairs(experiment, rows):
        ln = done.get((test, a["key"], b["key"]))
        if a["variant"] == b["variant"]:  # SynDiff against the U-Net, both trained alike
            name = "SynDiff - Pixel U-Net" + ("" if a["variant"] == "plain" else f", both {a['variant']}")
        else:  # a variant against the row it builds on
            name = f"{a['variant']} - {b['variant']} ({MODEL_NAMES[model_kind(a)]})"
        if ln is None:
            out.append([set_name(test), name, NOT_YET, "-", "-"])
            continue
        unit = "sequence" if test.startswith(f"{CLINICDB}:") else "frame"  # what the bootstrap resamples
        out.append([set_name(test), name, f"{100 * ln['diff']:+.1f} [{100 * ln['diff_low']:+.1f}, "
                    f"{100 * ln['diff_high']:+.1f}]", f"{ln['n_groups']} {unit}{'s' * (ln['n_groups'] != 1)}",
                    ln["verdict"]])
    return out


def choice_rows(lines: list[dict], experiment: int, rows=None) -> list[list[str]]:
    """Rows (CHOICE_COLUMNS) for the rows of ``experiment`` that have a selection set: each one's
    Dice on it, its paired difference there from the row it builds on (what :func:`choices`
    steps on), which variant is kept for each model (once every variant is scored), and the
    kept row's Dice on the cross-domain test set: the only test number the choice stands on."""
    members = [row for row in select_rows(rows=rows) if row["experiment"] == experiment and row.get("selection")]
    scores = {(ln["key"], ln["test"]): ln for ln in lines if ln["kind"] == "score" and ln["experiment"] == experiment}
    gains = {(ln["key"], ln["against"], ln["test"]): ln for ln in lines if ln["kind"] == "pair"}
    chosen = {ln["model"]: ln for ln in lines if ln["kind"] == "choice" and ln["experiment"] == experiment}
    out = []
    for row in members:
        by = label(row["selection"])
        line = scores.get((row["key"], by), {})
        base = next((b for b in members if builds_on(row, b)), None)
        gain = gains.get((row["key"], base["key"], by)) if base else None
        gain_text = ("-" if base is None else NOT_YET if gain is None else
                     f"{100 * gain['diff']:+.1f} [{100 * gain['diff_low']:+.1f}, {100 * gain['diff_high']:+.1f}] "
                     f"{gain['verdict']}")
        choice = chosen.get(model_kind(row))
        verdict = ("kept" if choice["chosen"] == row["key"] else "-") if choice else "needs every variant"
        test = f"{100 * choice['dice']:.1f}" if choice and choice["chosen"] == row["key"] and "dice" in choice else "-"
        out.append([row["row"], mean_std(line, "dice"), gain_text, verdict, test])
    return out


def ours_inputs(profile: str = "cpu") -> str:
    """What this book's rows were trained with, in PROTOCOL_COLUMNS' "inputs" words."""
    size = get_profile(profile).train.image_size
    return f"{size}x{size} px, no pretraining"


def protocol_rows(lines: list[dict], profile: str = "cpu") -> list[list[str]]:
    """Rows (PROTOCOL_COLUMNS) of experiment 3: ours (mean Dice on each data set's test frames,
    or NOT_YET), then the methods REPORTED, marked "reported, not rerun"."""
    def dice(key, test):
        line = next((ln for ln in lines if ln["kind"] == "score" and ln["key"] == key and ln["test"] == test), {})
        return mean_std(line, "dice")

    ours = [[f"{ln['row']} (this book)", ours_inputs(profile), dice(ln["key"], f"{KVASIR}:test"),
             dice(ln["key"], f"{CLINICDB}:test"), "rerun here"]
            for ln in lines if ln["kind"] == "score" and ln["experiment"] == 3 and ln["test"] == f"{KVASIR}:test"]
    theirs = [[ln["row"], f"{REPORTED_INPUTS} {ln['backbone']}", f"{100 * ln['dice'][f'{KVASIR}:test']:.1f}",
               f"{100 * ln['dice'][f'{CLINICDB}:test']:.1f}", "reported, not rerun"]
              for ln in lines if ln["kind"] == "reported"]
    return ours + theirs


def glue_texts(lines: list[dict], rows=None) -> dict[str, str]:
    """The report's numbers as short texts to glue, NOT_YET where cells are missing:

        gen_<row>_<set>         "58.0 ± 27.4 % Dice"             every test set of every row
        gen_<row>_<set>_drop    "+4.1 Dice points"               cross-domain sets: in-domain minus this
        gen_<a>_vs_<b>_<set>    "+3.0 [-1.2, +7.1] Dice points"   every expected comparison
        gen_<a>_vs_<b>_<set>_verdict                            "better", "worse", "no detectable difference"
                                 (and the same for the pairs done on a selection set)
        gen_exp<e>_<model>_choice "c2k-syndiff-photometric"     the variant a selection set kept
        gen_exp<e>_<model>_choice_<set> "69.1 % Dice"             its mean Dice on each cross-domain set

    <row> and <set> as :func:`short_key` writes them (c2k_syndiff, kvasir_test)."""
    texts = {}
    for ln in lines:
        if ln["kind"] == "score" and ln["role"] != "selection":
            key = f"gen_{short_key(ln['key'])}_{short_key(ln['test'])}"
            texts[key] = f"{mean_std(ln, 'dice')} % Dice" if "dice" in ln else NOT_YET
            if ln["role"] == "cross-domain":
                texts[f"{key}_drop"] = f"{100 * ln['drop']:+.1f} Dice points" if "drop" in ln else NOT_YET
    done = {(ln["test"], ln["key"], ln["against"]): ln for ln in lines if ln["kind"] == "pair"}
    for experiment in dict.fromkeys(ln["experiment"] for ln in lines):
        for test, a, b in expected_pairs(experiment, rows):
            key = f"gen_{short_key(a['key'])}_vs_{short_key(b['key'])}_{short_key(test)}"
            ln = done.get((test, a["key"], b["key"]))
            texts[key] = (f"{100 * ln['diff']:+.1f} [{100 * ln['diff_low']:+.1f}, {100 * ln['diff_high']:+.1f}] "
                          "Dice points" if ln else NOT_YET)
            texts[f"{key}_verdict"] = ln["verdict"] if ln else NOT_YET
        for (test, a, b), ln in done.items():  # the selection set's pairs, what the choice steps on
            key = f"gen_{short_key(a)}_vs_{short_key(b)}_{short_key(test)}"
            if ln["experiment"] == experiment and key not in texts:
                texts[key] = (f"{100 * ln['diff']:+.1f} [{100 * ln['diff_low']:+.1f}, {100 * ln['diff_high']:+.1f}] "
                              "Dice points")
                texts[f"{key}_verdict"] = ln["verdict"]
        members = [r for r in select_rows(rows=rows) if r["experiment"] == experiment and r.get("selection")]
        for kind in dict.fromkeys(model_kind(r) for r in members):
            if sum(model_kind(r) == kind for r in members) > 1:
                choice = next((ln for ln in lines if ln["kind"] == "choice" and ln["experiment"] == experiment
                               and ln["model"] == kind), None)
                texts[f"gen_exp{experiment}_{kind}_choice"] = choice["chosen"] if choice else NOT_YET
                first = next(r for r in members if model_kind(r) == kind)
                for test in (label(t) for t in first["tests"] if role(first, t) == "cross-domain"):
                    dice = choice["cross_dice"].get(test) if choice else None
                    texts[f"gen_exp{experiment}_{kind}_choice_{short_key(test)}"] = (
                        f"{100 * dice:.1f} % Dice" if dice is not None else NOT_YET)
    return texts


def drop_points(lines: list[dict]) -> list[dict]:
    """For each done cross-domain score line: the row, its in-domain and cross-domain Dice (for
    notebook 08's figure of the drop)."""
    return [{"experiment": ln["experiment"], "row": ln["row"], "key": ln["key"], "test": ln["test"],
             "in_domain": ln["in_domain"], "in_domain_dice": ln["in_domain_dice"], "dice": ln["dice"]}
            for ln in lines if ln["kind"] == "score" and ln["role"] == "cross-domain" and "drop" in ln]


def read_first_look(path) -> dict:
    """results/generalisation/first-look/*.json: grid models of notebook 06 scored on another
    data set with `syndiff evaluate`. Returns the record (what, command, code, date, hardware)
    with its results as "scores": {(model, data set, fit): that result}."""
    record = json.loads(Path(path).read_text())
    return record | {"scores": {(r["model"].split("/")[0], r["data"], r["fit"]): r for r in record["results"]}}


# --- polyp size: what each data set films, and where a model taken across fails --------------------
SIZE_EDGES = (0.05, 0.10, 0.20)  # the share of a frame its polyp covers: the edges of the size bins
MISS = 0.1  # Dice below this: next to no overlap, the polyp missed (or something else found)
ABSENT = "not measured here (no Kvasir-SEG beside the data)"


def polyp_shares(root) -> dict[str, float]:
    """{frame id: the share of its mask that is polyp}, each mask read at its own size."""
    return {i: float(data_lib.read_mask(mask).mean()) for i, _, mask in data_lib.find_pairs(root)}


def size_bins(edges=SIZE_EDGES) -> list[tuple[str, float, float]]:
    """(label, low, high) of each size bin: "under 5 %", "5-10 %", ..., "20 % or more"."""
    bounds = [0.0, *edges, 1.0 + 1e-9]
    def pct(v):
        return f"{100 * v:g}"
    labels = ([f"under {pct(edges[0])} %"] + [f"{pct(a)}-{pct(b)} %" for a, b in zip(edges, edges[1:])]
              + [f"{pct(edges[-1])} % or more"])
    return [(name, low, high) for name, low, high in zip(labels, bounds, bounds[1:])]


SIZE_COLUMNS = ["polyp covers", "ClinicDB frames %", "Kvasir-SEG frames %", "frames", "mean Dice %", "median Dice %",
                f"misses (Dice < {MISS:g}) %"]


def in_bin(shares: dict[str, float], low: float, high: float) -> list[str]:
    """The frames of ``shares`` ({frame id: polyp share}) whose polyp covers [low, high) of the frame."""
    return [i for i, share in shares.items() if low <= share < high]


def size_rows(shares: dict[str, dict[str, float]], dice: dict[str, float], edges=SIZE_EDGES) -> list[list]:
    """Notebook 08's table by polyp size: per bin, the share of each data set's frames in it
    (``shares``: {CLINICDB: {...}, KVASIR: {...}}, as polyp_shares gives), then the Kvasir-SEG
    frames a model was scored on (``dice``: {frame id: Dice}): how many, mean and median Dice,
    and the share of misses; a last row for all of them."""
    def scores(ids):
        d = np.array([dice[i] for i in ids])
        return [len(d), 100 * d.mean(), 100 * float(np.median(d)), 100 * float(np.mean(d < MISS))] if len(d) else \
            [0, "-", "-", "-"]

    scored = {i: shares[KVASIR][i] for i in dice}
    rows = [[name, *(100 * len(in_bin(shares[d], low, high)) / len(shares[d]) for d in (CLINICDB, KVASIR)),
             *scores(in_bin(scored, low, high))] for name, low, high in size_bins(edges)]
    rows.append(["all", 100.0, 100.0, *scores(list(dice))])
    return rows


def size_texts(shares: dict[str, dict[str, float]] | None, dice: dict[str, float] | None,
               edges=SIZE_EDGES) -> dict[str, str]:
    """Notebook 08's glued sentences on polyp size (ABSENT for each without Kvasir-SEG):

        gen_size_share_clinicdb / _kvasir     "S %"   mean share of a frame its polyp covers
        gen_size_large_clinicdb / _kvasir     "F %"   frames whose polyp covers the top bin's edge or more
        gen_size_large_dice / _rest_dice      "D %"   the model's mean Dice on those frames / on the rest
        gen_size_large                        "E %"   the top bin's edge (SIZE_EDGES[-1])"""
    top = edges[-1]
    texts = {"gen_size_large": f"{100 * top:g} %"}
    keys = ("gen_size_share_clinicdb", "gen_size_share_kvasir", "gen_size_large_clinicdb", "gen_size_large_kvasir",
            "gen_size_large_dice", "gen_size_rest_dice")
    if not shares or not dice:
        return texts | dict.fromkeys(keys, ABSENT)
    for name, short in ((CLINICDB, "clinicdb"), (KVASIR, "kvasir")):
        texts[f"gen_size_share_{short}"] = f"{100 * np.mean(list(shares[name].values())):.1f} %"
        texts[f"gen_size_large_{short}"] = f"{100 * len(in_bin(shares[name], top, np.inf)) / len(shares[name]):.0f} %"
    scored = {i: shares[KVASIR][i] for i in dice}
    for key, ids in (("gen_size_large_dice", in_bin(scored, top, np.inf)), ("gen_size_rest_dice", in_bin(scored, 0, top))):
        texts[key] = f"{100 * np.mean([dice[i] for i in ids]):.1f} %" if ids else "-"
    return texts


# --- notebook 08: scoring notebook 04's model on frames of another data set -----------------------
def find_kvasir(data, kvasir=None) -> Path | None:
    """The Kvasir-SEG folder notebook 08 scores: ``kvasir`` if given, else kvasir-seg/ beside
    the ``data`` folder (../shared/data holds both); None for the toy data or when absent."""
    if kvasir is not None:
        return Path(kvasir) if Path(kvasir).is_dir() else None
    if data_lib.is_toy(data):
        return None
    folder = Path(data).parent / KVASIR
    return folder if folder.is_dir() else None


def cross_frame_count(profile: str, available: int, n=None) -> int:
    """How many frames of the other data set notebook 08 scores: ``n`` if given, else
    DEFAULT_CROSS_FRAMES[profile] (a few dozen at tiny), else all; never more than there are."""
    n = DEFAULT_CROSS_FRAMES.get(profile) if n is None else n
    return available if n is None else min(int(n), available)


def run_test_set(run_dir, data) -> tuple[str, list[str]]:
    """(data set, test ids) of a trained run: the data it was trained on and the test frames of
    its split, as notebook 05 scores them. The recorded folder is used where it exists from
    here; else ``data``, if it is a folder of the recorded name (the same data, reached from
    another working directory); else a ValueError saying what the run was trained on."""
    split = data_lib.load_split(Path(run_dir) / "split.json")
    trained = split["data"]
    if isinstance(trained, list):
        raise ValueError(f"{run_dir} was trained on several data sets ({', '.join(map(str, trained))}); "
                         "notebook 08 scores a run of one")
    if data_lib.is_toy(trained):
        return "toy", split["test"]
    if Path(trained).is_dir():
        return trained, split["test"]
    if not data_lib.is_toy(data) and data_lib.dataset_name(data) == data_lib.dataset_name(trained):
        return str(data), split["test"]
    raise ValueError(f"{run_dir} was trained on {trained}, which is not here; pass that folder as data")


def frame_sets(run_dir, data, folder, profile: str, seed: int = 0, kvasir=None, n=None,
               strength: float = 1.0) -> tuple[dict[str, tuple], str]:
    """The sets notebook 08 scores notebook 04's models on, {name: (data set, ids)}, and a
    line that says what they are. First the run's own test frames (:func:`run_test_set`,
    in-domain); then, with a ``kvasir`` folder, its first :func:`cross_frame_count` frames in id
    order (its ids are random strings, so that is a fair draw); without one, a simulated
    second data set written under ``folder``: that many toy frames drawn with seed + 1, once
    as they are ("new toy frames") and once shifted by ``strength`` ("shifted toy frames",
    :func:`write_shifted_toy`). The last set is the one furthest from training."""
    home, home_ids = run_test_set(run_dir, data)
    trained_on = "the toy dataset" if home == "toy" else Path(home).name
    home_name = "toy test" if home == "toy" else f"{SET_NAMES.get(Path(home).name, Path(home).name)} test"
    sets = {home_name: (home, home_ids)}
    if kvasir is not None:
        ids = data_lib.dataset_ids(kvasir)
        sets["Kvasir-SEG"] = (kvasir, ids[:cross_frame_count(profile, len(ids), n)])
        note = f"Kvasir-SEG found: {len(sets['Kvasir-SEG'][1])} of its {len(ids)} frames are scored, in id order."
    else:
        count = cross_frame_count(profile, data_lib.TOY_SIZE, n)
        for name, folder_name, shift in (("new toy frames", "toy-new-frames", 0.0),
                                         ("shifted toy frames", "toy-shifted", strength)):
            written = write_shifted_toy(Path(folder) / folder_name, count, seed + 1, strength=shift)
            sets[name] = (written, data_lib.dataset_ids(written))
        note = (f"Kvasir-SEG is absent (no kvasir-seg/ folder beside the data): the other data set is simulated, "
                f"{count} toy frames drawn with seed {seed + 1} instead of 0, once as they are and once with a "
                f"photometric shift of strength {strength:g}.")
    return sets, f"{note} Notebook 04 trained on {trained_on}: its {len(home_ids)} test frames are in-domain."


def score_frames(pipe, data, ids, seed: int = 0, fit: str | None = None, chunk: int = 50) -> tuple[dict, dict]:
    """:func:`pipeline.evaluate` of ``pipe`` on the frames ``ids`` of ``data``, read ``chunk``
    frames at a time (Kvasir-SEG's frames are up to 1920x1072: all 1000 at once would not fit a
    laptop), each chunk one call with noise seed ``seed``; ``fit`` None is the model's own.
    Returns (summary, per_image) as evaluate does (the same keys), per_image in the order of ``ids``."""
    from .pipeline import evaluate, resolve_fit

    fit, parts = resolve_fit(pipe, fit), []
    for start in range(0, len(ids), chunk):
        samples = data_lib.load_dataset(data, ids=ids[start:start + chunk], check=start == 0)
        samples = sorted(samples, key=lambda s: ids.index(s.id))  # load_dataset sorts by id; keep the caller's order
        parts.append(evaluate(pipe, samples, seed=seed, fit=fit))
    per_image = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    return restrict(parts[0][0], per_image, list(ids))  # every chunk scored with the first one's settings


def predict_frames(pipe, data, ids, wanted, seed: int = 0, fit: str | None = None, chunk: int = 50) -> dict:
    """{id: (sample, predicted mask [H, W])} for the ``wanted`` ids among ``ids``, made as
    :func:`score_frames` made them (the same chunks, the same noise), so each mask is the one its
    score was computed on; only the chunks holding a wanted id are run again."""
    from .pipeline import predict_native

    found = {}
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        if not set(part) & set(wanted):
            continue
        samples = sorted(data_lib.load_dataset(data, ids=part, check=False), key=lambda s: part.index(s.id))
        masks = predict_native(pipe, [s.image for s in samples], seed=seed, fit=fit)
        found |= {s.id: (s, m) for s, m in zip(samples, masks) if s.id in wanted}
    return {i: found[i] for i in wanted}


def chosen_frames(per_image: dict, n_worst: int = 2) -> list[tuple[str, int]]:
    """The frames notebook 08 shows, by Dice: the ``n_worst`` lowest, the median and the best,
    as (caption, index into per_image); ties go to the earlier frame, and no frame twice."""
    dice = np.asarray(per_image["dice"])
    order = np.argsort(dice, kind="stable")  # [N], lowest Dice first
    picks = [(("worst" if k == 0 else f"worst {k + 1}"), int(order[k])) for k in range(min(n_worst, len(order)))]
    picks += [("median", int(order[(len(order) - 1) // 2])), ("best", int(order[-1]))]
    seen, out = set(), []
    for caption, index in picks:
        if index not in seen:
            seen.add(index)
            out.append((caption, index))
    return out


def by_id(per_image: dict, metric: str = "dice") -> dict[str, float]:
    """{frame id: ``metric``} from evaluate's or :func:`score_frames`' per_image, for :func:`paired`."""
    return {str(i): float(v) for i, v in zip(per_image["id"], per_image[metric])}


def paired_text(ours: dict, theirs: dict) -> tuple[dict, str]:
    """:func:`paired` of two {frame id: Dice} and its result in words, in Dice points."""
    result = paired(ours, theirs)
    return result, (f"{100 * result['diff']:+.1f} [{100 * result['diff_low']:+.1f}, {100 * result['diff_high']:+.1f}]"
                    f" ({result['verdict']})")


def fit_views(pipe, sample, seed: int = 0) -> dict[str, dict]:
    """How one frame becomes the model's square input under each fit, and what comes back:
    {fit: {"input": uint8 [S, S, 3] (what the model sees), "mask": bool [H, W] (the prediction
    at the frame's own size), "dice": its Dice}} for "stretch" and "letterbox" (notebook 08)."""
    from .metrics import dice_score
    from .pipeline import images_to_tensor, letterbox, predict_native

    size, views = pipe.profile.train.image_size, {}
    for fit in FITS:
        image = letterbox([sample.image])[0][0] if fit == "letterbox" else sample.image
        pixels = images_to_tensor(image, size)[0]  # [3, S, S] in [-1, 1]
        seen = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()  # [S, S, 3]
        mask = predict_native(pipe, [sample.image], seed=seed, fit=fit)[0]  # [H, W]
        views[fit] = {"input": seen, "mask": mask, "dice": dice_score(mask, sample.mask)}
    return views


def widest(data, ids) -> str:
    """The id among ``ids`` of the frame with the largest width / height ratio (the first of
    equals): the one a stretch distorts most. Sizes come from the files' headers, so no
    frame is decoded."""
    from PIL import Image

    images = {i: image for i, image, _ in data_lib.find_pairs(data)}
    ratios = []
    for i in ids:
        with Image.open(images[i]) as image:
            ratios.append(image.width / image.height)
    return ids[int(np.argmax(ratios))]


# --- notebook 08 without Kvasir-SEG: a simulated domain shift of the toy data ---------------------
def shift_images(x, generator, strength: float = 1.0):
    """The simulated shift: :func:`augment.photometric_augment` at ``strength`` (1: the training
    augmentation exactly; 0 changes nothing). x: [B, 3, S, S] in [-1, 1]."""
    from . import augment

    return augment.photometric_augment(x, generator, strength)


def write_shifted_toy(dest, n: int, seed: int, strength: float = 1.0, aspect: float | None = None,
                      size: int = 128) -> Path:
    """A simulated second data set, written like write_toy_dataset (dest/images, dest/masks):
    ``n`` toy frames drawn with ``seed`` (other frames than the toy set's seed 0), their images
    changed by :func:`shift_images` (noise seeded by ``seed``) and, with ``aspect`` (width /
    height, e.g. 4/3 as ClinicDB's 384x288), cut to that shape about their centre, mask alike."""
    import torch
    from PIL import Image

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)  # a fresh set every time: no frames of another strength left over
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    samples = data_lib.make_toy_dataset(n, size, seed)
    x = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1 for s in samples])  # [N, 3, S, S]
    x = shift_images(x, torch.Generator().manual_seed(seed), strength)
    images = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()  # [N, S, S, 3]
    rows = slice(None)
    if aspect is not None:
        height = min(size, round(size / aspect))
        rows = slice((size - height) // 2, (size - height) // 2 + height)
    for sample, image in zip(samples, images):
        Image.fromarray(image[rows]).save(dest / "images" / f"{sample.id}.png")
        Image.fromarray(sample.mask[rows].astype(np.uint8) * 255).save(dest / "masks" / f"{sample.id}.png")
    return dest
