"""The cross-dataset runner (notebook 08) on two tiny fixture data sets at a few steps: the
leak check, cells, skip, lock, reuse of a finished run, and the paired report.

Never a real training: the table of EXPERIMENTS is checked as data (and against the shared
copies of CVC-ClinicDB and Kvasir-SEG, which it lists only, when they are beside the checkout).
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from syndiff_lib import cli, config, experiments, generalisation, pipeline
from syndiff_lib.data import make_toy_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_BUDGET = experiments.GridBudget(syndiff_steps=10, baseline_steps=10, val_every=5, checkpoint_every=5)
TESTS = [("kvasir-like", "test"), ("kvasir-like", "all"), ("clinic-like", "test")]
ROWS = [  # one experiment, one variant: SynDiff and the baseline, both with copy-paste frames
    {"experiment": 1, "key": "syndiff", "row": "SynDiff", "variant": "copy-paste", "data": ["clinic-like"],
     "synthetic": 100, "tests": TESTS, "selection": ("kvasir-like", "train+val")},
    {"experiment": 1, "key": "baseline", "row": "Pixel U-Net", "variant": "copy-paste", "data": ["clinic-like"],
     "synthetic": 100, "model_kind": "baseline", "tests": TESTS, "selection": ("kvasir-like", "train+val")},
]


def save_frames(folder: Path, ids, suffix: str, size: int, seed: int) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i, sample in zip(ids, make_toy_dataset(n=len(ids), size=size, seed=seed)):
        Image.fromarray(sample.image).save(folder / "images" / f"{i}{suffix}")
        Image.fromarray(sample.mask.astype(np.uint8) * 255).save(folder / "masks" / f"{i}.png")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """clinic-like: frames 1..80 named as ClinicDB's (its PraNet split: 12 test frames);
    kvasir-like: 16 JPEG frames with train.txt (12) and val.txt (4, its test set)."""
    root = tmp_path_factory.mktemp("data")
    save_frames(root / "clinic-like", range(1, 81), ".png", size=48, seed=5)
    ids = [f"cj{chr(97 + k)}{k:02d}" for k in range(16)]
    save_frames(root / "kvasir-like", ids, ".jpg", size=40, seed=6)
    (root / "kvasir-like" / "train.txt").write_text("\n".join(ids[:12]) + "\n")
    (root / "kvasir-like" / "val.txt").write_text("\n".join(ids[12:]) + "\n")
    return root


def test_the_table_declares_every_experiment_and_its_selection_is_never_a_test_set():
    rows = generalisation.select_rows()
    assert {r["experiment"] for r in rows} == set(generalisation.TITLES) == {1, 2, 3}
    for row in rows:
        assert row.get("selection") not in [tuple(t) for t in row["tests"]], row["key"]
        assert {generalisation.role(row, t) for t in row["tests"]} <= {"in-domain", "cross-domain"}
    # Every experiment pairs SynDiff with the baseline of the same variant.
    for experiment in generalisation.TITLES:
        pairs = generalisation.pairs([r for r in rows if r["experiment"] == experiment])
        assert any(generalisation.model_kind(a) != generalisation.model_kind(b) for a, b in pairs)
    assert all("kvasir-seg:test" in r["dice"] and "cvc-clinicdb:test" in r["dice"] for r in generalisation.REPORTED)
    assert "not rerun" in generalisation.REPORTED_NOTE and "100" in generalisation.REPORTED_NOTE
    budget = generalisation.default_budget("cpu")  # the cpu profile's own steps, fp32, no clock
    profile = experiments.cell_profile({"profile": "cpu"}, rows[0], budget)
    assert profile.train.max_steps == 3000 and profile.train.mixed_precision == "no"
    assert profile.train.max_minutes == experiments.NO_TIME_LIMIT
    photometric = next(r for r in rows if r["variant"] == "photometric")
    assert experiments.cell_profile({"profile": "cpu"}, photometric, budget).train.photometric_augment
    with pytest.raises(ValueError, match="unknown experiment row"):
        generalisation.select_rows(["no-such-row"])


@pytest.mark.skipif(not (SHARED / "kvasir-seg").is_dir() or not (SHARED / "cvc-clinicdb").is_dir(),
                    reason="the shared CVC-ClinicDB and Kvasir-SEG are not beside the checkout")
def test_the_real_test_sets_have_their_published_sizes():
    sizes = {row["key"]: {k: len(v) for k, v in generalisation.check_sets(row, SHARED).items()}
             for row in generalisation.EXPERIMENTS
             if row["key"] in ("c2k-syndiff", "c2k-syndiff-photometric-letterbox", "k2c-syndiff", "pranet-syndiff")}
    assert sizes["c2k-syndiff"] == {"kvasir-seg:test": 120, "kvasir-seg:all": 1000, "cvc-clinicdb:test": 62,
                                    "kvasir-seg:train+val": 880}
    assert sizes["c2k-syndiff-photometric-letterbox"] == sizes["c2k-syndiff"]  # a variant: the same sets, the same leak check
    assert sizes["k2c-syndiff"] == {"cvc-clinicdb:test": 62, "cvc-clinicdb:all": 612, "kvasir-seg:test": 120,
                                    "cvc-clinicdb:train+val": 550}
    assert sizes["pranet-syndiff"] == {"kvasir-seg:test": 120, "cvc-clinicdb:test": 62}


def test_a_test_set_that_overlaps_training_is_refused_before_anything_trains(tmp_path, data_root):
    leaky = ROWS[1] | {"tests": [("clinic-like", "all")]}  # holds the 68 frames it trains and validates on
    with pytest.raises(ValueError, match="clinic-like:all holds 68 frames the run trains or validates on"):
        generalisation.run_all(data_root, tmp_path, profile="tiny", rows=[ROWS[0], leaky], log=lambda *_: None)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cells").exists()
    chosen_on_test = ROWS[1] | {"selection": ("kvasir-like", "all")}
    with pytest.raises(ValueError, match="selection set kvasir-like:all holds 4 test frames"):
        generalisation.check_sets(chosen_on_test, data_root)
    both = ROWS[1] | {"data": ["clinic-like", "kvasir-like"], "tests": [("kvasir-like", "test"), ("kvasir-like", "all")],
                      "selection": None}
    with pytest.raises(ValueError, match="kvasir-like:all holds 12 frames"):
        generalisation.check_sets(both, data_root)
    assert list(generalisation.check_sets(both | {"tests": both["tests"][:1]}, data_root)) == ["kvasir-like:test"]


def test_cells_run_skip_resume_and_report_pairs(tmp_path, data_root, monkeypatch):
    # The tiny profile with a shorter autoencoder training: the machinery is under test, not the codec.
    tiny = config.get_profile("tiny")
    tiny.autoencoder.train_steps = 30
    monkeypatch.setitem(config.PROFILES, "tiny", tiny)
    out, messages = tmp_path / "out", []

    def run():
        messages.clear()
        return generalisation.run_all(data_root, out, profile="tiny", budget=TINY_BUDGET, rows=ROWS, log=messages.append)

    # 1. A cell another (live) process holds is left alone.
    syndiff, baseline = (generalisation.cell_folder(out, row, 0) for row in ROWS)
    assert experiments.take_cell(baseline)
    holder = json.loads((baseline / "lock").read_text())
    (baseline / "lock").write_text(json.dumps(holder | {"pid": os.getppid()}))
    state = run()
    assert state["done"] == 1 and state["running"] == ["baseline/seed0"] and state["left"] == 0
    experiments.release_cell(baseline)
    assert generalisation.status(out, rows=ROWS) == {"done": 1, "running": [], "left": 1, "cells": 2,
                                                     "median_cell_seconds": state["median_cell_seconds"]}

    # 2. The next run trains the other cell and skips the done one, and scores each data set's
    # frames in one pass: "all" holds "test" and "train+val", so no frame is scored twice.
    before = (syndiff / "cell.json").stat().st_mtime_ns
    scored, evaluate = [], pipeline.evaluate

    def counted(pipe, samples, **kwargs):
        scored.append(len(samples))
        return evaluate(pipe, samples, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate", counted)
    assert run()["done"] == 2
    monkeypatch.setattr(pipeline, "evaluate", evaluate)
    assert sorted(scored) == [12, 16]  # clinic-like's 12 test frames, kvasir-like's 16
    assert (syndiff / "cell.json").stat().st_mtime_ns == before
    assert any(m.startswith("baseline/seed0: training (10 steps)") for m in messages)
    assert not any(m.startswith("syndiff/") for m in messages)

    # 3. The records: every set scored, data named, never a path of this machine.
    text = (syndiff / "cell.json").read_text()
    record = json.loads(text)
    assert str(tmp_path) not in text and record["data"] == ["clinic-like"] and record["steps"] == 10
    assert record["code"] and record["hardware"] and record["seconds_per_step"] > 0
    sizes = {"kvasir-like:test": 4, "kvasir-like:all": 16, "clinic-like:test": 12, "kvasir-like:train+val": 12}
    assert {k: v["n"] for k, v in record["metrics"].items()} == sizes
    assert record["metrics"]["kvasir-like:train+val"]["role"] == "selection"
    assert record["metrics"]["clinic-like:test"]["role"] == "in-domain"
    rows = {}
    for name, part in [*TESTS, ("kvasir-like", "train+val")]:
        lines = (syndiff / f"per_image.{name}.{part}.jsonl").read_text().splitlines()
        assert len(lines) == sizes[f"{name}:{part}"] and 0 <= json.loads(lines[0])["dice"] <= 1
        rows[f"{name}:{part}"] = {r["id"]: r for r in map(json.loads, lines)}
        dice = [r["dice"] for r in rows[f"{name}:{part}"].values()]
        assert record["metrics"][f"{name}:{part}"]["dice"] == pytest.approx(np.mean(dice))
    everything = rows["kvasir-like:all"]  # a frame's row is the same in every set that holds it
    assert rows["kvasir-like:test"] | rows["kvasir-like:train+val"] == everything
    # The copy-paste frames came from the run's training frames only.
    synthetic = out / record["synthetic"][0]["folder"]
    split = json.loads((synthetic / "split.json").read_text())
    assert synthetic.name.startswith("copy-paste-clinic-like-seed0")
    run_split = json.loads((generalisation.run_folder(out, ROWS[0], 0) / "split.json").read_text())
    assert split["train"] == run_split["train"]

    # 4. A cell killed while scoring is scored again from its finished run, not trained again.
    steps = json.loads((baseline / "cell.json").read_text())["steps"]
    (baseline / "cell.json").unlink()
    assert run()["done"] == 2
    assert not any("training" in m or "resuming" in m for m in messages)
    assert json.loads((baseline / "cell.json").read_text())["steps"] == steps

    # 5. The report, from the files alone: scores, the drop, and SynDiff paired with the baseline.
    lines = generalisation.report(out, rows=ROWS)
    scores = [ln for ln in lines if ln["kind"] == "score"]
    assert len(scores) == 2 * 4 and all(ln["cells"] == ln["of"] == 1 and 0 <= ln["dice"] <= 1 for ln in scores)
    cross = next(ln for ln in scores if ln["test"] == "kvasir-like:test" and ln["key"] == "syndiff")
    assert cross["role"] == "cross-domain" and cross["in_domain"] == "clinic-like:test"
    assert cross["drop"] == pytest.approx(cross["in_domain_dice"] - cross["dice"])
    pairs = {ln["test"]: ln for ln in lines if ln["kind"] == "pair"}
    assert set(pairs) == set(sizes)
    assert all(ln["key"] == "syndiff" and ln["against"] == "baseline" for ln in pairs.values())
    assert all(ln["diff_low"] <= ln["diff"] <= ln["diff_high"] and ln["verdict"] for ln in pairs.values())
    assert pairs["clinic-like:test"]["n_paired"] == 12 and pairs["clinic-like:test"]["n_groups"] < 12  # sequences
    assert pairs["kvasir-like:test"]["n_groups"] == 4  # Kvasir-SEG's frames, one by one

    # 6. A second variant (here a copy of the first's files): paired with its plain row, and
    # the selection set chooses between the two.
    plain = [row | {"variant": "plain"} for row in ROWS]  # the same cells, as the plain rows
    variant = plain[0] | {"key": "syndiff-photometric", "variant": "photometric"}
    shutil.copytree(syndiff.parent, generalisation.cell_folder(out, variant, 0).parent)
    lines = generalisation.report(out, rows=[*plain, variant])
    within = [ln for ln in lines if ln["kind"] == "pair" and ln["key"] == "syndiff-photometric"]
    assert {ln["against"] for ln in within} == {"syndiff"} and all(ln["diff"] == 0 for ln in within)
    (choice,) = [ln for ln in lines if ln["kind"] == "choice"]
    assert choice["model"] == "syndiff" and choice["by"] == "kvasir-like:train+val"
    assert choice["chosen"] in ("syndiff", "syndiff-photometric") and choice["test"] == "kvasir-like:test"


def test_the_command_line_reads_the_table(tmp_path, capsys):
    assert cli.main(["generalise", "status", "--out", str(tmp_path), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["done"] == 0 and state["left"] == state["cells"] == len(generalisation.EXPERIMENTS)
    assert cli.main(["generalise", "report", "--out", str(tmp_path), "--only", "pranet-syndiff,pranet-baseline"]) == 0
    assert "PraNet" in capsys.readouterr().out
    assert cli.main(["generalise", "run", "--out", str(tmp_path)]) == 2  # no --data-root
    assert "--data-root" in capsys.readouterr().err
