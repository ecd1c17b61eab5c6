"""Reliability: every bad input gets one clear error before any work starts, nothing a user
wrote is overwritten, and a resumed run is the run it says it is.

One test (or a few) per row of the issue a hostile-but-realistic user filed, named after what
the user expects. No test here trains a model beyond a few steps: the models are untrained
pipelines built from the tiny profile, or runs of a handful of steps on the toy data.
"""

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from syndiff_lib import cli, data, notebook, train as train_module
from syndiff_lib.autoencoder import autoencoder_cache_key
from syndiff_lib.checkpoint import made_once
from syndiff_lib.config import CPU, TINY, get_profile
from syndiff_lib.data import DataError, make_toy_dataset, write_toy_dataset
from syndiff_lib.pipeline import SynDiffOutput, SynDiffPipeline, images_to_tensor, segment_files
from syndiff_lib.train import TrainingError, clear_run, open_run_dir, run_lock


def syndiff(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syndiff_lib", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})


def refused(result, *words) -> bool:
    """The user-facing refusal: exit code 2, an "error:" line holding every word, no traceback."""
    return (result.returncode == 2 and "Traceback" not in result.stderr and "error:" in result.stderr
            and all(w in result.stderr for w in words))


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), n=24, size=64, seed=0)


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    """A run folder holding an untrained tiny pipeline: enough to load, segment and evaluate."""
    run = tmp_path_factory.mktemp("untrained") / "run"
    SynDiffPipeline.from_profile(get_profile("tiny")).save_pretrained(run / "pipeline")
    return run


def numbered_dataset(root: Path, ids, mask_scale: int = 255) -> Path:
    """Toy frames saved as <id>.png: a ClinicDB-like layout (ids 1..612 mean ClinicDB frames)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, sample in zip(ids, make_toy_dataset(n=len(ids), size=32, seed=3)):
        Image.fromarray(sample.image).save(root / "images" / f"{i}.png")
        Image.fromarray(sample.mask.astype(np.uint8) * mask_scale).save(root / "masks" / f"{i}.png")
    return root


# --- 1. label conventions: {0, 1} masks, all-empty masks ----------------------------------------
def test_masks_stored_as_zero_one_are_refused_with_the_fix(tmp_path):
    root = numbered_dataset(tmp_path / "zero-one", range(1, 5), mask_scale=1)
    with pytest.raises(DataError, match=r"masks/1\.png and 3 more mask\(s\).*saved as \{0, 255\}"):
        data.check_dataset(root)
    result = syndiff("data", "check", root)
    assert refused(result, "{0, 255}", "multiply by 255")
    trained = syndiff("train", "--profile", "tiny", "--data", root, "--out", tmp_path / "run")
    assert refused(trained, "{0, 255}") and not (tmp_path / "run").exists()


def test_a_data_set_whose_masks_are_all_empty_is_refused(tmp_path):
    root = numbered_dataset(tmp_path / "empty", range(1, 5), mask_scale=0)
    with pytest.raises(DataError, match="all 4 masks are empty"):
        data.check_dataset(root)
    good = numbered_dataset(tmp_path / "good", range(1, 5))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(good / "masks" / "2.png")  # one empty frame is fine
    assert data.check_dataset(good)["n_empty_masks"] == 1


# --- 2. a split without validation frames ---------------------------------------------------------
def test_a_subset_that_leaves_no_validation_frames_is_refused_before_training(tmp_path):
    root = numbered_dataset(tmp_path / "ids1-40", range(1, 41))  # two sequences: none can be spared for val
    result = syndiff("train", "--profile", "tiny", "--data", root, "--out", tmp_path / "run")
    assert refused(result, "leaves no validation frames") and not (tmp_path / "run").exists()


# --- 3, 4, load: segment --------------------------------------------------------------------------
def test_two_inputs_that_would_write_one_mask_are_refused_and_hidden_files_skipped(tmp_path, untrained_run):
    images = tmp_path / "in"
    images.mkdir()
    frame = make_toy_dataset(n=1, size=32)[0].image
    for name in ("51.png", "51.jpg", ".hidden.png"):
        Image.fromarray(frame).save(images / name)
    result = syndiff("segment", "--checkpoint", untrained_run, images, "--out", tmp_path / "masks")
    assert refused(result, "51.jpg", "51.png", "same mask") and not (tmp_path / "masks").exists()
    (images / "51.jpg").unlink()
    result = syndiff("segment", "--checkpoint", untrained_run, images, "--out", tmp_path / "masks")
    assert result.returncode == 0, result.stderr
    assert "wrote 1 masks" in result.stdout and sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["51.png"]
    assert "not writable" not in result.stderr  # 15: PyTorch's warning about read-only NumPy arrays is gone
    again = syndiff("segment", "--checkpoint", untrained_run, images, "--out", tmp_path / "masks")
    assert refused(again, "51.png", "already exists")  # a mask written before is never overwritten


def test_segment_out_naming_a_file_is_refused_before_any_inference(tmp_path, untrained_run, toy_dir):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    result = syndiff("segment", "--checkpoint", untrained_run, toy_dir / "images", "--out", out)
    assert refused(result, str(out), "--out") and out.read_text() == "mine"


def test_segment_streams_batch_by_batch(tmp_path, monkeypatch):
    """Read a batch, segment it, write it: the first masks are on disk before the last
    image is read, and no call sees more than one batch (constant memory)."""
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(files[-1])
    out = tmp_path / "out"
    out.mkdir()
    written_when_read = []
    real_read = data.read_image
    monkeypatch.setattr(data, "read_image", lambda f: written_when_read.append(len(list(out.iterdir()))) or real_read(f))

    class Pipe:  # stands in for SynDiffPipeline: check_inputs + __call__
        calls = []

        def check_inputs(self, *args):
            pass

        def __call__(self, images, steps, t_infer, generator, batch_size):
            self.calls.append(len(images))
            return SynDiffOutput(masks=np.ones((len(images), 8, 8), bool), soft_masks=np.ones((len(images), 8, 8)))

    assert segment_files(Pipe(), files, out, batch_size=2) == 5
    assert Pipe.calls == [2, 2, 1] and written_when_read == [0, 0, 2, 2, 4]
    assert sorted(p.name for p in out.iterdir()) == [f"{i}.png" for i in range(5)]


def test_a_full_disk_while_writing_is_one_line_naming_the_mask(tmp_path, untrained_run, monkeypatch, capsys):
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(make_toy_dataset(n=1, size=32)[0].image).save(images / "7.png")

    def full_disk(self, target, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code = cli.main(["segment", "--checkpoint", str(untrained_run), str(images), "--out", str(tmp_path / "masks")])
    err = capsys.readouterr().err
    assert code == 2 and "disk is full" in err and str(tmp_path / "masks" / "7.png") in err and "Traceback" not in err


# --- 5, 6, 7: flags checked at the boundary -----------------------------------------------------
@pytest.mark.parametrize("verb", ["evaluate", "segment"])
@pytest.mark.parametrize("flags, words", [
    (["--t-infer", "-3"], ["--t-infer", "got -3"]),
    (["--t-infer", "5000"], ["--t-infer", "0..999", "got 5000"]),
    (["--steps", "0"], ["--steps", "got 0"]),
])
def test_timesteps_and_step_counts_out_of_range_are_refused_before_any_inference(tmp_path, untrained_run, verb,
                                                                                  flags, words):
    # The data and the images do not exist: an error about them would mean the flag was checked too late.
    where = ["--data", tmp_path / "no-data"] if verb == "evaluate" else [tmp_path / "img.png", "--out", tmp_path / "o"]
    if verb == "segment":
        Image.fromarray(make_toy_dataset(n=1, size=32)[0].image).save(tmp_path / "img.png")
    result = syndiff(verb, "--checkpoint", untrained_run, *where, *flags)
    assert refused(result, *words) and not (tmp_path / "o").exists()


def test_the_pipeline_checks_its_inputs_before_encoding(monkeypatch):
    pipe = SynDiffPipeline.from_profile(get_profile("tiny"))
    monkeypatch.setattr(pipe, "encode_images", lambda pixels: pytest.fail("inference started"))
    image = make_toy_dataset(n=1, size=32)[0].image
    for kwargs, message in (({"t_infer": -3}, r"0\.\.999, got -3"), ({"t_infer": 5000}, "got 5000"),
                            ({"num_inference_steps": 0}, "got 0"), ({"output_size": "big"}, "output_size")):
        with pytest.raises(ValueError, match=message):
            pipe(image, **kwargs)


@pytest.mark.parametrize("steps", ["0", "-1", "1,x"])
def test_bench_refuses_step_counts_below_one(steps):
    result = syndiff("bench", "--random-init", "tiny", f"--steps={steps}")
    assert refused(result, "--steps")


# --- 8-11: a run folder is a run folder -----------------------------------------------------------
def fake_run(run: Path, profile=None, checkpoint: bool = True) -> Path:
    """The files a tiny run writes at its start (and its first checkpoint, if asked)."""
    run.mkdir(parents=True)
    (run / "profile.json").write_text(json.dumps((profile or get_profile("tiny")).to_dict(), indent=2))
    data.save_split(data.build_split("toy"), run / "split.json")
    (run / "log.jsonl").write_text("")
    if checkpoint:
        (run / "checkpoint").mkdir()
        (run / "checkpoint" / "state.json").write_text(json.dumps({"step": 100}))
    return run


def test_train_refuses_a_folder_of_the_users_files_even_with_overwrite(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = syndiff("train", "--profile", "tiny", "--max-steps", "2", "--data", "toy", "--out", mine, *extra)
        assert refused(result, str(mine), "not a run folder")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "mine"


def test_overwrite_replaces_a_run_and_keeps_a_prepared_autoencoder(tmp_path):
    split, profile = data.build_split("toy"), get_profile("tiny")
    run = fake_run(tmp_path / "run")
    with pytest.raises(TrainingError, match="--overwrite to replace it"):
        open_run_dir(run, profile, split, resume=False)
    assert open_run_dir(run, profile, split, resume=False, overwrite=True) is None
    clear_run(run)
    assert list(run.iterdir()) == []
    (run / "vae").mkdir()  # a prepared autoencoder is not a run: --overwrite leaves it
    clear_run(run)
    assert [p.name for p in run.iterdir()] == ["vae"]
    with pytest.raises(TrainingError, match="give one of them"):
        open_run_dir(run, profile, split, resume=True, overwrite=True)


@pytest.mark.parametrize("flags, words", [
    (["--lr", "0.1"], ["another configuration", "train.lr"]),
    (["--max-steps", "600"], ["another configuration", "train.max_steps"]),
    (["--profile", "cpu"], ["another configuration", "train.image_size"]),
])
def test_resume_with_other_options_is_refused_and_nothing_is_rewritten(tmp_path, flags, words):
    run = fake_run(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = syndiff("train", "--profile", "tiny", *flags, "--data", "toy", "--out", run, "--resume")
    assert refused(result, str(run), *words)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_with_nothing_to_resume_is_an_error_that_says_what_to_do(tmp_path):
    fresh = syndiff("train", "--profile", "tiny", "--data", "toy", "--out", tmp_path / "new", "--resume")
    assert refused(fresh, "no checkpoint to resume") and not (tmp_path / "new").exists()
    killed = fake_run(tmp_path / "killed", checkpoint=False)  # killed before its first checkpoint
    with pytest.raises(TrainingError, match="no checkpoint to resume.*--overwrite"):
        open_run_dir(killed, get_profile("tiny"), data.build_split("toy"), resume=True)


# --- concurrency: the lock ---------------------------------------------------------------------
def test_a_run_lock_is_exclusive_released_and_a_dead_holders_lock_is_taken_over(tmp_path):
    lock = tmp_path / "lock"
    with run_lock(tmp_path):
        assert json.loads(lock.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(TrainingError, match=f"process {os.getpid()}.*is training into"):
            with run_lock(tmp_path):
                pass
    assert not lock.exists()
    with pytest.raises(RuntimeError):  # released when the run fails, too
        with run_lock(tmp_path):
            raise RuntimeError("boom")
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with run_lock(tmp_path):  # its process is gone: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": "another-machine"}))
    with pytest.raises(TrainingError, match="another-machine"):  # cannot tell: respected
        with run_lock(tmp_path):
            pass


def test_a_second_training_on_a_locked_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # a live trainer
    result = syndiff("train", "--profile", "tiny", "--max-steps", "2", "--data", "toy", "--out", run)
    assert refused(result, "is training into") and [p.name for p in run.iterdir()] == ["lock"]


# --- 12, 13, 14: expected failures are one line, bugs show their traceback ---------------------
def test_a_truncated_safetensors_file_is_one_line_naming_it(tmp_path, untrained_run):
    run = tmp_path / "run"
    SynDiffPipeline.from_profile(get_profile("tiny")).save_pretrained(run / "pipeline")
    weights = run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = syndiff("evaluate", "--checkpoint", run, "--data", "toy")
    assert refused(result, str(weights), "cannot be read", "train again")
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_edited_config_json_is_one_line_naming_the_folder_without_the_misleading_hint(tmp_path):
    run = tmp_path / "run"
    SynDiffPipeline.from_profile(get_profile("tiny")).save_pretrained(run / "pipeline")
    config = run / "pipeline" / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"block_out_channels": [16, 32]}))
    result = syndiff("evaluate", "--checkpoint", run, "--data", "toy")
    assert refused(result, str(run / "pipeline" / "unet"), "do not fit its config.json")
    assert "ignore_mismatched_sizes" not in result.stderr


def test_offline_hub_access_is_one_line(tmp_path):
    result = syndiff("synth", "--backend", "sdxl", "--data", "toy", "--out", tmp_path / "out", "--n", "1",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hub-cache")})
    assert refused(result, "stable-diffusion-xl", "hub cannot be reached")


def test_an_unexpected_exception_shows_its_traceback_and_says_it_is_a_bug(monkeypatch, capsys):
    def broken(args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "cmd_data_check", broken)
    code = cli.main(["data", "check", "anywhere"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "KeyError" in err and "this is a bug in syndiff" in err


# --- 15: no warning about read-only arrays -------------------------------------------------------
def test_read_only_images_convert_without_a_warning():
    image = make_toy_dataset(n=1, size=32)[0].image
    image.flags.writeable = False  # as np.asarray(PIL image) gives them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = images_to_tensor([image], 32)
    assert x.shape == (1, 3, 32, 32)


# --- 16: results do not depend on how busy the machine is ---------------------------------------
def test_every_profile_is_defined_by_steps_with_generous_caps():
    for profile in (TINY, CPU):
        t, a = profile.train, profile.autoencoder
        assert 1 <= t.baseline_steps < t.max_steps  # the baseline's steps are dearer: fewer for equal compute
        assert t.max_minutes >= 60 and a.train_minutes >= 60  # caps, not budgets
    assert (TINY.train.max_steps, CPU.train.max_steps) == (300, 3000)


def test_syndiff_sets_passive_openmp_before_torch_loads(monkeypatch):
    loaded = subprocess.run([sys.executable, "-c", "import sys, syndiff_lib.cli; print('torch' in sys.modules)"],
                            capture_output=True, text=True)
    assert loaded.stdout.strip() == "False"  # so main() can still set the variable before torch reads it
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli.main(["bench", "--random-init", "tiny", "--steps", "0"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice is kept
    cli.main(["bench", "--random-init", "tiny", "--steps", "0"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def capped_profile():
    """Tiny, with both wall-clock caps far below what any step takes: a run on a machine so
    busy that the caps end it."""
    profile = get_profile("tiny")
    profile.autoencoder.train_steps, profile.autoencoder.train_minutes = 20, 1e-9
    profile.train.max_steps, profile.train.max_minutes = 20, 1e-9
    return profile


def test_a_run_the_clock_stops_says_so_loudly_and_is_not_published(tmp_path):
    lines = []
    results = train_module.train(capped_profile(), "toy", tmp_path / "run", log=lines.append)
    assert results["stop_reason"] == "wall-clock cap" and results["complete"] is False
    assert results["autoencoder_complete"] is False and results["steps"] < 20
    assert any(line.startswith("WARNING: the autoencoder's") for line in lines)
    assert any(line.startswith("WARNING: the 1e-09-minute wall-clock cap") for line in lines)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["complete"] is False and saved["stop_reason"] == "wall-clock cap"
    assert not (tmp_path / "run" / "lock").exists()  # released at the end
    key = autoencoder_cache_key(capped_profile(), data.build_split("toy")["train"], "toy", 0)
    assert not (Path(os.environ["SYNDIFF_CACHE"]) / "autoencoders" / key).exists()  # a capped autoencoder is not shared
    # The notebook refuses to show a run whose model marks no polyp anywhere, reused or new.
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    for flag in (True, False):
        (tmp_path / "run" / "results.json").write_text(json.dumps(saved | {"predicts_no_polyp": flag}))
        if flag:
            with pytest.raises(ValueError, match="predicts no polyp"):
                notebook.train_or_reuse(capped_profile(), "toy", tmp_path / "run", split, reuse=True)
        else:
            assert notebook.train_or_reuse(capped_profile(), "toy", tmp_path / "run", split, reuse=True)[1]


def test_a_model_that_predicts_no_polyp_is_flagged(tmp_path, monkeypatch):
    run = tmp_path / "run"
    SynDiffPipeline.from_profile(get_profile("tiny")).save_pretrained(run / "pipeline")
    samples = make_toy_dataset(n=3, size=64)
    monkeypatch.setattr(train_module, "segment", lambda pipe, images, **kw: SynDiffOutput(
        masks=np.zeros((len(images), 8, 8), bool), soft_masks=np.zeros((len(images), 8, 8))))
    assert train_module.predicts_no_polyp(run / "pipeline", samples)
    monkeypatch.setattr(train_module, "segment", lambda pipe, images, **kw: SynDiffOutput(
        masks=np.eye(8, dtype=bool)[None].repeat(len(images), 0), soft_masks=np.zeros((len(images), 8, 8))))
    assert not train_module.predicts_no_polyp(run / "pipeline", samples)


def test_the_baseline_trains_its_own_step_budget(tmp_path):
    profile = get_profile("tiny")
    profile.train.max_steps, profile.train.baseline_steps, profile.train.val_every = 7, 3, 3
    results = train_module.train(profile, "toy", tmp_path / "baseline", model="baseline", log=lambda line: None)
    assert results["steps"] == results["step_budget"] == 3 and results["complete"] is True


def test_a_damaged_checkpoint_is_one_error_naming_its_folder(tmp_path):
    from syndiff_lib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    class Saveable(torch.nn.Module):  # save_pretrained in diffusers' layout, as the run's models have
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def save_pretrained(self, folder):
            from safetensors.torch import save_file
            Path(folder).mkdir(parents=True)
            save_file(self.state_dict(), Path(folder) / "diffusion_pytorch_model.safetensors")

    models = {"unet": Saveable(model)}
    save_checkpoint(tmp_path, models, optimizer, schedule, torch.Generator(), {"step": 3})
    weights = tmp_path / "checkpoint" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"checkpoint: the checkpoint cannot be loaded.*--overwrite"):
        load_checkpoint(tmp_path / "checkpoint", models, optimizer, schedule, torch.Generator())


def test_a_cache_entry_another_process_is_making_is_waited_for_not_made_twice(tmp_path):
    """Two grid lanes on one fold need one autoencoder: the second waits for the first's."""
    entry = tmp_path / "autoencoders" / "key"
    with made_once(entry, log=lambda *_: None):  # nobody else: this process makes it, holding the lock
        assert json.loads(entry.with_name("key.lock").read_text())["pid"] == os.getpid()
    assert not entry.with_name("key.lock").exists()

    lock = entry.with_name("key.lock")
    maker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live maker
    try:
        lock.write_text(json.dumps({"pid": maker.pid, "host": socket.gethostname()}))
        said, done = [], threading.Event()

        def second_lane():
            with made_once(entry, log=said.append, poll=0.05):
                done.set()

        lane = threading.Thread(target=second_lane)
        lane.start()
        assert not done.wait(0.5) and said  # waiting, and saying so once
        entry.mkdir()
        (entry / "config.json").write_text("{}")  # the maker is saving it: its weights may not be written yet
        assert not done.wait(0.3)
        lock.unlink()  # the maker is done
        assert done.wait(5)
        lane.join()
        assert len(said) == 1 and not lock.exists()
    finally:
        maker.kill()
        maker.wait()
    (entry / "config.json").unlink()
    with made_once(entry, log=lambda *_: None):  # the maker died before saving: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
