"""Training: one loop for both models, the SynDiff segmenter and the pixel-space baseline.

Taught in notebook 04 (training). One call, :func:`train`, does a whole run:

1. Load and check the data, make the split (``data.build_split``, saved as ``split.json``;
   test is never touched); every frame and its mask become the model's square by
   ``TrainConfig.fit`` (stretched, or letterboxed: padded to a square first). The run folder
   must be new, empty, or hold only a prepared ``vae/`` (``--overwrite`` replaces a run, never
   other files; ``--resume`` continues one started with the same options). ``RUN_DIR/lock``
   keeps a second training out while one writes the folder.
2. SynDiff only: the frozen autoencoder (E, D), pretrained (``full``) or trained here on the
   training images and masks (``tiny``/``cpu``; stretched whatever the fit), cached under
   ``$SYNDIFF_CACHE`` (default ``~/.cache/syndiff``) so runs with the same data and config
   share it.
3. The model as a :class:`Trainee`: its modules, its trainable parameters, its loss on a
   batch, and the pipeline that scores it. SynDiff: E_phi (initialised from E) and the U-Net
   with the dual loss of Eq. 6; the baseline: a pixel U-Net with BCE + soft Dice.
4. The shared loop, :func:`fit`: AdamW, a cosine learning rate over the step budget,
   accelerate for devices, mixed precision and several GPUs. The wall-clock cap only stops a
   stuck run: it says so loudly and marks ``results.json`` ``"complete": false``.
   Every ``val_every`` steps: validation Dice (of the raw and, with ``ema_decay`` > 0, the
   averaged weights); the best model so far is written to ``RUN_DIR/pipeline`` (model
   selection on validation only). Every ``checkpoint_every`` steps: a resumable checkpoint
   (safetensors only: models, optimizer, learning-rate schedule, step, RNG state, EMA).
   Both are written to a temporary folder and then renamed, so a kill during a save never
   spoils the last good copy. A loss that is not finite stops the run with a message.
5. A model that predicts no polyp pixel on any validation frame is flagged
   (``"predicts_no_polyp": true``): notebook 04 refuses to show it.

Equal budgets: the baseline trains ``baseline_steps``, the profile's count of baseline steps
that cost what SynDiff's ``max_steps`` cost (measured with ``syndiff bench --train-step``), so
``syndiff train --model baseline`` and notebook 04 give it the same compute by construction.

Run folder::

    RUN_DIR/profile.json  split.json  log.jsonl  results.json  vae/  pipeline/  checkpoint/  lock
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import data as data_lib
from .augment import augment_batch
from .autoencoder import ImageEncoder, encode_mask, get_autoencoder, mask_round_trip_dice
from .baseline import bce_dice_loss, build_baseline_unet
from .checkpoint import find_checkpoint, load_checkpoint, read_lock, replace_folder, save_checkpoint, take_lock
from .config import Profile, check_profile, recipe_warning, describe_recipe, profile_overrides
from .diffusion import make_scheduler, training_loss
from .metrics import dice_score
from .pipeline import BaselinePipeline, SynDiffPipeline, load_pipeline, segment
from .unet import build_unet

MODELS = ("syndiff", "baseline")


def log_line(message: str) -> None:
    """Progress messages: printed and flushed at once, so a log file shows them live."""
    print(message, flush=True)


def warn(log, message: str) -> None:
    """A line a reader must not miss (a capped or useless run): upper-case tag, own line."""
    log(f"WARNING: {message}")


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a NaN loss); the message says what was kept."""


# --- data --------------------------------------------------------------------------------
def samples_to_tensors(samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples -> images [N, 3, S, S] in [-1, 1] and masks [N, 1, S, S] in {0, 1}."""
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))[:, None].float()
    return images, masks


def check_synthetic_source(folder, split: dict) -> None:
    """Refuse a synthetic folder made from frames this run validates or tests on.

    ``syndiff synth`` writes the split whose training frames it drew from (FOLDER/split.json).
    On the same data, those training frames must all be training frames of this run too:
    otherwise a synthetic polyp or background would carry a held-out frame into training.
    """
    source = Path(folder) / "split.json"
    if not source.exists():
        return
    theirs = data_lib.load_split(source)
    ours = data_lib.split_part(split, theirs.get("data"))  # this run's split of the data they came from
    if ours is None:
        return
    leaked = sorted(set(theirs["train"]) - set(ours["train"]), key=data_lib.natural_key)
    if leaked:
        raise ValueError(f"{folder} was made from {len(leaked)} frames that this run holds out (e.g. {', '.join(leaked[:5])}); "
                         f"make it with `syndiff synth` on this split (--fold {split.get('fold')} --split-seed {split.get('seed')})")


def prepare_data(data, image_size: int, seed: int = 0, fold: int | None = None, folds: int = 5, synthetic=(),
                 fit: str = "stretch"):
    """Load + check the data and split it. Returns (train_samples, val_samples, split dict).

    ``data`` is a folder (CVC-ClinicDB, Kvasir-SEG or image/mask pairs) or None/"toy" for
    the built-in toy dataset, or a list of folders: each keeps its own split and the parts
    are joined, ids prefixed with the folder's name (data.build_split). Synthetic folders are added to the training split only, after
    :func:`check_synthetic_source` has made sure they were made from this split's training frames.
    Every frame and its mask become the image_size square by ``fit`` (``TrainConfig.fit``:
    "stretch" or "letterbox", data.load_dataset), before any augmentation sees them.
    """
    split = data_lib.build_split(data, fold=fold, folds=folds, seed=seed)
    for folder in synthetic:
        check_synthetic_source(folder, split)
    samples = data_lib.load_dataset(data, size=image_size, fit=fit)
    by_id = {s.id: s for s in samples}
    train_samples = [by_id[i] for i in split["train"]]
    val_samples = [by_id[i] for i in split["val"]]
    split["synthetic"] = []
    for folder in synthetic:
        extra = data_lib.load_dataset(folder, size=image_size, fit=fit)
        for s in extra:
            s.source = "synthetic"
        train_samples += extra
        split["synthetic"].append({"folder": str(folder), "n": len(extra)})
    return train_samples, val_samples, split


def autoencoder_samples(data, train_samples, profile: Profile) -> list:
    """The frames the frozen autoencoder (E, D) learns from: the run's real training frames
    (synthetic ones left out, so every row of a grid shares one), always stretched.

    ``TrainConfig.fit`` is not part of the autoencoder's cache key
    (autoencoder.autoencoder_cache_key: the autoencoder's fields, image_size, the training ids,
    the data, the seed), and that is meant: (E, D) is the mask codec, learnt from random crops
    by a fully convolutional network, not the segmenter, and a letterboxed row shares it with
    the plain row so that the two differ in the segmenter's inputs alone and their paired
    difference measures the fit. One key must then mean one autoencoder, whichever run trains
    it first: a letterboxed run gives it the stretched frames a stretch run gives it."""
    real = [s for s in train_samples if s.source != "synthetic"]
    if profile.train.fit == "stretch":
        return real
    stretched = data_lib.load_dataset(data, size=profile.train.image_size, ids=[s.id for s in real], check=False)
    by_id = {s.id: s for s in stretched}
    return [by_id[s.id] for s in real]  # the training order, as a stretch run has it


def random_batch(images, masks, batch_size: int, generator: torch.Generator, flip: bool, rotate: bool = False,
                 photometric: bool = False, zoom: bool = False):
    """A random batch [B, 3, S, S], [B, 1, S, S], augmented as the config asks (augment.py)."""
    idx = torch.randint(len(images), (batch_size,), generator=generator)
    return augment_batch(images[idx], masks[idx], generator, flip=flip, rotate=rotate, photometric=photometric,
                         zoom=zoom)


def progress_bar(total: int, desc: str, initial: int = 0, show: bool = True) -> tqdm:
    """A tqdm bar only where it helps: on the main process and on a terminal (disable=None).
    TQDM_DISABLE=1 silences it everywhere (an explicit disable=None would override that
    variable, and in a notebook the bar is a widget the saved page cannot show)."""
    quiet = not show or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return tqdm(total=total, initial=initial, desc=desc, disable=quiet or None)


# --- the learning rate -------------------------------------------------------------------
def cosine_schedule(optimizer, warmup_steps: int, max_steps: int):
    """Linear warm-up, then a cosine decay to 0 at ``max_steps``.

    It depends on the step alone, never on the clock: the same seed gives the same model on a
    quiet and on a busy machine, and a resumed run continues the schedule it started with.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, step / max_steps)))

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
    if config is not None and (saved := as_written_now(results["config"])) != config:
        raise ValueError(f"{run_dir} holds a run of another configuration (differs in {', '.join(config_differences(config, saved)) or 'its name'}); "
                         "move it away or train again")
    return results


def as_written_now(config: dict) -> dict:
    """A saved profile dict as this version of the code writes it: a field added to the config
    since the run was saved appears at its default, and a new field's default does what the
    older code did, so a run started before the field existed resumes and is reused."""
    return json.loads(json.dumps(Profile.from_dict(config).to_dict()))


def config_differences(ours: dict, theirs: dict) -> list[str]:
    """The "part.field" names in which two profile dicts differ."""
    return sorted(f"{part}.{k}" for part in ours if isinstance(ours[part], dict)
                  for k in ours[part] if theirs.get(part, {}).get(k) != ours[part][k])


TRAIN_FIT_FRAMES = 64  # training frames scored at each validation (the fit diagnostic)


def validation_dice(pipe, samples, seed: int = 0) -> float:
    """Mean Dice of ``pipe`` on ``samples`` at the model's size (fixed noise seed for SynDiff)."""
    images = [s.image for s in samples]
    if isinstance(pipe, SynDiffPipeline):
        out = pipe(images, generator=torch.Generator().manual_seed(seed), output_size="model")
    else:
        out = pipe(images, output_size="model")
    return float(np.mean([dice_score(p, s.mask) for p, s in zip(out.masks, samples)]))


def predicts_no_polyp(pipeline_dir: Path, samples, seed: int = 0) -> bool:
    """True when the saved model marks no polyp pixel on any of ``samples``: a run that has
    not learned to segment (its Dice is 0 everywhere) must not pass for a result."""
    pipe = load_pipeline(pipeline_dir)
    for start in range(0, len(samples), 16):
        out = segment(pipe, [s.image for s in samples[start:start + 16]], seed=seed, output_size="model")
        if np.asarray(out.masks).any():
            return False
    return True


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX; Linux's /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_mixed_precision(setting: str) -> str:
    """The precision a run trains in. "auto": bf16 autocast where the hardware has it (a GPU
    that supports bf16, or a CPU with AVX512-BF16 or AMX), else "no" (fp32): emulated bf16
    is slower than fp32. Any other setting is kept as it is."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_bf16() else "no"


def code_version() -> str:
    """The git commit of the library's checkout (with "+changes" when it has uncommitted
    changes), or "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def hardware_info(accelerator: Accelerator | None = None) -> dict:
    info = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
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


# --- the run folder -----------------------------------------------------------------------
PREPARED = {"vae"}  # what a new run folder may already hold: an autoencoder put there to be used
RUN_FILES = {"profile.json", "split.json", "log.jsonl", "results.json", "pipeline", "checkpoint", "checkpoint.tmp",
             "checkpoint.old", "pipeline.tmp", "pipeline.old", "vae"}  # everything a run writes, but its lock
LOCK = "lock"  # RUN_DIR/lock: {"pid", "host"} of the process that is writing the run


def open_run_dir(run_dir: Path, profile: Profile, split: dict, resume: bool, overwrite: bool = False) -> Path | None:
    """Check the run folder before any work starts (it writes nothing); return the checkpoint
    to resume from.

    Without ``resume`` the folder must be new, empty, or hold only a prepared ``vae/``: a
    finished or killed run is replaced only with ``overwrite``, and anybody's other files
    never. With ``resume`` it must hold a checkpoint of the same profile and split.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"{run_dir} is a file, not a run folder; choose another --out")
    if resume and overwrite:
        raise TrainingError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []
    foreign = [name for name in held if name not in RUN_FILES]
    if foreign:
        raise TrainingError(f"{run_dir} is not empty and not a run folder (it holds {', '.join(foreign[:5])}); "
                            "choose a new or empty --out folder")
    if not resume:
        if set(held) <= PREPARED or overwrite:
            return None
        raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                            "or choose another --out")
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None or not (run_dir / "profile.json").exists():
        raise TrainingError(f"{run_dir} holds no checkpoint to resume (a run is resumable from its first checkpoint "
                            "on); start it again with --overwrite, or train into a new folder")
    saved = as_written_now(json.loads((run_dir / "profile.json").read_text()))
    now = json.loads(json.dumps(profile.to_dict()))
    if saved != now:
        raise TrainingError(f"{run_dir} was started with another configuration (differs in "
                            f"{', '.join(config_differences(now, saved)) or 'its name'}); resume it with the same options")
    theirs = data_lib.load_split(run_dir / "split.json")
    if any(theirs[k] != split[k] for k in ("train", "val", "test")):
        raise TrainingError(f"{run_dir} was started on another data split; resume it with the same --data, --fold and --seed")
    return checkpoint


def clear_run(run_dir: Path) -> None:
    """Delete the run in ``run_dir`` (``--overwrite``); open_run_dir has made sure that nothing
    else is there. A folder holding only a prepared ``vae/`` is no run: it is kept for use.
    The lock stays: this process holds it."""
    if not {p.name for p in run_dir.iterdir()} - PREPARED - {LOCK}:
        return
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@contextmanager
def run_lock(run_dir: Path):
    """Hold ``RUN_DIR/lock`` while this process writes the run: a second training started on
    the same --out is refused instead of writing the same files.

    The lock is created with O_EXCL (one creator wins, atomically), holds our pid and host,
    and is removed at the end, also when the run fails. A lock whose process is dead on this
    host (a run that was killed) is taken over.
    """
    lock = run_dir / LOCK
    if not take_lock(lock):
        holder = read_lock(lock)
        who = f"process {holder['pid']} on {holder['host']}" if holder else "another process"
        raise TrainingError(f"{lock}: {who} is training into {run_dir}; wait for it to end or choose another "
                            "--out (delete the lock only if no such process runs)")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def trim_log(log_file: Path, step: int) -> None:
    """Drop the records a killed run wrote after the checkpoint it resumes from."""
    if log_file.exists():
        kept = [line for line in log_file.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        log_file.write_text("".join(line + "\n" for line in kept))


# --- the two models: what differs between them ---------------------------------------------
@dataclass
class Trainee:
    """What the shared loop needs of a model (plain data, no behaviour of its own).

    modules:    the trained networks by name, as checkpoints store them
    parameters: what AdamW updates (and the EMA averages)
    frozen:     names in ``modules`` kept in eval mode (a frozen E_phi)
    loss:       (pixels [B, 3, S, S], mask [B, 1, S, S], generator) -> (loss, {name: float})
    pipeline:   () -> the pipeline of the modules as they are now, to score and to save
    """

    modules: dict
    parameters: list
    frozen: set
    loss: Callable
    pipeline: Callable


def syndiff_trainee(profile: Profile, vae, accelerator: Accelerator) -> Trainee:
    """E_phi (initialised from E) and the U-Net; the dual loss of Eq. 6 on z_c = E_phi(C), z_0 = E(X)."""
    tcfg = profile.train
    image_encoder = ImageEncoder.from_vae(vae)
    image_encoder.requires_grad_(not tcfg.freeze_encoder)
    unet = build_unet(profile.unet, tcfg.image_size // 8)
    scheduler = make_scheduler(profile.diffusion)
    parameters = list(unet.parameters()) + ([] if tcfg.freeze_encoder else list(image_encoder.parameters()))

    def loss(pixels, mask, generator):
        mask_latent = encode_mask(vae, mask)  # z_0 [B, 4, h, w], frozen E
        image_latent = image_encoder(pixels)  # z_c [B, 4, h, w], trainable E_phi
        return training_loss(unet, scheduler, profile.diffusion, image_latent, mask_latent, generator, vae, mask)

    def pipeline():
        return SynDiffPipeline(vae, accelerator.unwrap_model(image_encoder), accelerator.unwrap_model(unet), scheduler, profile)

    return Trainee({"unet": unet, "image_encoder": image_encoder}, parameters,
                   {"image_encoder"} if tcfg.freeze_encoder else set(), loss, pipeline)


def baseline_trainee(profile: Profile, accelerator: Accelerator) -> Trainee:
    """A pixel-space U-Net that predicts the mask's logits; BCE + soft Dice."""
    unet = build_baseline_unet(profile)

    def loss(pixels, mask, generator):
        return bce_dice_loss(unet(pixels, 0).sample.float(), mask), {}

    return Trainee({"unet": unet}, list(unet.parameters()), set(), loss,
                   lambda: BaselinePipeline(accelerator.unwrap_model(unet), profile))


# --- the shared loop ------------------------------------------------------------------------
def optimisation_step(trainee: Trainee, pixels, mask, generator, optimizer, lr_scheduler, accelerator: Accelerator,
                      grad_clip: float):
    """One AdamW step on one batch; returns (loss, parts). A loss that is not finite is
    returned before anything is updated, so the caller can stop with the weights intact."""
    with accelerator.autocast():
        loss, parts = trainee.loss(pixels, mask, generator)
    if not torch.isfinite(loss):
        return loss, parts
    accelerator.backward(loss)
    if accelerator.sync_gradients and grad_clip:
        accelerator.clip_grad_norm_(trainee.parameters, grad_clip)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, parts


def fit(trainee: Trainee, profile: Profile, run_dir: Path, accelerator: Accelerator, train_samples, val_samples, *,
        max_steps: int, seed: int, checkpoint: Path | None, log=log_line) -> dict:
    """Train ``trainee`` for ``max_steps`` steps (its budget: the profile's ``max_steps`` or
    ``baseline_steps``) unless the profile's wall-clock cap stops it first; returns the final
    loop state.

    The state ({"step", "elapsed_s", "best_val_dice", "best_step", "best_weights",
    "stop_reason"}) is what checkpoints carry, so a resumed run goes on where it stopped.
    """
    tcfg, is_main = profile.train, accelerator.is_main_process
    images, masks = samples_to_tensors(train_samples)
    optimizer = torch.optim.AdamW(trainee.parameters, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    clock = {"start": time.time(), "before": 0.0}  # training seconds, across resumes

    def elapsed():
        return clock["before"] + time.time() - clock["start"]

    lr_scheduler = cosine_schedule(optimizer, tcfg.lr_warmup_steps, max_steps)
    names = list(trainee.modules)
    *prepared, optimizer, lr_scheduler = accelerator.prepare(*trainee.modules.values(), optimizer, lr_scheduler)
    modules = dict(zip(names, prepared))
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)
    ema = make_ema(trainee.parameters, tcfg.ema_decay)

    state = {"step": 0, "elapsed_s": 0.0, "best_val_dice": -1.0, "best_step": None, "best_weights": None}
    log_file = run_dir / "log.jsonl"
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, {k: accelerator.unwrap_model(m) for k, m in modules.items()}, optimizer,
                                lr_scheduler, generator, ema)
        if is_main:
            trim_log(log_file, state["step"])
        log(f"resumed from step {state['step']} ({checkpoint.name})")

    def set_train_mode():
        for name, module in modules.items():
            module.train(name not in trainee.frozen)

    def write_log(record):
        if is_main:
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_state():
        if is_main:
            state["elapsed_s"] = elapsed()
            save_checkpoint(run_dir, {k: accelerator.unwrap_model(m) for k, m in modules.items()}, optimizer, lr_scheduler,
                            generator, state, ema)

    def score_and_keep(weights: str):
        """Validation Dice of the weights the models hold now; they become RUN_DIR/pipeline
        (written aside, then swapped in) if no earlier validation scored higher."""
        pipe = trainee.pipeline()
        dice = validation_dice(pipe, val_samples, seed)
        if is_main and dice > state["best_val_dice"]:
            state["best_val_dice"], state["best_step"], state["best_weights"] = dice, state["step"], weights
            shutil.rmtree(run_dir / "pipeline.tmp", ignore_errors=True)
            pipe.save_pretrained(run_dir / "pipeline.tmp")
            replace_folder(run_dir / "pipeline.tmp", run_dir / "pipeline")
        return dice, pipe

    # A fixed sample of training frames, scored beside validation: not for model selection,
    # but to tell underfitting (both low) from overfitting (train high, validation low).
    fit_samples = [train_samples[i] for i in np.random.default_rng(seed).permutation(len(train_samples))[:TRAIN_FIT_FRAMES]]

    def validate():
        record = {"step": state["step"]}
        if ema is not None:  # the raw weights too: the comparison that justifies the average
            record["val_dice_raw"], _ = score_and_keep("raw")
        with averaged_weights(ema, trainee.parameters):
            record["val_dice"], pipe = score_and_keep("raw" if ema is None else "ema")
            record["train_dice"] = validation_dice(pipe, fit_samples, seed)
        set_train_mode()
        record["elapsed_s"] = round(elapsed(), 1)
        write_log(record)
        raw = f" (raw weights {record['val_dice_raw']:.3f})" if ema is not None else ""
        log(f"step {state['step']}: validation Dice {record['val_dice']:.3f}{raw}, training-frame Dice {record['train_dice']:.3f} "
            f"(best {state['best_val_dice']:.3f} at step {state['best_step']}, {state['best_weights']} weights)")

    clock["start"], clock["before"] = time.time(), state["elapsed_s"]
    cap_s = tcfg.max_minutes * 60  # per session: --resume gives a capped run another cap's worth of time
    set_train_mode()
    bar = progress_bar(max_steps, "train", initial=state["step"], show=is_main)
    state["stop_reason"] = "max_steps"
    while state["step"] < max_steps:
        if time.time() - clock["start"] > cap_s:
            state["stop_reason"] = "wall-clock cap"
            warn(log, f"the {tcfg.max_minutes:g}-minute wall-clock cap stopped training at step {state['step']} of "
                      f"{max_steps}: this is not the model the profile defines (results.json: \"complete\": false); "
                      "--resume continues it")
            break
        pixels, mask = random_batch(images, masks, tcfg.batch_size, generator, tcfg.flip_augment, tcfg.rotate_augment,
                                    tcfg.photometric_augment, tcfg.zoom_augment)
        pixels, mask = pixels.to(accelerator.device), mask.to(accelerator.device)
        loss, parts = optimisation_step(trainee, pixels, mask, generator, optimizer, lr_scheduler, accelerator, tcfg.grad_clip)
        if not torch.isfinite(loss):
            kept = find_checkpoint(run_dir)
            raise TrainingError(
                f"the loss became {loss.item()} at step {state['step'] + 1}; stopping. "
                + (f"The last good checkpoint (step {json.loads((kept / 'state.json').read_text())['step']}) is kept in {kept}."
                   if kept else "No checkpoint had been written yet.")
                + " Try a lower --lr or mixed_precision='no'."
            )
        if ema is not None:
            ema.step(trainee.parameters)
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if state["step"] % tcfg.log_every == 0:
            write_log({"step": state["step"], "loss": loss.item(), **parts, "lr": lr_scheduler.get_last_lr()[0],
                       "elapsed_s": round(elapsed(), 1)})
        if state["step"] % tcfg.val_every == 0:
            validate()
        if state["step"] % tcfg.checkpoint_every == 0:
            save_state()
    bar.close()
    if state["best_step"] is None or state["step"] % tcfg.val_every != 0:  # the last steps since the last validation
        validate()
    save_state()
    return state


# --- the run ------------------------------------------------------------------------------
def train(
    profile: Profile,
    data,
    out,
    *,
    model: str = "syndiff",
    seed: int = 0,
    resume: bool = False,
    fold: int | None = None,
    folds: int = 5,
    split_seed: int | None = None,
    synthetic=(),
    overwrite: bool = False,
    log=log_line,
) -> dict:
    """Train a SynDiff segmenter (``model="syndiff"``) or the pixel-space baseline
    (``model="baseline"``); returns the results dict also written to results.json.

    ``data``: one data set (a folder, or "toy"), or a list of folders trained on together
    (each keeps its own split: see :func:`prepare_data`).
    ``seed`` draws the initial weights, the batches and the noise; ``split_seed`` (default:
    ``seed``) draws the split, so trainings that differ only in ``seed`` can share one split.
    ``overwrite`` replaces a run already in ``out`` (never a folder holding other files).
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    check_profile(profile)
    if model == "syndiff" and (warning := recipe_warning(profile.diffusion)):
        log(warning)
    run_dir = Path(out)
    t_start, code = time.time(), code_version()  # the code as it was when the run began
    tcfg = profile.train
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(tcfg.mixed_precision))
    is_main = accelerator.is_main_process

    # 1. Data, split and the run folder: everything that can be wrong is found before any work.
    split_seed = seed if split_seed is None else split_seed
    train_samples, val_samples, split = prepare_data(data, tcfg.image_size, split_seed, fold, folds, synthetic, tcfg.fit)
    if not val_samples:
        raise ValueError(f"the split of {split['data']} leaves no validation frames, and without them no model can be "
                         "chosen; give more data (whole video sequences) or another split")
    checkpoint = open_run_dir(run_dir, profile, split, resume, overwrite)  # a check only: nothing written yet
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir) if is_main else nullcontext():
        checkpoint = open_run_dir(run_dir, profile, split, resume, overwrite)  # again: another process may have written
        if is_main and overwrite:
            clear_run(run_dir)
        if is_main and checkpoint is None:
            data_lib.save_split(split, run_dir / "split.json")
            (run_dir / "profile.json").write_text(json.dumps(profile.to_dict(), indent=2))
        log(f"data: {len(train_samples)} train, {len(val_samples)} val ({split['scheme']} split); test is not used in training")

        # 2. The model: for SynDiff, the frozen autoencoder first.
        extra = {}
        if model == "syndiff":
            # The autoencoder sees the real training frames only, stretched whatever the fit, so
            # every row of a grid (synthetic frames or not, letterboxed or not) shares the one
            # cached for its split.
            images, masks = samples_to_tensors(autoencoder_samples(data, train_samples, profile))
            vae = get_autoencoder(profile, images, masks, split["train"], split["data"], run_dir, profile.autoencoder.seed,
                                  log, record=extra).to(accelerator.device)
            round_trip = mask_round_trip_dice(vae, samples_to_tensors(val_samples)[1].to(accelerator.device)).mean().item()
            log(f"autoencoder: mask round-trip Dice on validation {round_trip:.3f} (the ceiling for this run)")
            extra["autoencoder_round_trip_dice_val"] = round_trip
            torch.manual_seed(seed)  # the initial weights
            trainee = syndiff_trainee(profile, vae, accelerator)
        else:
            torch.manual_seed(seed)
            trainee = baseline_trainee(profile, accelerator)
        log(f"{model}: {sum(p.numel() for p in trainee.parameters) / 1e6:.1f}M trainable parameters")

        # 3. The loop, for the model's own step budget (equal compute, see the module docstring).
        max_steps = tcfg.steps(model)
        state = fit(trainee, profile, run_dir, accelerator, train_samples, val_samples, max_steps=max_steps, seed=seed,
                    checkpoint=checkpoint, log=log)
        no_polyp = is_main and predicts_no_polyp(run_dir / "pipeline", val_samples, seed)
        if no_polyp:
            warn(log, f"the chosen model predicts no polyp pixel on any of the {len(val_samples)} validation frames: "
                      "it has not learned to segment (train longer, or check the masks); notebooks refuse to show it")

        # 4. Results.
        results = {
            "model": model,
            "profile": profile.name,
            "recipe": describe_recipe(profile.diffusion) if model == "syndiff" else None,
            "overrides": profile_overrides(profile),
            "config": profile.to_dict(),
            "seed": seed,
            "split_seed": split_seed,
            "data": split["data"],
            "split": {k: len(split[k]) for k in ("train", "val", "test")} | {"scheme": split["scheme"], "fold": split.get("fold")},
            "synthetic": split["synthetic"],
            "steps": state["step"],
            "step_budget": max_steps,
            "stop_reason": state["stop_reason"],
            # The model the profile defines: every step trained, the autoencoder's too.
            "complete": state["stop_reason"] == "max_steps" and extra.get("autoencoder_complete", True),
            "predicts_no_polyp": no_polyp,
            "train_seconds": round(state["elapsed_s"], 1),
            "seconds_per_step": round(state["elapsed_s"] / max(state["step"], 1), 4),
            "wall_seconds_this_session": round(time.time() - t_start, 1),
            "best_step": state["best_step"],
            "best_weights": state.get("best_weights"),
            "val_dice": state["best_val_dice"],
            **extra,
            "code": code,
            "hardware": hardware_info(accelerator),
        }
        if is_main:
            (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        log(f"done: {state['step']} steps ({state['stop_reason']}); best validation Dice {state['best_val_dice']:.3f} "
            f"at step {state['best_step']}")
    return results
