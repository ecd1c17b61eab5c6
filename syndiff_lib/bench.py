"""Inference latency: 1 vs 50 vs 100 steps, and the parts they are made of (paper Table 4).

Taught in notebook 07 (efficiency). What we measure, on preprocessed input tensors:

    encoder_s  one E_phi forward        decoder_s  one D forward
    unet_s     one U-Net forward        floor_s    = encoder_s + unet_s + decoder_s
    latency_s[T] the whole segmentation with T U-Net steps (encode once, decode once)

From the parts, T steps can at best be (E + D + T f) / (E + D + f) times slower than one
step: that "ceiling" is what the paper's "T x speedup" becomes once the encoder and decoder
are counted. ``overhead`` = latency_s[1] / floor_s shows what the single-step code adds to
the three bare forwards. On a GPU, times come from CUDA events after a warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch

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


@torch.no_grad()
def benchmark(pipe, steps=(1, 50, 100), batch_size: int = 1, warmup: int = 2, repeats: int = 5, seed: int = 0) -> dict:
    """Time the pipeline's parts and whole on random input of the trained size."""
    device, dtype = pipe.device, pipe.dtype
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
    floor_s = sum(parts.values())
    latency = {}
    for num_steps in steps:
        few = max(1, min(repeats, 3)) if num_steps > 10 else repeats  # long runs need fewer repeats
        latency[str(num_steps)] = _timer(device, lambda: segment(num_steps), 1 if num_steps > 10 else warmup, few)
    one = latency[str(min(steps))]
    codec = parts["encoder_s"] + parts["decoder_s"]
    return {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch_size,
        "image_size": size,
        "latency_s": latency,
        "latency_per_image_s": {k: v / batch_size for k, v in latency.items()},
        "speedup": {k: v / one for k, v in latency.items()},
        "speedup_ceiling": {k: (codec + int(k) * parts["unet_s"]) / (codec + parts["unet_s"]) for k in latency},
        "components": parts,
        "floor_s": floor_s,
        "overhead": one / floor_s,
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
    from .train import baseline_trainee, optimisation_step, syndiff_trainee

    tcfg = profile.train
    accelerator = Accelerator(mixed_precision=tcfg.mixed_precision)
    generator = torch.Generator().manual_seed(seed)
    size, batch = tcfg.image_size, tcfg.batch_size
    pixels = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1  # [B, 3, S, S]
    mask = (torch.rand(batch, 1, size, size, generator=generator) > 0.7).float()  # [B, 1, S, S]
    result = {"profile": profile.name, "image_size": size, "batch": batch, "threads": torch.get_num_threads(),
              "steps_timed": steps, "seconds_per_step": {}}
    for model in models:
        torch.manual_seed(seed)
        if model == "syndiff":
            vae = build_autoencoder(profile.autoencoder).eval().requires_grad_(False)
            trainee = syndiff_trainee(profile, vae, accelerator)
        else:
            trainee = baseline_trainee(profile, accelerator)
        for module in trainee.modules.values():
            module.train()
        optimizer = torch.optim.AdamW(trainee.parameters, lr=tcfg.lr)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

        def step():
            optimisation_step(trainee, pixels, mask, generator, optimizer, lr_scheduler, accelerator, tcfg.grad_clip)

        for _ in range(warmup):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        result["seconds_per_step"][model] = (time.perf_counter() - t0) / steps
    if {"syndiff", "baseline"} <= set(result["seconds_per_step"]):
        s = result["seconds_per_step"]
        result["baseline_steps_per_syndiff_step"] = s["syndiff"] / s["baseline"]
    return result
