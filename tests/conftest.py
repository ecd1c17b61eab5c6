"""Shared test settings: CPU only, no network, no progress bars, one autoencoder cache."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tries to download fails instead
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def shared_clinicdb() -> Path | None:
    """CVC-ClinicDB from $SYNDIFF_DATA or ../shared/data beside the checkout, if present."""
    candidates = [os.environ.get("SYNDIFF_DATA"), REPO.parent / "shared" / "data" / "cvc-clinicdb"]
    for c in candidates:
        if c and (Path(c) / "images").is_dir():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def clinicdb() -> Path:
    path = shared_clinicdb()
    if path is None:
        pytest.skip("CVC-ClinicDB is not here (set SYNDIFF_DATA or put it in ../shared/data/cvc-clinicdb)")
    return path


@pytest.fixture(scope="session", autouse=True)
def autoencoder_cache(tmp_path_factory):
    """One autoencoder cache for the session, so each dataset's autoencoder trains once."""
    if "SYNDIFF_CACHE" not in os.environ:
        os.environ["SYNDIFF_CACHE"] = str(tmp_path_factory.mktemp("syndiff-cache"))
    return Path(os.environ["SYNDIFF_CACHE"])


@pytest.fixture(scope="module")
def tiny_pipe():
    """An untrained SynDiffPipeline of the tiny profile (one per test module): equality checks
    between runtimes and speed options need no training."""
    from syndiff_lib.config import get_profile
    from syndiff_lib.pipeline import SynDiffPipeline

    return SynDiffPipeline.from_profile(get_profile("tiny"))


@pytest.fixture(scope="module")
def tiny_run(tiny_pipe, tmp_path_factory):
    """A run folder holding ``tiny_pipe`` as a trained run holds its pipeline."""
    run = tmp_path_factory.mktemp("run")
    tiny_pipe.save_pretrained(run / "pipeline")
    return run
