"""The plumbing every notebook of the book shares: one `setup` call, and reusing a finished run.

Each notebook (01 to 07) opens with a `parameters` cell that papermill may override, then one
hidden cell that imports what the page needs and calls

    ctx = setup(profile, data, seed, device, artifacts)

`setup` turns progress bars off, makes inline figures JPEG, finds the book's folder, fills in
the data default and the artifacts folder (how the notebooks pass results on), loads the
profile, and prints what the run is made of: versions, parameters, hardware.

Notebook 04 calls `train_or_reuse` to train a model, or to show one that `syndiff train` made
before with the same profile and split. The "Explore" cells call `explore`: a widget in
Jupyter or Colab, one plain call when scripts/run_notebooks.py executes the book.

Nothing here imports model code when the module loads: torch and diffusers are imported
inside `setup`, after progress bars are off (tqdm reads TQDM_DISABLE when it is imported).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
from pathlib import Path

from .config import Profile, get_profile

# Before anything imports tqdm (diffusers and huggingface_hub do): no progress-bar widgets
# in saved notebooks. setup() sets it again, for a reader who imported tqdm first.
os.environ.setdefault("TQDM_DISABLE", "1")

BATCH_ENV = "SYNDIFF_BATCH"  # set by scripts/run_notebooks.py for the kernels it starts: no reader is there
BOOK_MARKER = "_config.yml"  # the file that marks the book's folder (Jupyter Book's config)
FIGURE_FORMAT = ("jpeg", {"quality": 85})  # photos: JPEG keeps the saved notebooks small


@dataclasses.dataclass
class NotebookContext:
    """What a notebook's later cells use, as `setup` resolved it (every notebook)."""

    profile: str  # the profile's name, as the parameters cell gave it
    cfg: Profile  # that profile (syndiff_lib/config.py), a fresh copy
    data: str  # a dataset folder, or "toy" for the built-in toy dataset
    seed: int  # every random draw of the notebook starts from it
    device: str  # "cpu" or "cuda"
    artifacts: Path  # the folder the notebooks pass results through (created)
    root: Path  # the book's folder: the first one up from the working directory with _config.yml

    @property
    def data_name(self) -> str:
        """The data set in words, for the book's text: "the toy dataset" or the folder's name."""
        return "the toy dataset" if self.data == "toy" else Path(self.data).name


def default_data() -> str:
    """$SYNDIFF_DATA if set, else the built-in toy dataset ("toy"): `setup`'s default for ``data``."""
    return os.environ.get("SYNDIFF_DATA") or "toy"


def find_root(start=None) -> Path:
    """The first of ``start`` (default: the working directory) and its parents that holds
    _config.yml; ``start`` itself if none does (a notebook copied out of the book)."""
    start = Path(start or Path.cwd()).resolve()
    return next((p for p in (start, *start.parents) if (p / BOOK_MARKER).exists()), start)


def hardware_line() -> str:
    """One short line (it must fit the book's column): CPU, cores, torch's threads, GPU, OS,
    Python (the last line `setup` prints)."""
    import torch

    from .train import cpu_model  # here, not at the top: train imports torch and diffusers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"hardware {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"GPU {gpu}; {platform.system()} {platform.machine()}, python {platform.python_version()}")


def use_jpeg_figures() -> bool:
    """Inline matplotlib figures as JPEG, when running in an IPython kernel; True if it did (`setup`)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    if get_ipython() is None:  # plain Python (a test, a script): nothing to configure
        return False
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    name, options = FIGURE_FORMAT
    set_matplotlib_formats(name, pil_kwargs=options)
    return True


def setup(profile: str = "tiny", data=None, seed: int = 0, device: str = "cpu", artifacts=None, *,
          root=None, log=print) -> NotebookContext:
    """Resolve a notebook's parameters and print what the run is made of (every notebook).

    ``data`` None means $SYNDIFF_DATA, else the toy dataset; ``artifacts`` None means
    ROOT/artifacts/<profile>, where ROOT is the book's folder (see `find_root`, from ``root``
    or the working directory). The artifacts folder is created. Prints three lines through
    ``log``: versions, parameters, hardware.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")
    import diffusers
    import torch

    import syndiff_lib

    use_jpeg_figures()
    cfg = get_profile(profile)  # first: an unknown profile fails before anything is created
    root = find_root(root)
    data = str(data or default_data())
    artifacts = Path(artifacts) if artifacts else root / "artifacts" / profile
    artifacts.mkdir(parents=True, exist_ok=True)
    log(f"syndiff_lib {syndiff_lib.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    log(f"profile {profile} | data {data} | seed {seed} | device {device}")
    log(hardware_line())
    return NotebookContext(profile=profile, cfg=cfg, data=data, seed=seed, device=device,
                           artifacts=artifacts, root=root)


def explore(function, **controls):
    """``ipywidgets.interact(function, **controls)`` for a reader in Jupyter or Colab; in a
    batch run ($SYNDIFF_BATCH, set by scripts/run_notebooks.py) one call of ``function`` at
    the controls' values instead, so the cell's code still runs. No reader can move a slider
    there, and interact's Output widget makes nbclient send on the shell channel it waits on,
    which can leave the cell waiting until its timeout, or forever without one
    (https://github.com/jupyter/nbclient/issues/312).

    ``controls``: ipywidgets controls (``IntSlider``, ``Dropdown``, ...) by argument name.
    """
    if os.environ.get(BATCH_ENV):
        return function(**{name: control.value for name, control in controls.items()})
    import ipywidgets

    ipywidgets.interact(function, **controls)
    return None


def train_or_reuse(cfg: Profile, data, run_dir, split: dict, *, model: str = "syndiff", reuse: bool = False,
                   vae_dir=None, seed: int = 0, log=print) -> tuple[dict, bool]:
    """Train ``model`` into ``run_dir`` afresh, or, with ``reuse``, keep a finished run there (notebook 04).

    A finished run is kept only if it is a ``model`` run made with this profile (``cfg``) and
    ``split``; for another one, ValueError (from `train.finished_run`) rather than the wrong model.
    Otherwise ``run_dir`` is emptied, the autoencoder of ``vae_dir`` (if given and present) is
    copied into it, and `train.train(cfg, data, run_dir, model=model, seed=seed)` runs: the
    same call as ``syndiff train --model MODEL --profile P``. Returns (results, reused).

    A run whose model predicts no polyp pixel on any validation frame (results.json
    "predicts_no_polyp") raises ValueError, reused or new: the book must not publish it.
    """
    from .train import finished_run, train  # late: loading this module stays light

    run_dir = Path(run_dir)
    results = finished_run(run_dir, split, cfg.to_dict()) if reuse else None
    if results is not None and results.get("model", model) != model:  # same profile, other model: say so
        raise ValueError(f"{run_dir} holds a {results['model']} run, not a {model} run; move it away or train again")
    reused = results is not None
    if reused:
        log(f"reusing the finished {model} run in {run_dir} ({results['steps']} steps, "
            f"{results['train_seconds'] / 60:.1f} min of training, at commit {results.get('code', 'unknown')[:7]})")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time the notebook runs
        if vae_dir is not None and Path(vae_dir).exists():
            shutil.copytree(vae_dir, run_dir / "vae")  # the frozen (E, D) this run shares
        results = train(cfg, data, run_dir, model=model, seed=seed, log=log)
    if results.get("predicts_no_polyp"):
        raise ValueError(f"{run_dir / 'results.json'}: the {model} model predicts no polyp pixel on any validation "
                         "frame, so it has not learned to segment; train it longer (more steps) before publishing")
    return results, reused
