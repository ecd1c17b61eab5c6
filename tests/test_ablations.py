"""The ablation grid of notebook 06: the tables as data, the row profiles, and one small grid run."""

import json

import pytest
import torch

from syndiff_lib import ablations
from syndiff_lib.autoencoder import build_autoencoder
from syndiff_lib.config import get_profile
from syndiff_lib.data import load_dataset, make_split
from syndiff_lib.synthesis import CopyPasteBackend, load_prompts, synthesize, write_manifest

ALL_ROWS = ablations.TABLE2 + ablations.TABLE3


def test_every_reused_model_is_trained_by_some_row():
    keys = [r["key"] for r in ALL_ROWS if "key" in r]
    assert len(keys) == len(set(keys))
    for row in ALL_ROWS:
        assert ("key" in row) != ("model" in row), row["row"]
        if row.get("model") is not None:
            assert row["model"] in keys, row["row"]


def test_row_profiles_change_only_their_fields():
    base = get_profile("tiny")
    budget = ablations.row_budget(base, steps=7, minutes=2.0)
    rows = {r.get("key"): r for r in ablations.TABLE2}
    frozen = ablations.row_profile("tiny", rows["frozen"], budget)
    noise_only = ablations.row_profile("tiny", rows["noise_only"], budget)
    traditional = ablations.row_profile("tiny", rows["traditional"], budget)
    assert frozen.train.freeze_encoder and not frozen.train.flip_augment
    assert frozen.train.max_steps == 7 and frozen.train.max_minutes == 2.0 and frozen.train.val_every == 7
    assert noise_only.diffusion.lambda_latent == 0.0 and not noise_only.train.freeze_encoder
    assert traditional.train.rotate_augment and traditional.train.flip_augment
    assert traditional.diffusion == base.diffusion and traditional.unet == base.unet
    assert ablations.row_budget(base) == {}  # no budget: the profile's own


def test_scaled_count():
    assert ablations.scaled_count(100, 488, 1000) == 100
    assert ablations.scaled_count(100, 244, 1000) == 50
    assert ablations.scaled_count(200, 488, 30) == 30  # never more than exist


def test_run_grid_trains_keyed_rows_reuses_the_others_and_scores_all(tmp_path):
    size = get_profile("tiny").train.image_size
    synthetic = tmp_path / "synthetic"
    toy = load_dataset("toy", size=size)
    synthesize(CopyPasteBackend(), toy, synthetic, 4, prompts=load_prompts(), seed=0)
    write_manifest(synthetic, 4)
    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    build_autoencoder(get_profile("tiny").autoencoder).save_pretrained(vae_dir)  # untrained is enough here
    split = make_split([s.id for s in toy], "random", seed=0)
    test = [s for s in toy if s.id in set(split["test"])]
    rows = [
        {"row": "real", "paper": (1, 1), "key": "real", "train": ablations.NO_FLIPS},
        {"row": "text", "paper": (2, 2), "key": "text", "synthetic": 488, "diffusion": {"lambda_latent": 0.0}},
        {"row": "text, 3 steps", "paper": (3, 3), "model": "text", "steps": 3},
        {"row": "not run", "paper": (4, 4), "model": None},
    ]
    budget = ablations.row_budget(get_profile("tiny"), steps=2)
    scores, added = ablations.run_grid(rows, "tiny", "toy", tmp_path / "grid", test, vae_dir=vae_dir,
                                       synthetic_dir=synthetic, n_train=len(split["train"]), budget=budget,
                                       log=lambda message: None)
    assert sorted(scores) == ["real", "text", "text, 3 steps"]
    assert all(0 <= s["dice"] <= 1 and s["n"] == len(test) for s in scores.values())
    assert scores["text, 3 steps"]["steps"] == 3
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["real", "synthetic-4", "text"]
    assert added == {"real": 0, "text": 4}
    text = json.loads((tmp_path / "grid" / "text" / "results.json").read_text())
    assert text["synthetic"][0]["n"] == 4 and text["steps"] == 2
    assert text["config"]["diffusion"]["lambda_latent"] == 0.0
    table = ablations.table_rows(rows, scores)
    assert table[3] == ["not run", 4, 4, None, None]
    assert table[0][3] == pytest.approx(100 * scores["real"]["dice"])


def test_inference_study_rows_and_seed_spread():
    from syndiff_lib.config import get_profile
    from syndiff_lib.pipeline import SynDiffPipeline
    from syndiff_lib.diffusion import make_scheduler
    from syndiff_lib.autoencoder import ImageEncoder
    from syndiff_lib.unet import build_unet

    profile = get_profile("tiny", "paper")  # epsilon-prediction: the noise seed matters
    torch.manual_seed(0)
    vae = build_autoencoder(profile.autoencoder)
    pipe = SynDiffPipeline(vae, ImageEncoder.from_vae(vae), build_unet(profile.unet, 8), make_scheduler(profile.diffusion), profile)
    toy = load_dataset("toy", size=64)[:3]
    rows = ablations.inference_study(pipe, {"val": toy[:1], "test": toy[1:]}, t_values=(50, 999),
                                     ddim_steps=(2,), seeds=(0, 1), log=lambda line: None)
    assert [(r["steps"], r["t_infer"]) for r in rows] == [(1, 50), (1, 999), (2, "DDIM")]
    for r in rows:
        assert 0 <= r["test_dice"] <= 1 and r["val_dice_std"] >= 0 and "test_iou_std" in r


def test_synthetic_set_size_scales_the_largest_table3_row():
    assert ablations.synthetic_set_size(488) == 200
    assert ablations.synthetic_set_size(244) == 100
    assert ablations.synthetic_set_size(5) == 8  # at least enough for Fig. 2's grid
    assert ablations.synthetic_set_size(488, 17) == 17  # the notebook's parameter wins


def test_scaled_counts_are_the_paper_counts_of_both_tables():
    assert ablations.scaled_counts(488, 1000) == {20: 20, 50: 50, 100: 100, 200: 200}
    assert ablations.scaled_counts(244, 60) == {20: 10, 50: 25, 100: 50, 200: 60}


def test_grid_budget_defaults_and_its_description():
    tiny, cpu = get_profile("tiny"), get_profile("cpu")
    budget = ablations.grid_budget(tiny)
    assert budget == ablations.row_budget(tiny, steps=ablations.TINY_GRID_STEPS)
    assert ablations.budget_text(tiny, budget) == f"at most {ablations.TINY_GRID_STEPS} steps or {tiny.train.max_minutes:g} min"
    assert ablations.is_smoke_budget(tiny, budget)
    assert ablations.grid_budget(tiny, 40, 2.5) == ablations.row_budget(tiny, 40, 2.5)
    assert ablations.grid_budget(cpu) == {}  # the profile's own budget
    assert ablations.budget_text(cpu, {}) == f"at most {cpu.train.max_steps} steps or {cpu.train.max_minutes:g} min"
    assert not ablations.is_smoke_budget(cpu, {})
    assert ablations.is_smoke_budget(cpu, ablations.grid_budget(cpu, steps=30))


STUDY = [
    {"steps": 1, "t_infer": 50, "val_dice": 0.6, "val_dice_std": 0.01, "test_dice": 0.9, "test_dice_std": 0.02,
     "test_iou": 0.5, "test_iou_std": 0.03},
    {"steps": 1, "t_infer": 999, "val_dice": 0.7, "val_dice_std": 0.0, "test_dice": 0.4, "test_dice_std": 0.0,
     "test_iou": 0.3, "test_iou_std": 0.0},
    {"steps": 10, "t_infer": "DDIM", "val_dice": 0.8, "val_dice_std": 0.0, "test_dice": 0.8, "test_dice_std": 0.0,
     "test_iou": 0.7, "test_iou_std": 0.0},
]


def test_best_single_step_is_chosen_on_validation_among_single_steps():
    assert ablations.best_single_step(STUDY)["t_infer"] == 999  # not t = 50, the best on test; not DDIM
    assert ablations.best_single_step(STUDY, split="test")["t_infer"] == 50
    with pytest.raises(ValueError, match="single-step"):
        ablations.best_single_step(STUDY[2:])


def test_study_table_rows():
    rows = ablations.study_table_rows(STUDY)
    assert rows[0] == ["1 step, t = 50", "0.600 ± 0.010", "0.900 ± 0.020", "0.500 ± 0.030"]
    assert rows[2][0] == "DDIM, 10 steps"
