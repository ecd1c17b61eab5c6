"""Inference latency: 1 vs 50 vs 100 steps, and the parts they are made of (paper Table 4).

Taught in notebook 07 (efficiency). What we measure, on preprocessed input tensors:

    encoder_s  one E_phi forward        decoder_s  one D forward
    unet_s     one U-Net forward        parts_sum_s = encoder_s + unet_s + decoder_s
    latency_s[T] the whole segmentation with T U-Net steps (encode once, decode once)

From the parts, T steps should take (E + D + T f) / (E + D + f) times as long as one step
(``speedup_predicted``): what the paper's "T x speedup" becomes once the encoder and decoder
are counted. It is a prediction from parts timed one by one, not a bound: a part timed alone
can run slower or faster than inside the whole (caches, memory reuse), so a measured speedup
may land on either side of it. ``whole_over_parts`` = latency_s[1] / parts_sum_s compares the
single step with its three bare forwards the same way. On a GPU, times come from CUDA events
after a warm-up.

:func:`speed_options` then asks how fast the single step can go on real frames, batch 1,
pre- and post-processing included: each option of :data:`SPEED_OPTIONS` (bf16, channels-last,
the approximate decoder, onnxruntime, int8) with its latency percentiles, frames per second,
the time of each part, and its Dice on the run's validation and test frames, in one run.
:func:`fastest_that_holds` picks an option on validation Dice alone.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .pipeline import Speed, images_to_tensor, soft_maps_to_output
from .unet import unet_forward


def _timer(device: torch.device, fn, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compile_networks(pipe, backend: str = "inductor") -> None:
    """torch.compile E_phi, the U-Net and D in place. nn.Module.compile keeps each module's
    type, so code that asks what a module is (unet.unet_forward) still works. The first call at
    each input shape compiles, which takes far longer than a call: time after a warm-up."""
    for module in (pipe.image_encoder, pipe.unet, pipe.vae.decoder):
        module.compile(backend=backend)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a GPU call returns before it has run)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """The most GPU memory allocated since the last reset, in GiB; None off a GPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@torch.no_grad()
def benchmark(pipe, steps=(1, 50, 100), batch_size: int = 1, warmup: int = 2, repeats: int = 5, seed: int = 0,
              compile: bool = False) -> dict:
    """Time the pipeline's parts and whole on random input of the trained size; ``compile``:
    with the networks torch.compiled first (compile_networks; at least one warm-up call)."""
    device, dtype = pipe.device, pipe.dtype
    if compile:
        compile_networks(pipe)
        warmup = max(warmup, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    size = pipe.profile.train.image_size
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1).to(device, dtype)
    image_latent = pipe.encode_images(pixels)  # [B, 4, h, w]
    timesteps = torch.full((batch_size,), pipe.profile.diffusion.t_infer, device=device, dtype=torch.long)

    def segment(num_steps: int):
        latent = pipe.denoise(pipe.encode_images(pixels), num_steps, generator=torch.Generator().manual_seed(seed))
        return pipe.decode(latent) > 0.5

    parts = {
        "encoder_s": _timer(device, lambda: pipe.encode_images(pixels), warmup, repeats),
        "unet_s": _timer(device, lambda: unet_forward(pipe.unet, image_latent, image_latent, timesteps), warmup, repeats),
        "decoder_s": _timer(device, lambda: pipe.decode(image_latent), warmup, repeats),
    }
    parts_sum_s = sum(parts.values())
    latency = {}
    for num_steps in steps:
        few = max(1, min(repeats, 3)) if num_steps > 10 else repeats  # long runs need fewer repeats
        latency[str(num_steps)] = _timer(device, lambda: segment(num_steps), 1 if num_steps > 10 else warmup, few)
    one = latency[str(min(steps))]
    codec = parts["encoder_s"] + parts["decoder_s"]
    return {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "dtype": str(dtype).replace("torch.", ""),
        "compiled": compile,
        "batch": batch_size,
        "image_size": size,
        "latency_s": latency,
        "latency_per_image_s": {k: v / batch_size for k, v in latency.items()},
        "speedup": {k: v / one for k, v in latency.items()},
        "speedup_predicted": {k: (codec + int(k) * parts["unet_s"]) / (codec + parts["unet_s"]) for k in latency},
        "components": parts,
        "parts_sum_s": parts_sum_s,
        "whole_over_parts": one / parts_sum_s,
        "peak_memory_gb": peak_memory_gb(device),
        "threads": torch.get_num_threads(),
    }


def train_step_benchmark(profile, models=("syndiff", "baseline"), steps: int = 20, warmup: int = 3, seed: int = 0) -> dict:
    """Seconds per training step of each model at a profile, on random batches of its size.

    The experiment grid's budgets are step counts; this says what a step costs on this
    machine, and so how many baseline steps cost what a SynDiff step costs. The steps are
    train.optimisation_step, the loop's own; the autoencoder is an untrained one of the
    profile's architecture (a step costs the same whatever its weights).
    """
    from accelerate import Accelerator

    from .autoencoder import build_autoencoder
    from .train import baseline_trainee, optimisation_step, resolve_mixed_precision, syndiff_trainee

    tcfg = profile.train
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(tcfg.mixed_precision))
    device = accelerator.device
    generator = torch.Generator().manual_seed(seed)
    size, batch = tcfg.image_size, tcfg.batch_size
    pixels = (torch.rand(batch, 3, size, size, generator=generator) * 2 - 1).to(device)  # [B, 3, S, S]
    mask = (torch.rand(batch, 1, size, size, generator=generator) > 0.7).float().to(device)  # [B, 1, S, S]
    result = {"profile": profile.name, "device": str(device), "image_size": size, "batch": batch,
              "threads": torch.get_num_threads(), "mixed_precision": accelerator.mixed_precision,
              "steps_timed": steps, "seconds_per_step": {}, "peak_memory_gb": {}}
    for model in models:
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if model == "syndiff":
            vae = build_autoencoder(profile.autoencoder).eval().requires_grad_(False).to(device)
            trainee = syndiff_trainee(profile, vae, accelerator)
        else:
            trainee = baseline_trainee(profile, accelerator)
        for module in trainee.modules.values():
            module.to(device).train()
        optimizer = torch.optim.AdamW(trainee.parameters, lr=tcfg.lr)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

        def step():
            optimisation_step(trainee, pixels, mask, generator, optimizer, lr_scheduler, accelerator, tcfg.grad_clip)

        for _ in range(warmup):
            step()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        result["seconds_per_step"][model] = (time.perf_counter() - t0) / steps
        result["peak_memory_gb"][model] = peak_memory_gb(device)
    if {"syndiff", "baseline"} <= set(result["seconds_per_step"]):
        s = result["seconds_per_step"]
        result["baseline_steps_per_syndiff_step"] = s["syndiff"] / s["baseline"]
    return result


def benchmark_onnx(pipe, batch_size: int = 1, warmup: int = 2, repeats: int = 5, seed: int = 0) -> dict:
    """Median seconds of one call of an export.OnnxPipeline's graph on random preprocessed input (the
    parts are fused in one graph, so only the whole is timed). Taught in notebook 07 (efficiency)."""
    generator = torch.Generator().manual_seed(seed)
    size = pipe.image_size
    feeds = {"pixels": (torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1).numpy()}
    if pipe.record["model"] == "syndiff":
        feeds["noise"] = torch.randn([batch_size, *pipe.record["noise"]["shape"][1:]], generator=generator).numpy()
    seconds = _timer(torch.device("cpu"), lambda: pipe.session.run(None, feeds), warmup, repeats)
    return {"runtime": "onnxruntime", "providers": pipe.session.get_providers(), "model": pipe.record["model"],
            "batch": batch_size, "image_size": size, "latency_s": {"1": seconds},
            "latency_per_image_s": {"1": seconds / batch_size}, "threads": torch.get_num_threads()}


# The speed options notebook 07 compares: (runtime, pipeline.Speed). The first is today's
# exact pipeline, the reference every other row's Dice is compared with.
SPEED_OPTIONS = {
    "fp32": ("torch", Speed()),
    "channels-last": ("torch", Speed(channels_last=True)),
    "bf16": ("torch", Speed(bf16=True)),
    "bf16 + channels-last": ("torch", Speed(bf16=True, channels_last=True)),
    "decode/2": ("torch", Speed(decode_downscale=2)),
    "decode/4": ("torch", Speed(decode_downscale=4)),
    "bf16 + channels-last + decode/2": ("torch", Speed(bf16=True, channels_last=True, decode_downscale=2)),
    "onnxruntime": ("onnxruntime", Speed()),
    "onnxruntime + decode/2": ("onnxruntime", Speed(decode_downscale=2)),
    "onnxruntime int8": ("onnxruntime-int8", Speed()),
}


def segmenter_for(checkpoint, option: str, export_dir):
    """The run ``checkpoint`` set up as :data:`SPEED_OPTIONS` names it: a SynDiffPipeline with
    its Speed, or the exported graph (written to ``export_dir``) in an OnnxPipeline."""
    from .export import OnnxPipeline, export_onnx
    from .pipeline import SynDiffPipeline

    runtime, speed = SPEED_OPTIONS[option]
    if runtime == "torch":
        return SynDiffPipeline.from_pretrained(checkpoint).set_speed(speed)
    int8 = runtime == "onnxruntime-int8"
    export_onnx(checkpoint, export_dir, int8=int8, decode_downscale=speed.decode_downscale)
    return OnnxPipeline.from_pretrained(export_dir, int8=int8)


def _percentiles(seconds: list[float]) -> dict:
    ms = 1000 * np.asarray(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "frames_per_s": float(len(ms) / (ms.sum() / 1000))}


@torch.no_grad()
def time_parts(pipe, frame: np.ndarray, warmup: int = 3, repeats: int = 20, seed: int = 0) -> dict:
    """Median milliseconds of each part of one frame's single step, torch runtime:
    pre (resize + normalise), encoder E_phi, U-Net, decoder D, post (resize back + threshold)."""
    device, size = pipe.device, pipe.profile.train.image_size
    pixels = images_to_tensor([frame], size)  # [1, 3, S, S]
    with pipe.autocast():
        image_latent = pipe.encode_images(pixels)  # [1, 4, h, w]
        mask_latent = pipe.denoise(image_latent, generator=torch.Generator().manual_seed(seed))
        soft = pipe.decode(mask_latent).float().cpu()  # [1, 1, S, S]
        t = torch.full((1,), pipe.profile.diffusion.t_infer, device=device, dtype=torch.long)
        parts = {
            "pre": lambda: images_to_tensor([frame], size),
            "encoder": lambda: pipe.encode_images(pixels),
            "unet": lambda: unet_forward(pipe.unet, image_latent, image_latent, t),
            "decoder": lambda: pipe.decode(mask_latent),
            "post": lambda: soft_maps_to_output([frame], soft, "input", 0.5),
        }
        return {name: 1000 * _timer(device, fn, warmup, repeats) for name, fn in parts.items()}


def time_frames(segmenter, frames, seed: int = 0, warmup: int = 3) -> dict:
    """Per-frame latency of whole calls (pre + model + post), batch 1, frames in order."""
    generator = torch.Generator().manual_seed(seed)
    for frame in frames[:warmup]:
        segmenter([frame], generator=generator, batch_size=1)
    seconds = []
    for frame in frames:
        t0 = time.perf_counter()
        segmenter([frame], generator=generator, batch_size=1)
        seconds.append(time.perf_counter() - t0)
    return _percentiles(seconds)


def speed_options(checkpoint, frames, val_samples, test_samples, options=None, seed: int = 0,
                  repeats: int = 20) -> list[dict]:
    """Each speed option's latency and Dice in one run, side by side (notebook 07).

    Latency: the parts of one single step (torch runtime; an onnxruntime graph is one fused
    call) and whole calls on ``frames``, batch 1, in order. Dice: on the run's validation
    frames (what a choice between options may look at) and on its test frames (reported,
    never used to choose). Time it on a quiet machine: every row shares the same cores.
    """
    import tempfile

    from .pipeline import evaluate

    rows = []
    for name in options or SPEED_OPTIONS:
        runtime, speed = SPEED_OPTIONS[name]
        with tempfile.TemporaryDirectory(prefix="syndiff-onnx-") as tmp:
            segmenter = segmenter_for(checkpoint, name, tmp)  # onnxruntime holds its graph in memory
        parts = time_parts(segmenter, frames[0], repeats=repeats, seed=seed) if runtime == "torch" else None
        row = {"option": name, "runtime": runtime.replace("-int8", ""), "speed": speed.describe(), "parts_ms": parts}
        row.update(time_frames(segmenter, frames, seed))
        for split, samples in (("val", val_samples), ("test", test_samples)):
            row[f"{split}_dice"] = evaluate(segmenter, samples, seed=seed)[0]["dice"] if samples else None
        rows.append(row)
    reference = rows[0]
    for row in rows:
        for split in ("val", "test"):
            if row[f"{split}_dice"] is not None and reference[f"{split}_dice"] is not None:
                row[f"{split}_dice_change"] = row[f"{split}_dice"] - reference[f"{split}_dice"]
        row["speedup"] = reference["p50_ms"] / row["p50_ms"]
    return rows


def fastest_that_holds(rows: list[dict], tolerance: float = 0.01) -> dict:
    """The fastest option whose validation Dice is within ``tolerance`` of the exact
    pipeline's: the choice rests on validation frames only, never on the test frames."""
    held = [r for r in rows if r.get("val_dice_change") is not None and r["val_dice_change"] >= -tolerance]
    return min(held, key=lambda r: r["p50_ms"])
