"""The `syndiff` command end to end: bad input, resume after SIGKILL, NaN stop, evaluate,
segment, bench, and one tiny train -> evaluate on real CVC-ClinicDB when it is present."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from syndiff_lib import checkpoint as checkpoint_module
from syndiff_lib import train as train_module
from syndiff_lib.config import get_profile
from syndiff_lib.data import write_toy_dataset

# Small and quick: the toy dataset, 32x32-latent-free 64x64 inputs, few steps.
FAST = ["--profile", "tiny", "--max-steps", "40", "--max-minutes", "30", "--val-every", "20", "--checkpoint-every", "10"]
# With a weight average (EMA), so that its state, too, must survive the kill.
RESUMABLE = ["--profile", "tiny", "--max-minutes", "30", "--checkpoint-every", "10", "--val-every", "100", "--ema-decay", "0.99"]
BUDGET_FLAG = {"syndiff": "--max-steps", "baseline": "--baseline-steps"}  # each model's own step budget


def syndiff(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syndiff_lib", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"}, **kwargs)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), n=48, size=64, seed=0)


@pytest.fixture(scope="module")
def toy_run(toy_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "toy-run"
    result = syndiff("train", *FAST, "--data", toy_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


# --- bad input: one clear error naming the file, exit code 2, no traceback ---------------------
def _broken_dataset(root: Path, problem: str) -> Path:
    write_toy_dataset(root, n=4, size=64, seed=1)
    images = sorted((root / "images").iterdir())
    if problem == "corrupt":
        images[1].write_bytes(b"this is not a png")
        return images[1]
    mask = root / "masks" / images[2].name
    Image.fromarray(np.zeros((50, 64), np.uint8)).save(mask)
    return mask


@pytest.mark.parametrize("problem", ["corrupt", "size-mismatch"])
@pytest.mark.parametrize("verb", ["check", "train"])
def test_bad_data_is_refused_by_name(tmp_path, problem, verb):
    bad = _broken_dataset(tmp_path / "data", problem)
    if verb == "check":
        result = syndiff("data", "check", tmp_path / "data")
    else:
        result = syndiff("train", *FAST, "--data", tmp_path / "data", "--out", tmp_path / "run")
        assert not (tmp_path / "run").exists()  # refused before any work started
    assert result.returncode == 2
    assert bad.name in result.stderr and "error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_check_accepts_a_good_folder(toy_dir):
    result = syndiff("data", "check", toy_dir)
    assert result.returncode == 0, result.stderr
    assert "48 image/mask pairs" in result.stdout


def test_evaluate_refuses_a_folder_without_a_model(tmp_path, toy_dir):
    result = syndiff("evaluate", "--checkpoint", tmp_path, "--data", toy_dir)
    assert result.returncode == 2 and "no trained SynDiff pipeline" in result.stderr


# --- training, checkpoints, resume --------------------------------------------------------------
def test_train_writes_a_complete_run_folder(toy_run):
    for name in ("split.json", "log.jsonl", "results.json", "pipeline/syndiff_config.json", "checkpoint/state.json"):
        assert (toy_run / name).exists(), name
    results = json.loads((toy_run / "results.json").read_text())
    assert results["steps"] == 40 and results["seed"] == 0 and "hardware" in results
    split = json.loads((toy_run / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"]) and not set(split["val"]) & set(split["test"])
    assert not list(toy_run.rglob("*.bin")) and not list(toy_run.rglob("*.pt"))
    records = [json.loads(line) for line in (toy_run / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records) and any("val_dice" in r for r in records)
    assert all(0 <= r["train_dice"] <= 1 for r in records if "val_dice" in r)  # the fit diagnostic beside validation


def test_a_finished_run_is_reused_only_for_its_own_split_and_config(toy_run):
    results = json.loads((toy_run / "results.json").read_text())
    split = json.loads((toy_run / "split.json").read_text())
    assert train_module.finished_run(toy_run, split, results["config"])["steps"] == results["steps"]
    assert train_module.finished_run(toy_run.parent / "nothing-here", split) is None
    other_split = {**split, "val": split["val"][1:]}
    with pytest.raises(ValueError, match="another data split"):
        train_module.finished_run(toy_run, other_split)
    other = get_profile("tiny").to_dict()
    other["train"]["lr"] = 1.0
    with pytest.raises(ValueError, match=r"train\.lr"):
        train_module.finished_run(toy_run, split, other)


def test_evaluate_scores_the_runs_own_training_frames(toy_run, toy_dir):
    result = syndiff("evaluate", "--checkpoint", toy_run, "--data", toy_dir, "--split", "train", "--json")
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["n"] == len(json.loads((toy_run / "split.json").read_text())["train"])


@pytest.mark.parametrize("model", ["syndiff", "baseline"])
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, toy_dir, toy_run, model):
    """Both models share one training loop, so both survive a SIGKILL the same way."""
    out = tmp_path / "killed"
    resumable = [*RESUMABLE, BUDGET_FLAG[model], "50", "--model", model]
    args = [sys.executable, "-m", "syndiff_lib", "train", *resumable, "--data", str(toy_dir), "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 20:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert killed_at >= 20
    # Without --resume the run folder is protected; with other options it cannot be resumed.
    again = syndiff("train", "--profile", "tiny", "--model", model, "--data", toy_dir, "--out", out)
    assert again.returncode == 2 and "--resume" in again.stderr
    other = syndiff("train", *resumable, "--lr", "0.1", "--data", toy_dir, "--out", out, "--resume")
    assert other.returncode == 2 and "train.lr" in other.stderr
    resumed = syndiff("train", *resumable, "--data", toy_dir, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    match = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "resumed from step" in line]
    assert match and int(match[0].split("resumed from step ")[1].split()[0]) >= killed_at
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 50 and results["best_weights"] in ("raw", "ema") and results["model"] == model
    assert (out / "checkpoint" / "ema.safetensors").exists()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["ema_step"] == 50
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 50  # what the killed run logged after its checkpoint is gone
    assert 0 <= records[-1]["val_dice"] <= 1 and 0 <= records[-1]["val_dice_raw"] <= 1  # both weights scored
    assert not (out / "pipeline.tmp").exists() and (out / "pipeline").is_dir()


def test_checkpoint_round_trip_restores_optimizer_and_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    model.save_pretrained = lambda path: (Path(path).mkdir(parents=True),
                                          __import__("safetensors.torch").torch.save_file(model.state_dict(), Path(path) / "diffusion_pytorch_model.safetensors"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    generator = torch.Generator().manual_seed(5)
    ema = train_module.make_ema(list(model.parameters()), 0.9)
    for _ in range(2):  # the first step only copies the weights (the warm-up's decay is 0 there)
        with torch.no_grad():
            model.weight += 1.0
        ema.step(list(model.parameters()))
    checkpoint_module.save_checkpoint(tmp_path, {"m": model}, optimizer, lr_scheduler, generator, {"step": 7}, ema)
    expected_draw = torch.rand(3, generator=generator)
    model2 = torch.nn.Linear(3, 2)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    generator2 = torch.Generator()
    ema2 = train_module.make_ema(list(model2.parameters()), 0.9)
    state = checkpoint_module.load_checkpoint(tmp_path / "checkpoint", {"m": model2}, optimizer2,
                                         torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda s: 0.5), generator2, ema2)
    assert state["step"] == 7 and ema2.optimization_step == ema.optimization_step == 2
    torch.testing.assert_close(ema2.shadow_params[0], ema.shadow_params[0])
    assert not torch.allclose(ema2.shadow_params[0], model2.weight)  # the average, not a copy of the weights
    torch.testing.assert_close(model2.weight, model.weight)
    torch.testing.assert_close(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    torch.testing.assert_close(torch.rand(3, generator=generator2), expected_draw)
    assert not (tmp_path / "checkpoint.tmp").exists() and not (tmp_path / "checkpoint.old").exists()


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, toy_dir, monkeypatch):
    calls = {"n": 0}
    real_loss = train_module.training_loss

    def loss_that_breaks(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real_loss(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 12 else loss), parts

    monkeypatch.setattr(train_module, "training_loss", loss_that_breaks)
    profile = get_profile("tiny")
    profile.train.max_steps, profile.train.checkpoint_every, profile.train.val_every = 30, 5, 100
    with pytest.raises(train_module.TrainingError, match="last good checkpoint \\(step 10\\)"):
        train_module.train(profile, toy_dir, tmp_path / "nan", log=lambda *_: None)
    assert json.loads((tmp_path / "nan" / "checkpoint" / "state.json").read_text())["step"] == 10


# --- evaluate, segment, bench -------------------------------------------------------------------
def test_evaluate_json_last_line(toy_run, toy_dir):
    result = syndiff("evaluate", "--checkpoint", toy_run, "--data", toy_dir, "--split", "test", "--json")
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    for key in ("dice", "iou", "hd95", "nsd", "dice_std", "iou_std", "hd95_std", "nsd_std", "n"):
        assert key in summary
    split = json.loads((toy_run / "split.json").read_text())
    assert summary["n"] == len(split["test"])
    assert 0 <= summary["dice"] <= 1 and 0 <= summary["nsd"] <= 1


def test_segment_writes_png_masks_of_the_input_size(toy_run, toy_dir, tmp_path):
    result = syndiff("segment", "--checkpoint", toy_run, toy_dir / "images", "--out", tmp_path / "masks")
    assert result.returncode == 0, result.stderr
    written = sorted((tmp_path / "masks").glob("*.png"))
    assert len(written) == 48
    mask = np.asarray(Image.open(written[0]))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}


def test_bench_json_has_the_promised_fields(toy_run):
    result = syndiff("bench", "--checkpoint", toy_run, "--steps", "1,3", "--repeats", "2", "--json")
    assert result.returncode == 0, result.stderr
    out = last_json(result.stdout)
    assert set(out["latency_s"]) == {"1", "3"} and set(out["speedup"]) == {"1", "3"}
    assert set(out["components"]) == {"encoder_s", "unet_s", "decoder_s"}
    assert out["parts_sum_s"] == pytest.approx(sum(out["components"].values()))
    assert out["whole_over_parts"] > 0


# --- the real thing, when the data is here ------------------------------------------------------
def test_tiny_train_then_evaluate_on_clinicdb(clinicdb, tmp_path):
    out = tmp_path / "clinicdb-tiny"
    # A few steps: what is tested is the PraNet split and the metrics' plumbing, not the model.
    trained = syndiff("train", "--profile", "tiny", "--max-steps", "20", "--val-every", "10", "--data", clinicdb,
                      "--out", out)
    assert trained.returncode == 0, trained.stderr
    result = syndiff("evaluate", "--checkpoint", out, "--data", clinicdb, "--split", "test", "--json")
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    assert summary["n"] == 62  # the PraNet test split
    assert np.isfinite([summary[k] for k in ("dice", "iou", "hd95", "nsd")]).all()
    split = json.loads((out / "split.json").read_text())
    assert split["scheme"] == "pranet" and len(split["test"]) == 62
    print("tiny ClinicDB run:", json.dumps(summary))


def test_baseline_trains_saves_safetensors_and_evaluates(tmp_path, toy_dir):
    """The equal-budget yardstick: `syndiff train --model baseline` makes a run folder that
    `evaluate` loads like a SynDiff run; diffusion-only options are refused, not ignored."""
    out = tmp_path / "baseline"
    result = syndiff("train", "--model", "baseline", "--profile", "tiny", "--baseline-steps", "6", "--val-every", "3",
                     "--ema-decay", "0.9", "--data", toy_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == results["step_budget"] == 6 and 0 <= results["val_dice"] <= 1 and "hardware" in results
    assert (out / "pipeline" / "baseline_config.json").exists()
    assert list(out.rglob("*.safetensors")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_dice" in r] == [3, 6]
    assert all(0 <= r["val_dice_raw"] <= 1 for r in records if "val_dice" in r)  # raw and averaged weights, both scored
    assert results["best_weights"] in ("raw", "ema")
    scored = syndiff("evaluate", "--checkpoint", out, "--data", toy_dir, "--split", "test", "--json")
    assert scored.returncode == 0, scored.stderr
    assert last_json(scored.stdout)["n"] == len(json.loads((out / "split.json").read_text())["test"])
    assert results["recipe"] is None and results["code"] and results["seconds_per_step"] > 0
    multi = syndiff("evaluate", "--checkpoint", out, "--data", toy_dir, "--steps", "50")
    assert multi.returncode == 2 and "baseline has no diffusion" in multi.stderr
    flags = syndiff("train", "--model", "baseline", "--profile", "tiny", "--lambda-latent", "0", "--data", toy_dir,
                    "--out", tmp_path / "b2")
    assert flags.returncode == 2 and "baseline has no diffusion" in flags.stderr and not (tmp_path / "b2").exists()
    budget = syndiff("train", "--model", "baseline", "--profile", "tiny", "--max-steps", "6", "--data", toy_dir,
                     "--out", tmp_path / "b3")  # SynDiff's budget, which a baseline run would silently ignore
    assert budget.returncode == 2 and "--baseline-steps" in budget.stderr and not (tmp_path / "b3").exists()


# --- options that mean what they say, run folders that are never overwritten --------------------
@pytest.mark.parametrize("flags, message", [
    (["--t-infer", "50"], "differs from the fixed training timestep"),
    (["--t-infer", "5000"], "differs from the fixed training timestep"),
    (["--fixed-timestep", "-3"], "must be in 0..999, got -3"),
    (["--decoder-loss-fraction", "0.5"], "no effect while decoder_loss_weight is 0"),
    (["--max-steps", "0"], "--max-steps: must be an integer >= 1, got 0"),
    (["--baseline-steps", "-1"], "--baseline-steps: must be an integer >= 1, got -1"),
])
def test_contradictory_options_are_refused_before_any_work(tmp_path, toy_dir, flags, message):
    result = syndiff("train", "--profile", "tiny", *flags, "--data", toy_dir, "--out", tmp_path / "run")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_recorded_recipe_names_every_override(toy_run):
    from syndiff_lib.config import describe_recipe, get_profile, profile_overrides

    results = json.loads((toy_run / "results.json").read_text())
    assert results["recipe"] == "default" and results["overrides"]["train.max_steps"] == 40
    profile = get_profile("tiny")
    profile.diffusion.lambda_latent = 0.0
    assert describe_recipe(profile.diffusion) == "default (lambda_latent=0.0)"
    assert profile_overrides(profile) == {"diffusion.lambda_latent": 0.0}
    assert describe_recipe(get_profile("tiny", recipe="paper").diffusion) == "paper"


def test_a_folder_of_other_files_or_a_missing_checkpoint_is_refused(tmp_path, toy_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("my own notes")
    (mine / "thesis.tex").write_text("\\documentclass{article}")
    result = syndiff("train", *FAST, "--data", toy_dir, "--out", mine)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (mine / "results.json").read_text() == "my own notes"
    fresh = syndiff("train", *FAST, "--data", toy_dir, "--out", tmp_path / "new", "--resume")
    assert fresh.returncode == 2 and "no checkpoint to resume" in fresh.stderr
