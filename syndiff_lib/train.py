"""Training: the frozen autoencoder first, then the segmenter with accelerate.

Taught in notebook 04 (training). One call, :func:`train`, does a whole run:

1. Load and check the data, make the split (saved as ``split.json``; test is never touched).
2. The frozen autoencoder (E, D): pretrained (``full``) or trained here on the training
   images and masks (``tiny``/``cpu``), cached under ``$SYNDIFF_CACHE`` (default
   ``~/.cache/syndiff``) so runs with the same data and config share it.
3. The segmenter: E_phi (initialised from E) and the U-Net, AdamW, the dual loss of Eq. 6.
   accelerate handles devices, mixed precision and several GPUs (``accelerate launch``).
4. Every ``val_every`` steps: validation Dice; the best model so far is written to
   ``RUN_DIR/pipeline`` (model selection on validation only).
5. Every ``checkpoint_every`` steps: a resumable checkpoint (safetensors only: models,
   optimizer, learning-rate schedule, step, RNG state), written to a temporary folder and
   then renamed, so a kill during a save never spoils the last good checkpoint.
6. With ``ema_decay`` > 0 (the ``cpu`` profile), an exponential moving average of the
   weights is kept beside them; each validation scores both, and the better one is kept.

Run folder::

    RUN_DIR/split.json  log.jsonl  results.json  vae/  pipeline/  checkpoint/
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import data as data_lib
from .autoencoder import (
    ImageEncoder, build_autoencoder, encode_mask, finetune_mask_decoder, mask_round_trip_dice, train_autoencoder,
)
from .config import Profile
from .diffusion import make_scheduler, training_loss
from .metrics import dice_score
from .pipeline import SynDiffPipeline
from .unet import build_unet


def log_line(message: str) -> None:
    """Progress messages: printed and flushed at once, so a log file shows them live."""
    print(message, flush=True)


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a NaN loss); the message says what was kept."""


# --- data --------------------------------------------------------------------------------
def samples_to_tensors(samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples -> images [N, 3, S, S] in [-1, 1] and masks [N, 1, S, S] in {0, 1}."""
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))[:, None].float()
    return images, masks


def prepare_data(data, image_size: int, seed: int = 0, fold: int | None = None, folds: int = 5, synthetic=()):
    """Load + check the data and split it. Returns (train_samples, val_samples, split dict).

    ``data`` is a folder (CVC-ClinicDB, Kvasir-SEG or image/mask pairs) or None/"toy" for
    the built-in toy dataset. Synthetic folders are added to the training split only.
    """
    samples = data_lib.load_dataset(data, size=image_size)
    by_id = {s.id: s for s in samples}
    ids = list(by_id)
    is_toy = data is None or str(data) == "toy"
    scheme = "random" if is_toy else data_lib.default_scheme(data)
    if fold is not None:
        if scheme != "pranet":
            raise ValueError("--fold needs CVC-ClinicDB (its video sequences define the folds)")
        scheme = "kfold"
    split = data_lib.make_split(ids, scheme, fold=fold or 0, folds=folds, seed=seed)
    split["data"] = "toy" if is_toy else str(data)
    train_samples = [by_id[i] for i in split["train"]]
    val_samples = [by_id[i] for i in split["val"]]
    split["synthetic"] = []
    for folder in synthetic:
        extra = data_lib.load_dataset(folder, size=image_size)
        for s in extra:
            s.source = "synthetic"
        train_samples += extra
        split["synthetic"].append({"folder": str(folder), "n": len(extra)})
    return train_samples, val_samples, split


def random_batch(images, masks, batch_size: int, generator: torch.Generator, flip: bool, rotate: bool = False):
    """A random batch with optional random flips, and optionally the paper's "traditional"
    augmentation (flips + a small rotation, synthesis.traditional_augment), the same for
    image and mask."""
    idx = torch.randint(len(images), (batch_size,), generator=generator)
    x, y = images[idx], masks[idx]  # [B, 3, S, S], [B, 1, S, S]
    if rotate:
        from .synthesis import traditional_augment

        for i in range(batch_size):
            image = ((x[i].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()  # [S, S, 3]
            image, mask = traditional_augment(image, y[i, 0].bool().numpy(), generator)
            x[i] = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1
            y[i, 0] = torch.from_numpy(mask.copy()).float()
    elif flip:
        for dim in (2, 3):
            do = torch.rand(batch_size, generator=generator) < 0.5
            x[do], y[do] = x[do].flip(dim), y[do].flip(dim)
    return x, y


# --- the frozen autoencoder --------------------------------------------------------------
MASK_DECODER_FIELDS = ("mask_decoder_steps", "mask_decoder_lr")  # the second stage: keyed on its own


def autoencoder_cache_key(profile: Profile, train_ids, data, seed: int, stage: str = "autoencoder") -> str:
    """The cache key of the trained (E, D) ("autoencoder") or of it after the mask-decoder
    fine-tune ("mask_decoder"); the first stage's key ignores the second stage's settings,
    so changing those reuses the cached first stage."""
    cfg = dict(profile.autoencoder.__dict__)
    if stage == "autoencoder":
        cfg = {k: v for k, v in cfg.items() if k not in MASK_DECODER_FIELDS}
    where = str(data) if str(data) == "toy" else str(Path(data).resolve())  # one key whatever the working folder
    blob = json.dumps([cfg, profile.train.image_size, sorted(train_ids), where, seed], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_autoencoder(profile: Profile, images, masks, train_ids, data, run_dir: Path, seed: int, log=log_line) -> AutoencoderKL:
    """The frozen (E, D): from the run folder, the cache, the hub (``full``), or trained now.

    Trained here in two cached stages: (E, D) on crops of images and masks
    (:func:`train_autoencoder`), then, if ``mask_decoder_steps`` > 0, D alone on whole masks
    (:func:`finetune_mask_decoder`).
    """
    cfg = profile.autoencoder
    if (run_dir / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(run_dir / "vae")
    elif cfg.pretrained is not None:
        vae = build_autoencoder(cfg)
    else:
        cache = Path(os.environ.get("SYNDIFF_CACHE", Path.home() / ".cache" / "syndiff")) / "autoencoders"
        first = cache / autoencoder_cache_key(profile, train_ids, data, seed)
        second = cache / autoencoder_cache_key(profile, train_ids, data, seed, stage="mask_decoder")
        if cfg.mask_decoder_steps > 0 and (second / "config.json").exists():
            log(f"autoencoder: using the cached one (with its fine-tuned mask decoder) in {second}")
            vae = AutoencoderKL.from_pretrained(second)
        else:
            complete = True
            if (first / "config.json").exists():
                log(f"autoencoder: using the cached one in {first}")
                vae = AutoencoderKL.from_pretrained(first)
            else:
                log(f"autoencoder: training it on {len(images)} training images and masks (no pretrained weights offline)")
                torch.manual_seed(seed)  # the initial weights
                vae = build_autoencoder(cfg)
                summary = train_autoencoder(vae, images, masks, cfg, torch.Generator().manual_seed(seed), log)
                log(f"autoencoder: {summary['steps']} steps in {summary['seconds']} s")
                if cfg.unit_std_latents:
                    set_unit_std_scaling(vae, masks, log)
                complete = summary["steps"] == cfg.train_steps
                if complete:  # only a complete training is shared with later runs
                    vae.save_pretrained(first)
                else:
                    log(f"autoencoder: stopped by its {cfg.train_minutes}-minute cap before {cfg.train_steps} steps; not cached")
            if cfg.mask_decoder_steps > 0:
                log(f"autoencoder: fine-tuning D on whole training masks for {cfg.mask_decoder_steps} steps (L1 + soft Dice)")
                summary = finetune_mask_decoder(vae, masks, cfg, torch.Generator().manual_seed(seed), log)
                log(f"autoencoder: mask decoder {summary['steps']} steps in {summary['seconds']} s")
                if complete:
                    vae.save_pretrained(second)
        vae.save_pretrained(run_dir / "vae")
    vae.eval().requires_grad_(False)
    return vae


def set_unit_std_scaling(vae: AutoencoderKL, masks: torch.Tensor, log=log_line) -> float:
    """LDM's rule for a new autoencoder: scaling_factor s = 1 / std(E(X)), so z_0 has unit
    variance like the noise n it is mixed with in Eq. 1 (SD's 0.18215 was measured on SD's
    own image latents and would leave our mask latents at std ~0.2)."""
    vae.register_to_config(scaling_factor=1.0)
    with torch.no_grad():
        std = torch.cat([encode_mask(vae, masks[i : i + 32]) for i in range(0, len(masks), 32)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"autoencoder: scaling_factor = 1 / {std:.4f} = {1 / std:.4f}")
    return 1.0 / std


def progress_bar(total: int, desc: str, initial: int = 0, show: bool = True) -> tqdm:
    """A tqdm bar only where it helps: on the main process and on a terminal (disable=None).
    TQDM_DISABLE=1 silences it everywhere (an explicit disable=None would override that
    variable, and in a notebook the bar is a widget the saved page cannot show)."""
    quiet = not show or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return tqdm(total=total, initial=initial, desc=desc, disable=quiet or None)


# --- the learning rate -------------------------------------------------------------------
def budget_cosine_schedule(optimizer, warmup_steps: int, max_steps: int, budget_s: float, elapsed):
    """Linear warm-up, then a cosine decay to 0 over whichever budget ends first.

    progress = max(step / max_steps, elapsed() / budget_s): on a fast machine the step budget
    ends the run and this is the usual cosine schedule; on a slow one the wall-clock budget
    does, and the learning rate still reaches 0 at its end instead of stopping half-way down.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, max(step / max_steps, elapsed() / budget_s if budget_s > 0 else 0.0))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- an average of the weights (EMA) ------------------------------------------------------
def make_ema(parameters: list, decay: float) -> EMAModel | None:
    """diffusers' EMAModel over ``parameters``, or None when ``decay`` is 0.

    With its warm-up the decay at step k is 1 - (1 + k)^(-2/3), capped at ``decay``: 0.99 at
    step 1000, 0.995 at 3000. Early on the average forgets fast (the first weights are bad),
    later it smooths over a few hundred steps of the noisy, high-learning-rate updates.
    """
    if decay <= 0:
        return None
    return EMAModel(parameters, decay=decay, use_ema_warmup=True, power=2 / 3, foreach=True)


@contextmanager
def averaged_weights(ema: EMAModel | None, parameters: list):
    """Inside the block the models hold the averaged weights, after it their own again
    (nothing changes when ``ema`` is None)."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


# --- checkpoints: safetensors only, written atomically ----------------------------------
def _optimizer_to_safetensors(optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for param_id, entries in state["state"].items():
        for name, value in entries.items():
            key = f"{param_id}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][key] = value
    return tensors, meta


def _optimizer_from_safetensors(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, models: dict, optimizer, lr_scheduler, generator, state: dict, ema=None) -> None:
    """Write RUN_DIR/checkpoint atomically: build checkpoint.tmp, then swap it in by renames."""
    final, tmp, old = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        model.save_pretrained(tmp / name)
    tensors, meta = _optimizer_to_safetensors(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    save_file({"generator": generator.get_state(), "torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    meta["lr_scheduler"] = lr_scheduler.state_dict()
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    if ema is not None:
        save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, tmp / "ema.safetensors")
        state = state | {"ema_step": ema.optimization_step}
    (tmp / "state.json").write_text(json.dumps(state))  # written last: marks the folder complete
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a kill between the two renames leaves .tmp or .old)."""
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        if (run_dir / name / "state.json").exists():
            return run_dir / name
    return None


def load_checkpoint(path: Path, models: dict, optimizer, lr_scheduler, generator, ema=None) -> dict:
    for name, model in models.items():
        weights = load_file(path / name / "diffusion_pytorch_model.safetensors")
        model.load_state_dict(weights)
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_safetensors(load_file(path / "optimizer.safetensors"), meta))
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    rng = load_file(path / "rng.safetensors")
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    state = json.loads((path / "state.json").read_text())
    if ema is not None:
        if not (path / "ema.safetensors").exists():
            raise TrainingError(f"{path} has no EMA weights (it was written with ema_decay = 0); resume with the same config")
        shadow = load_file(path / "ema.safetensors")
        for i, p in enumerate(ema.shadow_params):
            p.copy_(shadow[str(i)])
        ema.optimization_step = state["ema_step"]
    return state


# --- validation ---------------------------------------------------------------------------
def finished_run(run_dir, split: dict, config: dict | None = None) -> dict | None:
    """The results of a finished run in ``run_dir`` that may stand in for training again, or
    None if there is none. Raises ValueError if the run is of another split (or, given
    ``config``, another configuration): reusing it would silently score the wrong model.
    Notebook 04 uses it to show a run the command line made."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").exists():
        return None
    results = json.loads((run_dir / "results.json").read_text())
    theirs = data_lib.load_split(run_dir / "split.json")
    if any(theirs[k] != split[k] for k in ("train", "val", "test")):
        raise ValueError(f"{run_dir} holds a run on another data split; move it away or train again")
    config = None if config is None else json.loads(json.dumps(config))  # tuples -> lists, as results.json has them
    if config is not None and results["config"] != config:
        changed = sorted(f"{part}.{k}" for part in config for k in config[part] if isinstance(config[part], dict)
                         and results["config"].get(part, {}).get(k) != config[part][k])
        raise ValueError(f"{run_dir} holds a run of another configuration (differs in {', '.join(changed) or 'its name'}); "
                         "move it away or train again")
    return results


TRAIN_FIT_FRAMES = 64  # training frames scored at each validation (the fit diagnostic)


def validation_dice(pipe: SynDiffPipeline, samples, seed: int = 0) -> float:
    """Mean single-step Dice on the validation samples (fixed noise seed)."""
    out = pipe([s.image for s in samples], generator=torch.Generator().manual_seed(seed), output_size="model")
    return float(np.mean([dice_score(p, s.mask) for p, s in zip(out.masks, samples)]))


def hardware_info(accelerator: Accelerator | None = None) -> dict:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if accelerator is not None:
        info["num_processes"] = accelerator.num_processes
        info["mixed_precision"] = accelerator.mixed_precision
    return info


# --- the run ------------------------------------------------------------------------------
def train(
    profile: Profile,
    data,
    out,
    *,
    seed: int = 0,
    resume: bool = False,
    fold: int | None = None,
    folds: int = 5,
    synthetic=(),
    log=log_line,
) -> dict:
    """Train a SynDiff segmenter; returns the results dict also written to results.json."""
    run_dir = Path(out)
    t_start = time.time()
    tcfg = profile.train
    accelerator = Accelerator(mixed_precision=tcfg.mixed_precision)
    is_main = accelerator.is_main_process

    # 1. Data and split.
    train_samples, val_samples, split = prepare_data(data, tcfg.image_size, seed, fold, folds, synthetic)
    if run_dir.exists() and not resume and find_checkpoint(run_dir) is not None:
        raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        data_lib.save_split(split, run_dir / "split.json")
        (run_dir / "profile.json").write_text(json.dumps(profile.to_dict(), indent=2))
    log(f"data: {len(train_samples)} train, {len(val_samples)} val ({split['scheme']} split); test is not used in training")
    images, masks = samples_to_tensors(train_samples)

    # 2. The frozen autoencoder.
    vae = get_autoencoder(profile, images, masks, split["train"], split["data"], run_dir, seed, log).to(accelerator.device)
    val_masks = samples_to_tensors(val_samples)[1] if val_samples else masks[:16]
    round_trip = mask_round_trip_dice(vae, val_masks.to(accelerator.device)).mean().item()
    log(f"autoencoder: mask round-trip Dice on validation {round_trip:.3f} (the ceiling for this run)")

    # 3. The segmenter: E_phi initialised from E, and the U-Net.
    torch.manual_seed(seed)
    image_encoder = ImageEncoder.from_vae(vae)
    image_encoder.requires_grad_(not tcfg.freeze_encoder)
    unet = build_unet(profile.unet, tcfg.image_size // 8)
    scheduler = make_scheduler(profile.diffusion)
    trainable = list(unet.parameters()) + ([] if tcfg.freeze_encoder else list(image_encoder.parameters()))
    optimizer = torch.optim.AdamW(trainable, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    clock = {"start": time.time(), "before": 0.0}  # training seconds, across resumes

    def elapsed():
        return clock["before"] + time.time() - clock["start"]

    lr_scheduler = budget_cosine_schedule(optimizer, tcfg.lr_warmup_steps, tcfg.max_steps, tcfg.max_minutes * 60, elapsed)
    unet, image_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, image_encoder, optimizer, lr_scheduler)
    models = {"unet": unet, "image_encoder": image_encoder}
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)
    ema = make_ema(trainable, tcfg.ema_decay)

    state = {"step": 0, "elapsed_s": 0.0, "best_val_dice": -1.0, "best_step": None, "best_weights": None}
    checkpoint = find_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, {k: accelerator.unwrap_model(m) for k, m in models.items()}, optimizer, lr_scheduler,
                                generator, ema)
        log(f"resumed from step {state['step']} ({checkpoint.name})")
    elif resume:
        log("no checkpoint found: starting from step 0")

    def make_pipeline():
        return SynDiffPipeline(vae, accelerator.unwrap_model(image_encoder), accelerator.unwrap_model(unet), scheduler, profile)

    def save_state():
        if is_main:
            state["elapsed_s"] = elapsed()
            save_checkpoint(run_dir, {k: accelerator.unwrap_model(m) for k, m in models.items()}, optimizer, lr_scheduler, generator,
                            state, ema)

    # A fixed sample of training frames, scored beside validation: not for model selection,
    # but to tell underfitting (both low) from overfitting (train high, validation low).
    fit_samples = [train_samples[i] for i in np.random.default_rng(seed).permutation(len(train_samples))[:TRAIN_FIT_FRAMES]]

    def score_and_keep(weights: str, record: dict):
        """Validation Dice of the weights the models hold now; they become RUN_DIR/pipeline
        if no earlier validation scored higher."""
        pipe = make_pipeline()
        dice = validation_dice(pipe, val_samples, seed) if val_samples else float("nan")
        if is_main and dice > state["best_val_dice"]:
            state["best_val_dice"], state["best_step"], state["best_weights"] = dice, state["step"], weights
            tmp = run_dir / "pipeline.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            pipe.save_pretrained(tmp)
            shutil.rmtree(run_dir / "pipeline", ignore_errors=True)
            tmp.rename(run_dir / "pipeline")
            record["best"] = weights
        return dice, pipe

    def validate():
        record = {"step": state["step"]}
        if ema is not None:  # the raw weights too: the comparison that justifies the average
            record["val_dice_raw"], _ = score_and_keep("raw", record)
        with averaged_weights(ema, trainable):
            record["val_dice"], pipe = score_and_keep("raw" if ema is None else "ema", record)
            record["train_dice"] = validation_dice(pipe, fit_samples, seed)
        for model in models.values():
            model.train()
        image_encoder.train(not tcfg.freeze_encoder)
        record["elapsed_s"] = round(elapsed(), 1)
        write_log(record)
        raw = f" (raw weights {record['val_dice_raw']:.3f})" if ema is not None else ""
        log(f"step {state['step']}: validation Dice {record['val_dice']:.3f}{raw}, training-frame Dice {record['train_dice']:.3f} "
            f"(best {state['best_val_dice']:.3f} at step {state['best_step']}, {state['best_weights']} weights)")

    log_file = run_dir / "log.jsonl"

    def write_log(record):
        if is_main:
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    clock["start"], clock["before"] = time.time(), state["elapsed_s"]

    # 4. The loop.
    budget_s = tcfg.max_minutes * 60
    unet.train()
    image_encoder.train(not tcfg.freeze_encoder)
    bar = progress_bar(tcfg.max_steps, "train", initial=state["step"], show=is_main)
    stop_reason = "max_steps"
    while state["step"] < tcfg.max_steps:
        if elapsed() > budget_s:
            stop_reason = "time budget"
            break
        pixels, mask = random_batch(images, masks, tcfg.batch_size, generator, tcfg.flip_augment, tcfg.rotate_augment)
        pixels, mask = pixels.to(accelerator.device), mask.to(accelerator.device)
        with accelerator.autocast():
            mask_latent = encode_mask(vae, mask)  # z_0 [B, 4, h, w], frozen E
            image_latent = image_encoder(pixels)  # z_c [B, 4, h, w], trainable E_phi
            loss, parts = training_loss(unet, scheduler, profile.diffusion, image_latent, mask_latent, generator, vae, mask)
        if not torch.isfinite(loss):
            kept = find_checkpoint(run_dir)
            raise TrainingError(
                f"the loss became {loss.item()} at step {state['step'] + 1}; stopping. "
                + (f"The last good checkpoint (step {json.loads((kept / 'state.json').read_text())['step']}) is kept in {kept}."
                   if kept else "No checkpoint had been written yet.")
                + " Try a lower --lr or mixed_precision='no'."
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients and tcfg.grad_clip:
            accelerator.clip_grad_norm_(trainable, tcfg.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(trainable)
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if state["step"] % tcfg.log_every == 0:
            write_log({"step": state["step"], "loss": loss.item(), **parts, "lr": lr_scheduler.get_last_lr()[0], "elapsed_s": round(elapsed(), 1)})
        if state["step"] % tcfg.val_every == 0:
            validate()
        if state["step"] % tcfg.checkpoint_every == 0:
            save_state()
    bar.close()
    if state["step"] % tcfg.val_every != 0:  # the last steps since the last validation
        validate()
    save_state()

    # 5. Results.
    results = {
        "model": "syndiff",
        "profile": profile.name,
        "recipe": profile.diffusion.recipe,
        "config": profile.to_dict(),
        "seed": seed,
        "data": split["data"],
        "split": {k: len(split[k]) for k in ("train", "val", "test")} | {"scheme": split["scheme"], "fold": split.get("fold")},
        "synthetic": split["synthetic"],
        "steps": state["step"],
        "stop_reason": stop_reason,
        "train_seconds": round(state["elapsed_s"], 1),
        "wall_seconds_this_session": round(time.time() - t_start, 1),
        "best_step": state["best_step"],
        "best_weights": state.get("best_weights"),
        "val_dice": state["best_val_dice"],
        "autoencoder_round_trip_dice_val": round_trip,
        "hardware": hardware_info(accelerator),
    }
    if is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log(f"done: {state['step']} steps ({stop_reason}); best validation Dice {state['best_val_dice']:.3f} at step {state['best_step']}")
    return results

