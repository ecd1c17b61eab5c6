"""The experiment grid's machinery on the toy data at a few steps: cells, locks, resume, report.

Never the real grid (that is days of CPU time); only that a grid of 2 rows x 2 folds runs,
skips what is done, never runs a cell twice, resumes a killed cell and reports from its files.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from syndiff_lib import experiments, viz
from syndiff_lib.config import get_profile
from syndiff_lib.data import make_toy_dataset

TINY_BUDGET = experiments.GridBudget(syndiff_steps=4, baseline_steps=3, val_every=2, checkpoint_every=2, autoencoder_steps=20)


@pytest.fixture(scope="module")
def clinicdb_like(tmp_path_factory):
    """Toy frames saved as 1.png ... 612.png: ClinicDB's ids, sequences and folds."""
    root = tmp_path_factory.mktemp("clinicdb-like")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, sample in enumerate(make_toy_dataset(n=612, size=64, seed=5), start=1):
        Image.fromarray(sample.image).save(root / "images" / f"{i}.png")
        Image.fromarray(sample.mask.astype(np.uint8) * 255).save(root / "masks" / f"{i}.png")
    return root


def test_every_grid_has_rows_folds_and_a_trained_reference():
    for name in experiments.GRIDS:
        spec = experiments.grid_spec(name)
        keys = {experiments.row_key(r) for r in spec["rows"]}
        assert spec["reference"] in keys, name
        for row in spec["rows"]:  # a row that reuses a model names one that some row trains
            assert row.get("model") in set(experiments.TRAINED) | {None}, (name, row["row"])
    models = {}
    for grid in experiments.GRIDS.values():
        for row in grid["rows"]:
            if "key" in row:  # what trains, without its labels
                models.setdefault(row["key"], []).append({k: v for k, v in row.items() if k not in ("paper", "against")})
    assert all(rows.count(rows[0]) == len(rows) for rows in models.values())  # one key, one model, in every grid
    cells = experiments.grid_cells(experiments.grid_spec("table3"))
    assert len({c.folder("g") for c in cells}) == len(cells)  # no two cells share a folder


def test_cells_train_in_fp32_unless_their_row_says_otherwise():
    spec, budget = experiments.grid_spec("precision"), experiments.GridBudget()
    precisions = {row["key"]: experiments.cell_profile(spec, row, budget).train.mixed_precision for row in spec["rows"]}
    assert precisions == {"syndiff": "no", "syndiff_bf16": "bf16", "baseline": "no", "baseline_bf16": "bf16"}


def test_grid_cells_train_without_photometric_augmentation_though_the_cpu_profile_has_it():
    """The cpu profile took photometric augmentation up after the tables began: their cells keep
    training as the earlier ones did, and a row that wants it says so."""
    assert get_profile("cpu").train.photometric_augment and not get_profile("tiny").train.photometric_augment
    budget = experiments.GridBudget()
    for name in experiments.GRIDS:
        spec = experiments.grid_spec(name)
        assert not any(experiments.cell_profile(spec, row, budget).train.photometric_augment for row in spec["rows"])
    row = {"key": "syndiff-photometric", "train": {"photometric_augment": True}}
    assert experiments.cell_profile(experiments.grid_spec("table1"), row, budget).train.photometric_augment


def test_cell_budgets_are_steps_and_the_baseline_gets_its_own():
    spec = experiments.grid_spec("table1")
    budget = experiments.GridBudget(syndiff_steps=900, baseline_steps=300)
    syndiff, paper, baseline = (experiments.cell_profile(spec, row, budget) for row in spec["rows"])
    assert syndiff.train.max_steps == 900 and baseline.train.baseline_steps == 300  # each model reads its own
    assert syndiff.train.max_minutes >= 24 * 60 and syndiff.autoencoder.train_minutes >= 24 * 60  # never the clock
    assert paper.diffusion.recipe == "paper" and syndiff.diffusion.recipe == "default"


def test_a_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over(tmp_path):
    folder = tmp_path / "cell"
    assert experiments.take_cell(folder)
    assert not experiments.take_cell(folder)  # held (by this live process)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = json.loads((folder / "lock").read_text()) | {"pid": int(dead.stdout)}
    (folder / "lock").write_text(json.dumps(holder))
    assert experiments.take_cell(folder)  # its process is gone
    holder["host"] = "another-machine"
    (folder / "lock").write_text(json.dumps(holder))
    assert not experiments.take_cell(folder)  # another machine's lock is respected
    experiments.release_cell(folder)
    assert not (folder / "lock").exists()


def test_smoke_grid_runs_resumes_and_reports(tmp_path, clinicdb_like):
    out = tmp_path / "grid"
    spec = experiments.grid_spec("smoke")
    cells = experiments.grid_cells(spec)
    assert len(cells) == 4  # 2 rows x 2 folds
    # A cell another process holds is left alone.
    experiments.take_cell(cells[0].folder(out))
    holder = json.loads((cells[0].folder(out) / "lock").read_text())
    (cells[0].folder(out) / "lock").write_text(json.dumps(holder | {"pid": os.getppid()}))  # a live process
    first = experiments.run_grid("smoke", clinicdb_like, out, TINY_BUDGET, log=lambda *_: None)
    assert first["done"] == 3 and cells[0].name in first["running"]
    # Its holder died mid-training: the checkpoint it left is resumed, not started over.
    experiments.release_cell(cells[0].folder(out))
    record = json.loads((cells[1].folder(out) / "cell.json").read_text())
    assert record["steps"] == 4 and record["fold"] == cells[1].fold and record["code"]
    per_image = (cells[1].folder(out) / "per_image.jsonl").read_text().splitlines()
    assert record["metrics"]["n"] == len(per_image) > 0
    before = {c.name: (c.folder(out) / "cell.json").stat().st_mtime_ns for c in cells[1:]}
    second = experiments.run_grid("smoke", clinicdb_like, out, TINY_BUDGET, log=lambda *_: None)
    assert second["done"] == 4 and second["left"] == 0 and not second["running"]
    assert before == {c.name: (c.folder(out) / "cell.json").stat().st_mtime_ns for c in cells[1:]}  # not redone
    # The synthetic set of a fold comes from that fold's training frames only.
    synthetic = [c for c in cells if c.row.get("synthetic")][0]
    made = json.loads((synthetic.folder(out) / "cell.json").read_text())["synthetic"]
    folder = out / made[0]["folder"]  # recorded relative to the grid folder: no machine paths in results
    split = json.loads((folder / "split.json").read_text())
    manifest = [json.loads(line) for line in
                (folder.with_name(folder.name.rsplit("-n", 1)[0]) / "manifest.jsonl").read_text().splitlines()]
    assert all(r["background_id"] in split["train"] and r["mask_source_id"] in split["train"] for r in manifest)
    # The report comes from the files alone.
    lines = experiments.report("smoke", out)
    reference, synth = lines
    assert reference["cells"] == synth["cells"] == 2 and 0 <= reference["dice"] <= 1
    assert synth["diff_low"] <= synth["diff"] <= synth["diff_high"] and synth["verdict"]
    n_out_of_fold = sum(json.loads((c.folder(out) / "cell.json").read_text())["metrics"]["n"]
                        for c in cells if c.row["key"] == "smoke_real")
    assert synth["n_paired"] == n_out_of_fold


def test_a_killed_cell_resumes_from_its_checkpoint(tmp_path, clinicdb_like):
    out = tmp_path / "grid"
    spec = experiments.grid_spec("smoke")
    cell = experiments.grid_cells(spec)[0]
    profile = experiments.cell_profile(spec, cell.row, TINY_BUDGET)
    from syndiff_lib.train import train

    run_dir = cell.run_folder(out)
    # What a kill after the first checkpoint leaves: a run folder with a checkpoint at step 2.
    import syndiff_lib.train as train_module

    calls = {"n": 0}
    real_fit_loss = train_module.training_loss

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real_fit_loss(*args, **kwargs)

    train_module.training_loss = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            train(profile, clinicdb_like, run_dir, seed=0, fold=cell.fold, split_seed=experiments.SPLIT_SEED,
                  log=lambda *_: None)
    finally:
        train_module.training_loss = real_fit_loss
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"] == 2
    record = experiments.run_cell(cell, spec, clinicdb_like, out, TINY_BUDGET, log=lambda *_: None)
    assert record["steps"] == 4
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_dice" in r] == [2, 4]


def test_status_counts_a_killed_cells_lock_as_left_not_running(tmp_path):
    cells = experiments.grid_cells(experiments.grid_spec("smoke"))
    for cell, pid in ((cells[0], os.getpid()), (cells[1], 2**22 + 1)):  # alive: us; dead: above pid_max
        cell.folder(tmp_path).mkdir(parents=True)
        (cell.folder(tmp_path) / "lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    state = experiments.status("smoke", tmp_path)
    assert state["running"] == [cells[0].name] and state["left"] == len(cells) - 1


def test_grid_cost_counts_each_finished_cell_once_at_its_threads(tmp_path):
    assert experiments.grid_cost(tmp_path) == {"cells": 0, "core_hours": 0, "seconds_per_step": None}
    for name, wall, threads, per_step in (("real/fold0-seed0", 3600, 2, 0.7), ("gan/fold1-seed0", 1800, 1, 2.4)):
        folder = tmp_path / "cells" / name
        folder.mkdir(parents=True)
        (folder / "cell.json").write_text(json.dumps({"cell_wall_seconds": wall, "seconds_per_step": per_step,
                                                     "hardware": {"cpu_threads": threads}}))
    (tmp_path / "cells" / "gan" / "fold2-seed0").mkdir()  # started, not finished: no cell.json, no cost
    cost = experiments.grid_cost(tmp_path)
    assert cost["cells"] == 2 and cost["core_hours"] == pytest.approx(2.5)
    assert cost["seconds_per_step"] == (0.7, 2.4)


def test_report_and_status_name_a_grid_that_does_not_exist():
    with pytest.raises(ValueError, match="unknown grid"):
        experiments.grid_spec("table9")


def test_paired_bootstrap_resamples_whole_sequences():
    diff = np.array([0.1, 0.1, 0.1, -0.1])
    groups = np.array([1, 1, 1, 2])
    mean, low, high = experiments.paired_bootstrap(diff, groups, n_boot=2000)
    assert mean == pytest.approx(0.05)
    assert low == pytest.approx(-0.1) and high == pytest.approx(0.1)  # only two sequences: all of one or the other
    mean, low, high = experiments.paired_bootstrap(np.full(40, 0.2) + np.arange(40) * 1e-3, np.arange(40) // 4)
    assert 0 < low < mean < high


def test_the_gan_rows_generator_learns_from_the_folds_training_frames_only(tmp_path, clinicdb_like):
    from syndiff_lib import gan
    from syndiff_lib.data import build_split
    from syndiff_lib.synthesis import synthesize, training_frames

    frames, split = training_frames(clinicdb_like, fold=2, split_seed=experiments.SPLIT_SEED)
    backend = experiments.make_backend("gan", frames, split, tmp_path / "set", seed=0, gan_config=gan.TINY_GAN)
    assert backend.name == "gan" and (tmp_path / "set" / "gan" / "generator.safetensors").exists()
    trained_on = set(gan.load_gan(tmp_path / "set" / "gan").trained_on)
    held_out = set(build_split(clinicdb_like, fold=2, seed=experiments.SPLIT_SEED)["test"]) | set(split["val"])
    assert trained_on and trained_on <= set(split["train"]) and not trained_on & held_out
    made = synthesize(backend, frames, tmp_path / "set", 2, seed=0)
    assert [r["backend"] for r in made] == ["gan", "gan"]
    with pytest.raises(ValueError, match="copy-paste or gan"):
        experiments.make_backend("sdxl", frames, split, tmp_path / "other", seed=0)


def test_a_row_is_compared_with_the_row_it_names(tmp_path):
    """The precision grid: each bf16 row against its own fp32 row, not against the grid's reference."""
    spec = experiments.grid_spec("precision")
    ids = [str(i) for i in range(1, 61)]  # frames of sequences 1 and 2 (ClinicDB ids)
    dice = {"syndiff": 0.80, "syndiff_bf16": 0.79, "baseline": 0.60, "baseline_bf16": 0.70}
    metrics = {m: 0.5 for m in ("dice", "iou", "hd95", "nsd")} | {f"{m}_std": 0.1 for m in ("dice", "iou", "hd95", "nsd")}
    for cell in experiments.grid_cells(spec):
        folder = cell.folder(tmp_path)
        folder.mkdir(parents=True)
        rows = [{"id": i, "dice": dice[cell.row["key"]] + 0.01 * cell.seed, "iou": 0.5, "hd95": 1.0, "nsd": 0.5} for i in ids]
        (folder / "per_image.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "cell.json").write_text(json.dumps({"key": cell.row["key"], "fold": cell.fold, "seed": cell.seed,
                                                      "inference_steps": 1, "metrics": metrics | {"n": len(ids)}}))
    lines = {line["key"]: line for line in experiments.report("precision", tmp_path)}
    assert lines["syndiff_bf16"]["diff"] == pytest.approx(-0.01) and lines["syndiff_bf16"]["against"] == "syndiff"
    assert lines["baseline_bf16"]["diff"] == pytest.approx(0.10) and lines["baseline_bf16"]["against"] == "baseline"
    assert "diff" not in lines["baseline"] and "diff" not in lines["syndiff"]  # references, not compared with another row
    table_rows = {row[0]: row for row in viz.grid_table_rows(list(lines.values()), spec["reference"])}
    assert table_rows["Pixel U-Net (equal budget)"][6] == "reference"


def test_only_runs_the_named_cells_and_an_unknown_name_fails_before_any_work(tmp_path, clinicdb_like):
    out = tmp_path / "grid"
    cells = experiments.grid_cells(experiments.grid_spec("smoke"))
    with pytest.raises(ValueError, match="has no cell real/fold9-seed0"):
        experiments.run_grid("smoke", clinicdb_like, out, TINY_BUDGET, log=lambda *_: None, only=["real/fold9-seed0"])
    assert not out.exists() or not any(out.rglob("cell.json"))
    state = experiments.run_grid("smoke", clinicdb_like, out, TINY_BUDGET, log=lambda *_: None, only=[cells[0].name])
    assert state["done"] == 1 and (cells[0].folder(out) / "cell.json").exists()


def test_folds_runs_only_the_cells_of_those_folds(tmp_path, clinicdb_like):
    out = tmp_path / "grid"
    state = experiments.run_grid("smoke", clinicdb_like, out, TINY_BUDGET, log=lambda *_: None, folds=[7])
    assert state["done"] == 0 and not any(out.rglob("cell.json"))  # a grid without fold 7 has nothing to do
    real = [c for c in experiments.grid_cells(experiments.grid_spec("smoke")) if c.row["key"] == "smoke_real"]
    assert sorted(c.fold for c in real) == [0, 1]
    state = experiments.run_grid("smoke", clinicdb_like, out, TINY_BUDGET, log=lambda *_: None,
                                 only=[c.name for c in real], folds=[1])
    assert state["done"] == 1
    assert [c.fold for c in real if (c.folder(out) / "cell.json").exists()] == [1]


def test_table2_read_against_its_full_model_trains_nothing_new():
    full = experiments.grid_spec("table2_vs_full")
    assert full["reference"] == "text100"
    table2 = {c.folder("g") for c in experiments.grid_cells(experiments.grid_spec("table2"))}
    assert {c.folder("g") for c in experiments.grid_cells(full)} <= table2
