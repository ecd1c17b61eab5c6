"""The notebooks' shared plumbing: setup() and train_or_reuse() (syndiff_lib/notebook.py)."""

import json
import os
from pathlib import Path

import pytest

from syndiff_lib import notebook
from syndiff_lib.config import get_profile
from syndiff_lib.data import save_split


@pytest.fixture
def book(tmp_path, monkeypatch):
    """A book folder (it has _config.yml) whose notebooks/ folder is the working directory."""
    (tmp_path / "book" / "notebooks").mkdir(parents=True)
    (tmp_path / "book" / "_config.yml").write_text("title: a test book\n")
    monkeypatch.chdir(tmp_path / "book" / "notebooks")
    monkeypatch.delenv("SYNDIFF_DATA", raising=False)
    return tmp_path / "book"


def test_setup_fills_the_defaults_and_creates_the_artifacts_folder(book, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    lines = []
    ctx = notebook.setup("tiny", None, 3, "cpu", None, log=lines.append)
    assert ctx.profile == "tiny" and ctx.cfg == get_profile("tiny")
    assert ctx.data == "toy" and ctx.data_name == "the toy dataset"
    assert (ctx.seed, ctx.device) == (3, "cpu")
    assert ctx.root == book.resolve()
    assert ctx.artifacts == book.resolve() / "artifacts" / "tiny" and ctx.artifacts.is_dir()
    assert os.environ["TQDM_DISABLE"] == "1"
    assert len(lines) == 3
    assert lines[0].startswith("syndiff_lib ") and "torch" in lines[0] and "diffusers" in lines[0]
    assert lines[1] == "profile tiny | data toy | seed 3 | device cpu"
    assert lines[2].startswith("hardware ") and "cores" in lines[2]


def test_setup_takes_data_from_the_environment_and_an_explicit_artifacts_folder(book, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNDIFF_DATA", str(tmp_path / "cvc-clinicdb"))
    ctx = notebook.setup("cpu", artifacts=tmp_path / "elsewhere" / "cpu", log=lambda line: None)
    assert ctx.data == str(tmp_path / "cvc-clinicdb") and ctx.data_name == "cvc-clinicdb"
    assert ctx.artifacts == tmp_path / "elsewhere" / "cpu" and ctx.artifacts.is_dir()
    assert ctx.cfg.name == "cpu"
    explicit = notebook.setup("tiny", "toy", artifacts=tmp_path / "a", log=lambda line: None)
    assert explicit.data == "toy"  # a parameter wins over $SYNDIFF_DATA


def test_setup_refuses_an_unknown_profile_before_creating_anything(book):
    with pytest.raises(ValueError, match="unknown profile"):
        notebook.setup("huge", log=lambda line: None)
    assert not (book / "artifacts").exists()


def test_find_root_falls_back_to_the_start_folder(tmp_path):
    assert notebook.find_root(tmp_path) == tmp_path.resolve()
    (tmp_path / "_config.yml").write_text("")
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert notebook.find_root(tmp_path / "a" / "b") == tmp_path.resolve()


def test_default_data(monkeypatch):
    monkeypatch.delenv("SYNDIFF_DATA", raising=False)
    assert notebook.default_data() == "toy"
    monkeypatch.setenv("SYNDIFF_DATA", "")
    assert notebook.default_data() == "toy"
    monkeypatch.setenv("SYNDIFF_DATA", "/data/kvasir")
    assert notebook.default_data() == "/data/kvasir"


SPLIT = {"scheme": "random", "seed": 0, "fold": None, "folds": 5, "data": "toy",
         "train": ["a", "b"], "val": ["c"], "test": ["d"]}


def finished(run_dir: Path, cfg, split=SPLIT) -> dict:
    """A run folder as train() leaves it, as far as finished_run reads it."""
    run_dir.mkdir(parents=True)
    save_split(split, run_dir / "split.json")
    results = {"model": "syndiff", "config": cfg.to_dict(), "steps": 5, "train_seconds": 60.0, "val_dice": 0.5}
    (run_dir / "results.json").write_text(json.dumps(results))
    return results


def test_train_or_reuse_keeps_a_finished_run_of_the_same_profile_and_split(tmp_path, monkeypatch):
    import syndiff_lib.train

    monkeypatch.setattr(syndiff_lib.train, "train", lambda *a, **k: pytest.fail("must not train"))
    cfg = get_profile("tiny")
    expected = finished(tmp_path / "run", cfg)
    lines = []
    results, reused = notebook.train_or_reuse(cfg, "toy", tmp_path / "run", SPLIT, reuse=True, log=lines.append)
    assert reused and results == json.loads(json.dumps(expected))
    assert "reusing" in lines[0]
    with pytest.raises(ValueError, match="another configuration"):
        notebook.train_or_reuse(get_profile("cpu"), "toy", tmp_path / "run", SPLIT, reuse=True)
    with pytest.raises(ValueError, match="another data split"):
        notebook.train_or_reuse(cfg, "toy", tmp_path / "run", SPLIT | {"test": ["a"]}, reuse=True)
    with pytest.raises(ValueError, match="not a baseline run"):
        notebook.train_or_reuse(cfg, "toy", tmp_path / "run", SPLIT, model="baseline", reuse=True)


def test_train_or_reuse_trains_afresh_with_the_same_profile_and_the_shared_autoencoder(tmp_path, monkeypatch):
    import syndiff_lib.train

    calls = []

    def fake_train(profile, data, out, **kwargs):
        calls.append((profile, data, Path(out), kwargs))
        assert sorted(p.name for p in Path(out).iterdir()) == ["vae"]  # only the prepared autoencoder
        return {"steps": 1}

    monkeypatch.setattr(syndiff_lib.train, "train", fake_train)
    cfg = get_profile("tiny")
    finished(tmp_path / "baseline", cfg)  # an old run: without reuse it is replaced
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    log = lambda message: None  # noqa: E731
    results, reused = notebook.train_or_reuse(cfg, "toy", tmp_path / "baseline", SPLIT, model="baseline",
                                              seed=4, vae_dir=tmp_path / "vae", log=log)
    assert (results, reused) == ({"steps": 1}, False)
    profile, data, out, kwargs = calls[0]
    assert profile is cfg and data == "toy" and out == tmp_path / "baseline"
    assert kwargs == {"model": "baseline", "seed": 4, "log": log}
    # no finished run and no autoencoder to copy: train() gets an absent folder
    calls.clear()
    monkeypatch.setattr(syndiff_lib.train, "train", lambda profile, data, out, **kwargs: calls.append(out) or {})
    notebook.train_or_reuse(cfg, "toy", tmp_path / "new", SPLIT, reuse=True, vae_dir=tmp_path / "missing")
    assert calls == [tmp_path / "new"] and not (tmp_path / "new").exists()


def test_explore_is_a_widget_for_a_reader_and_one_plain_call_in_a_batch_run(monkeypatch):
    import ipywidgets

    calls, shown = [], []
    monkeypatch.setattr(ipywidgets, "interact", lambda function, **controls: shown.append(sorted(controls)))
    slider = ipywidgets.IntSlider(value=7, min=0, max=9)
    monkeypatch.setenv(notebook.BATCH_ENV, "1")
    assert notebook.explore(lambda t: calls.append(t) or t * 2, t=slider) == 14
    assert calls == [7] and shown == []  # no widget where no reader is
    monkeypatch.delenv(notebook.BATCH_ENV)
    notebook.explore(lambda t: calls.append(t), t=slider)
    assert shown == [["t"]] and calls == [7]  # the widget calls it, when the reader moves it


def test_the_notebook_runner_tells_its_kernels_they_run_in_a_batch():
    runner = (Path(__file__).resolve().parents[1] / "scripts" / "run_notebooks.py").read_text()
    assert "os.environ[BATCH_ENV] = \"1\"" in runner
    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")):
        assert "widgets.interact(" not in path.read_text(), f"{path.name}: use notebook.explore"
