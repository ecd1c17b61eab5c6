"""Checkpoints of a training run: safetensors only, written aside and swapped in by renames.

Taught in notebook 04 (training). A checkpoint folder holds what a killed run needs to go on
exactly where it stopped: each model (diffusers' ``save_pretrained``), the optimizer's state
(tensors in ``optimizer.safetensors``, the rest in ``optimizer.json``), the learning-rate
schedule, the RNG states, the EMA's averaged weights, and ``state.json`` (the loop's step,
clock and best validation so far), written last so that its presence marks the folder whole.
No pickle is read or written anywhere: a checkpoint cannot run code when it is loaded.

    RUN_DIR/checkpoint/  unet/  image_encoder/  optimizer.safetensors  optimizer.json
                         rng.safetensors  ema.safetensors  state.json
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run asked to resume from it."""


def replace_folder(new: Path, final: Path) -> None:
    """Swap ``new`` in as ``final`` by renames, so a kill leaves the old or the new one whole."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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
    final, tmp = run_dir / "checkpoint", run_dir / "checkpoint.tmp"
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
    replace_folder(tmp, final)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a kill between the two renames leaves .tmp or .old)."""
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        if (run_dir / name / "state.json").exists():
            return run_dir / name
    return None


def load_checkpoint(path: Path, models: dict, optimizer, lr_scheduler, generator, ema=None) -> dict:
    """Restore a run from the checkpoint folder ``path``; a damaged or mismatched file is one
    CheckpointError naming the folder (a kill never leaves one: see save_checkpoint)."""
    try:
        return _load_checkpoint(path, models, optimizer, lr_scheduler, generator, ema)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        if isinstance(error, CheckpointError):
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: the checkpoint cannot be loaded ({reason}); it is damaged or from another "
                              "model: start the run again with --overwrite") from None


def _load_checkpoint(path: Path, models: dict, optimizer, lr_scheduler, generator, ema=None) -> dict:
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
            raise CheckpointError(f"{path} has no EMA weights (it was written with ema_decay = 0); resume with the same config")
        shadow = load_file(path / "ema.safetensors")
        for i, p in enumerate(ema.shadow_params):
            p.copy_(shadow[str(i)])
        ema.optimization_step = state["ema_step"]
    return state


# --- locks: one writer per folder --------------------------------------------------------------
def read_lock(lock: Path) -> dict | None:
    """The holder {"pid", "host"} written in a lock file, or None if it is gone or unreadable."""
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def holder_is_alive(holder: dict | None) -> bool:
    """False only for a lock we can prove dead: its process, on this host, no longer exists.
    An unreadable lock (half-written) or one of another host is taken as held."""
    if holder is None or holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)  # signal 0: a check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def lock_is_held(lock: Path) -> bool:
    """True if ``lock`` exists and its holder is not proven dead: a cell or run being worked on
    now. The lock of a killed run is not held: the next take_lock takes it over."""
    return lock.exists() and holder_is_alive(read_lock(lock))


def take_lock(lock: Path) -> bool:
    """Create the file ``lock`` with O_EXCL (one creator wins, atomically), holding our pid and
    host; True if this process holds it now. A lock whose process is dead on this host (a
    killed run) is taken over; a live one, one of another host, or a half-written one is
    respected. Runs (train.run_lock) and the grid's cells (experiments) are locked this way."""
    for _ in range(2):  # a second try after taking over a dead process's lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = read_lock(lock)
            if holder_is_alive(holder):
                return False
            if read_lock(lock) == holder:  # still the dead one's, not a lock another process just took over
                lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        return True
    return False


@contextmanager
def made_once(folder: Path, log=print, poll: float = 30.0):
    """Make ``folder`` (a cache entry, there once ``folder/config.json`` exists) in one process
    at a time: while another live process holds ``<folder>.lock``, wait for it, so two runs
    that need the same entry (two grid lanes on one fold) make it once, and none reads an
    entry still being written. Inside, the entry is whole, or this process holds the lock
    and makes it; a killed maker's lock is taken over (take_lock)."""
    lock = folder.with_name(folder.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = said = False
    while not ((folder / "config.json").exists() and not lock_is_held(lock)) and not (held := take_lock(lock)):
        if not said:
            log(f"{folder.name}: another process is making it; waiting for it")
            said = True
        time.sleep(poll)
    try:
        yield
    finally:
        if held:
            lock.unlink(missing_ok=True)
