"""The `syndiff` command: thin verbs over the library (train, evaluate, segment, bench, data, synth).

    syndiff data check DIR
    syndiff train --profile tiny|cpu|full --data DIR [--data DIR2 ...] --out RUN_DIR [--resume] [--seed N] ...
    syndiff evaluate --checkpoint RUN_DIR --data DIR --split test|val|all [--resolution native|model] [--fit stretch|letterbox] [--json]
    syndiff segment --checkpoint RUN_DIR IMAGE_OR_DIR... --out DIR [--fit stretch|letterbox] [--runtime torch|onnxruntime]
    syndiff segment --checkpoint RUN_DIR VIDEO_OR_FRAME_DIR --out DIR --overlay CLIP.mp4
    syndiff export --checkpoint RUN_DIR --out EXPORT_DIR [--int8] [--decode-downscale 2]
    syndiff bench --checkpoint RUN_DIR --steps 1,50,100 [--batch B] [--device cpu|cuda] [--runtime torch|onnxruntime] [--compile] [--json]
    syndiff bench --checkpoint RUN_DIR --speed-options all [--data DIR] [--frames N] [--json]
    syndiff synth --backend sdxl|copy-paste|gan --data DIR --out DIR --n 100 ...
    syndiff generalise run|status|report --data-root DIR --out DIR [--only KEY,...]

``--data`` defaults to $SYNDIFF_DATA, else the built-in toy dataset ("toy"). Bad input ends
with one line "error: ..." on stderr and exit code 2, before any long work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np


def default_data() -> str:
    return os.environ.get("SYNDIFF_DATA") or "toy"


def _add_data(parser):
    parser.add_argument("--data", default=None, help="dataset folder (default: $SYNDIFF_DATA, else the toy dataset 'toy')")


# --- verbs --------------------------------------------------------------------------------
def cmd_data_check(args) -> int:
    from .data import check_dataset

    report = check_dataset(args.dir)
    print(json.dumps(report, indent=2, default=str))
    print(f"ok: {report['n']} image/mask pairs in {args.dir} opened and checked")
    return 0


DIFFUSION_FLAGS = {  # flag dest -> DiffusionConfig field
    "lambda_latent": "lambda_latent", "t_infer": "t_infer", "prediction_type": "prediction_type",
    "timestep_sampling": "timestep_sampling", "decoder_loss_weight": "decoder_loss_weight",
    "zero_snr": "rescale_zero_terminal_snr", "decoder_loss_fraction": "decoder_loss_fraction",
    "latent_loss": "latent_loss",
}
TRAIN_FLAGS = ("max_steps", "baseline_steps", "max_minutes", "lr", "batch_size", "checkpoint_every", "val_every",
               "mixed_precision", "ema_decay", "fit")
STEP_BUDGET = {"syndiff": "max_steps", "baseline": "baseline_steps"}  # the TrainConfig field each model trains for


def positive_int(text: str) -> int:
    """argparse type: a count that must be >= 1 (steps, batch sizes, sizes)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def timestep(text: str) -> int:
    """argparse type: a diffusion timestep, >= 0 (the model's own T bounds it above)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a timestep in 0..T-1 (T = 1000 for every profile), got {value}")
    return value


def profile_from_args(args):
    """The profile a `syndiff train` command line asks for: the named profile and recipe with
    every flag applied; config.check_profile refuses combinations that contradict each other."""
    from .config import check_profile, get_profile

    profile = get_profile(args.profile, recipe=args.config)
    diffusion = {field: getattr(args, flag) for flag, field in DIFFUSION_FLAGS.items() if getattr(args, flag) is not None}
    if args.fixed_timestep is not None:  # one timestep for training and for the single inference step
        diffusion |= {"timestep_sampling": "fixed", "fixed_timestep": args.fixed_timestep,
                      "t_infer": diffusion.get("t_infer", args.fixed_timestep)}
    if args.model == "baseline" and (diffusion or args.config or args.freeze_encoder):
        raise ValueError("the baseline has no diffusion and no image encoder: the diffusion and encoder options "
                         "apply to --model syndiff only")
    profile.diffusion = dataclasses.replace(profile.diffusion, **diffusion)
    other = "baseline" if args.model == "syndiff" else "syndiff"
    if getattr(args, STEP_BUDGET[other]) is not None:  # a step budget this model would silently ignore
        raise ValueError(f"--{STEP_BUDGET[other].replace('_', '-')} is the {other} model's step budget; a {args.model} "
                         f"run trains --{STEP_BUDGET[args.model].replace('_', '-')} steps")
    train = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    if args.freeze_encoder:
        train["freeze_encoder"] = True
    if args.traditional_augment:  # the paper's Table 3 row: flips and rotation
        train |= {"flip_augment": True, "rotate_augment": True}
    if args.photometric_augment is not None:  # None: the profile's own choice
        train["photometric_augment"] = args.photometric_augment
    if args.zoom_augment:
        train["zoom_augment"] = True
    profile.train = dataclasses.replace(profile.train, **train)
    check_profile(profile)
    return profile


def cmd_train(args) -> int:
    from .train import train

    profile = profile_from_args(args)
    data = args.data or [default_data()]  # --data is repeatable: several data sets train together
    data = data[0] if len(data) == 1 else data
    results = train(profile, data, args.out, model=args.model, resume=args.resume, seed=args.seed,
                    fold=args.fold, folds=args.folds, split_seed=args.split_seed, synthetic=args.synthetic or (),
                    overwrite=args.overwrite)
    print(json.dumps({k: results[k] for k in ("steps", "train_seconds", "val_dice", "best_step")}))
    return 0


def split_samples(run_dir: Path, data, split_name: str, size: int | None, fit: str = "stretch"):
    """The samples of one split: the run's own split.json when the data is the one it trained
    on (or one of those), else the data set's own split (data.build_split); "all" is every
    frame. ``size`` None: each frame at its own size, else size x size, squared by ``fit``."""
    from . import data as data_lib

    split_file = run_dir / "split.json"
    split = data_lib.load_split(split_file) if split_file.exists() else None
    if split_name == "all":
        split = data_lib.build_split(data, scheme="all")
        split_name = "test"
    else:
        part = None if split is None else data_lib.split_part(split, data)
        split = part if part is not None else data_lib.build_split(data)
    return data_lib.load_dataset(data, size=size, ids=split[split_name], fit=fit)


def cmd_evaluate(args) -> int:
    import torch

    from .pipeline import check_segment_options, evaluate, load_pipeline, resolve_fit

    data = args.data or default_data()
    pipe = load_pipeline(args.checkpoint, device=args.device)
    check_segment_options(pipe, args.steps, args.t_infer)  # before the data is read
    fit = resolve_fit(pipe, args.fit)  # the model's own fit, unless --fit says otherwise
    size = pipe.profile.train.image_size
    # At --resolution model each frame and its mask are squared by the fit as they are loaded
    # (as in training), so the model's square is the frame itself and the fit has nothing left to do.
    samples = split_samples(Path(args.checkpoint), data, args.split, None if args.resolution == "native" else size, fit)
    if not samples:
        raise ValueError(f"the {args.split} split of {data} is empty")
    summary, per_image = evaluate(pipe, samples, args.steps, args.t_infer, args.seed, args.nsd_tolerance, fit)
    summary.update(split=args.split, data=str(data), checkpoint=str(args.checkpoint), resolution=args.resolution,
                   model_size=size, torch_threads=torch.get_num_threads())
    if args.per_image:
        from .metrics import per_image_rows

        rows = per_image_rows(per_image)
        Path(args.per_image).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        how = f", {args.steps} step(s), t_infer {summary['t_infer']}" if "t_infer" in summary else ""
        print(f"{args.split} ({summary['n']} images{how}, {args.resolution} resolution, {fit}):")
        for name in ("dice", "iou", "hd95", "nsd"):
            print(f"  {name:5s} {summary[name]:.4f} ± {summary[name + '_std']:.4f}")
    return 0


def cmd_segment(args) -> int:
    from .data import files_to_segment
    from .export import load_segmenter
    from .pipeline import check_segment_options, model_fit, segment_files
    from .video import find_clip, segment_clip

    out_dir = Path(args.out)
    clip = find_clip(args.inputs, out_dir, args.overlay)  # a video file or frame folder, checked; else None
    if clip and args.fit == "letterbox":
        raise ValueError("--fit letterbox applies to image files; a clip's frames are segmented stretched")
    files = None if clip else files_to_segment(args.inputs, out_dir)  # every input problem, in one error, before the model loads
    pipe = load_segmenter(args.checkpoint, args.runtime, device=args.device)
    check_segment_options(pipe, args.steps, args.t_infer)
    if clip and args.fit is None and model_fit(pipe) == "letterbox":  # never a silent change of the model's fit
        raise ValueError("this model was trained on letterboxed frames, and a clip's frames are segmented stretched: "
                         "pass --fit stretch to segment the clip stretched all the same, or segment its frames as image files")
    out_dir.mkdir(parents=True, exist_ok=True)
    if clip:
        stats = segment_clip(pipe, clip, out_dir, args.overlay, args.steps, args.t_infer, args.seed)
        print(f"wrote {stats['frames']} masks to {out_dir}" + (f" and the overlay clip {stats['overlay']}" if stats["overlay"] else ""))
        print(f"{stats['frames_per_s']:.1f} frames/s end to end; model call per frame p50 {stats['latency_p50_s'] * 1000:.1f} ms, "
              f"p95 {stats['latency_p95_s'] * 1000:.1f} ms ({args.runtime})")
        return 0
    written = segment_files(pipe, files, out_dir, args.steps, args.t_infer, args.seed, fit=args.fit)  # batch by batch
    print(f"wrote {written} masks to {out_dir}")
    return 0


def cmd_export(args) -> int:
    from .data import make_toy_dataset
    from .export import compare_graphs, export_onnx

    record = export_onnx(args.checkpoint, args.out, int8=args.int8, decode_downscale=args.decode_downscale)
    print(f"wrote {Path(args.out) / record['graph']} and preprocess.json ({record['model']}, opset {record['opset']}, "
          f"{record['image_size']}x{record['image_size']}, batch {record['batch']})")
    if args.int8:  # how far int8 moves the masks, on toy frames; whether to ship it is decided on real data
        agreement = compare_graphs(args.out, [s.image for s in make_toy_dataset(8, size=record["image_size"])])
        print(f"wrote {Path(args.out) / record['int8_graph']}: Dice against the fp32 graph {agreement['dice']:.4f}, "
              f"largest soft-mask difference {agreement['soft_max_abs']:.4f} (8 toy frames)")
    return 0


def cmd_bench_speed_options(args) -> int:
    """`bench --speed-options`: every speed option's latency and Dice in one run (notebook 07)."""
    from .bench import SPEED_OPTIONS, fastest_that_holds, speed_options
    from .pipeline import SynDiffPipeline

    if not args.checkpoint:
        raise ValueError("--speed-options needs --checkpoint RUN_DIR (a trained SynDiff run)")
    options = args.speed_options.split(",") if args.speed_options != "all" else list(SPEED_OPTIONS)
    if unknown := [o for o in options if o not in SPEED_OPTIONS]:
        raise ValueError(f"unknown --speed-options {', '.join(unknown)}; choose from: {', '.join(SPEED_OPTIONS)}")
    SynDiffPipeline.from_pretrained(args.checkpoint)  # a baseline run or a damaged folder fails here, before any work
    data, run = args.data or default_data(), Path(args.checkpoint)
    val, test = (split_samples(run, data, name, None) for name in ("val", "test"))
    if not test:
        raise ValueError(f"the test split of {data} is empty: nothing to time or score")
    frames = [s.image for s in test[:args.frames]]
    rows = speed_options(run, frames, val, test, options, repeats=args.repeats)
    chosen = fastest_that_holds(rows)
    if args.json:
        print(json.dumps({"options": rows, "fastest_within_0.01_val_dice": chosen["option"], "frames": len(frames),
                          "data": str(data), "checkpoint": str(run)}))
        return 0
    print(f"{len(frames)} test frames, batch 1, pre- and post-processing included; Dice on {len(val)} validation "
          f"and {len(test)} test frames")
    print(f"{'option':34s} {'p50 ms':>7s} {'p95 ms':>7s} {'fps':>6s} {'val Dice':>9s} {'test Dice':>9s}  parts (ms)")
    for r in rows:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in (r["parts_ms"] or {}).items()) or "one fused graph"
        print(f"{r['option']:34s} {r['p50_ms']:7.1f} {r['p95_ms']:7.1f} {r['frames_per_s']:6.1f} "
              f"{r['val_dice']:9.4f} {r['test_dice']:9.4f}  {parts}")
    print(f"fastest within 0.01 of the exact pipeline's validation Dice: {chosen['option']}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .bench import benchmark
    from .config import get_profile
    from .pipeline import SynDiffPipeline

    if args.speed_options:
        return cmd_bench_speed_options(args)
    if args.runtime == "onnxruntime":  # one fused graph, one step: only the whole call is timed
        from .bench import benchmark_onnx
        from .export import OnnxPipeline

        if (not args.checkpoint or args.random_init or args.train_step or args.steps not in (None, "1")
                or args.dtype != "fp32" or args.compile):
            raise ValueError("--runtime onnxruntime times an exported graph at one step in fp32: give --checkpoint "
                             "EXPORT_DIR_OR_RUN, and no --random-init, --train-step, --dtype, --compile or --steps "
                             "other than 1")
        result = benchmark_onnx(OnnxPipeline.from_pretrained(args.checkpoint, device=args.device), args.batch,
                                args.warmup, args.repeats)
        result["model"] = str(args.checkpoint)
        print(json.dumps(result) if args.json else
              f"   1 step(s): {result['latency_s']['1'] * 1000:9.1f} ms  (onnxruntime, batch {args.batch})")
        return 0
    try:
        steps = [int(s) for s in (args.steps or "1,50,100").split(",")]
    except ValueError:
        raise ValueError(f"--steps must be a comma-separated list of step counts, got {args.steps!r}") from None
    if any(n < 1 for n in steps) or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--steps, --batch and --repeats must be >= 1 (and --warmup >= 0), got steps {args.steps}, "
                         f"batch {args.batch}, repeats {args.repeats}, warmup {args.warmup}")
    if args.train_step:
        from .bench import train_step_benchmark

        if args.compile:
            raise ValueError("--compile times inference (with --checkpoint or --random-init), not --train-step")

        profile = get_profile(args.train_step)
        if args.mixed_precision:
            profile.train.mixed_precision = args.mixed_precision
        result = train_step_benchmark(profile, steps=args.repeats, warmup=args.warmup)
        print(json.dumps(result) if args.json else
              f"seconds per training step ({result['mixed_precision']}): "
              + ", ".join(f"{k} {v:.3f}" for k, v in result["seconds_per_step"].items()))
        return 0
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.checkpoint:
        pipe = SynDiffPipeline.from_pretrained(args.checkpoint, device=args.device, dtype=dtype)
    elif args.random_init:
        profile = get_profile(args.random_init)
        if args.image_size:
            profile.train.image_size = args.image_size
        pipe = SynDiffPipeline.from_profile(profile).to(args.device, dtype)
    else:
        raise ValueError("give --checkpoint RUN_DIR or --random-init PROFILE")
    result = benchmark(pipe, steps, args.batch, args.warmup, args.repeats, compile=args.compile)
    result["model"] = str(args.checkpoint or f"random-init {args.random_init}")
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result["latency_s"].items():
            print(f"{k:>4} step(s): {v * 1000:9.1f} ms  speedup x{result['speedup'][k]:.1f} (predicted from the parts x{result['speedup_predicted'][k]:.1f})")
        print("parts: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in result["components"].items()))
        print(f"1 step / its three bare forwards: x{result['whole_over_parts']:.3f}")
    return 0


def cmd_experiment(args) -> int:
    from . import experiments

    if args.action == "run":
        budget = experiments.GridBudget(**{k: getattr(args, k) for k in ("syndiff_steps", "baseline_steps")
                                           if getattr(args, k) is not None})
        only = args.only.split(",") if args.only else None
        folds = [int(k) for k in args.folds.split(",")] if args.folds else None
        state = experiments.run_grid(args.grid, args.data or default_data(), args.out, budget, only=only, folds=folds)
    elif args.action == "status":
        state = experiments.status(args.grid, args.out)
    else:
        lines = experiments.report(args.grid, args.out)
        if args.json:
            print(json.dumps(lines))
            return 0
        from .viz import mean_std, table

        print(table([[ln["row"], f"{ln['cells']}/{ln['of']}", mean_std(ln, "dice"), mean_std(ln, "iou"),
                      f"{ln['hd95']:.1f}" if "hd95" in ln else "-",
                      f"{100 * ln['diff']:+.1f} [{100 * ln['diff_low']:+.1f}, {100 * ln['diff_high']:+.1f}] {ln['verdict']}"
                      if "diff" in ln else "-", ln.get("paper") or "-"] for ln in lines],
                    ["row", "cells", "Dice %", "IoU %", "HD95 px", "Δ Dice vs reference (95% CI)", "paper (Dice, IoU)"]))
        return 0
    print(json.dumps(state) if args.json else
          f"{state['grid']}: {state['done']} of {state['cells']} cells done, {len(state['running'])} running, "
          f"{state['left']} left" + (f"; about {state['hours_left_estimate']} h left at one cell at a time"
                                     if state["hours_left_estimate"] is not None else ""))
    return 0


def cmd_generalise(args) -> int:
    from . import generalisation

    keys = args.only.split(",") if args.only else None
    if args.action == "run":
        if not args.data_root:
            raise ValueError("generalise run needs --data-root DIR, the folder holding cvc-clinicdb/ and kvasir-seg/")
        state = generalisation.run_all(args.data_root, args.out, keys, args.profile)
    elif args.action == "status":
        state = generalisation.status(args.out, keys)
    else:
        lines = generalisation.report(args.out, keys)
        if args.json:
            print(json.dumps(lines))
            return 0
        from .viz import table

        def percent(line, m):
            return f"{100 * line[m]:.1f} ± {100 * line[m + '_std']:.1f}" if m in line else "-"

        scores = [ln for ln in lines if ln["kind"] == "score"]
        print(table([[ln["experiment"], f"{ln['test']} ({ln['role']})", ln["row"], f"{ln['cells']}/{ln['of']}",
                      percent(ln, "dice"), percent(ln, "iou"), f"{ln['hd95']:.1f}" if "hd95" in ln else "-",
                      f"{100 * ln['nsd']:.1f}" if "nsd" in ln else "-",
                      f"{100 * ln['drop']:+.1f} from {ln['in_domain']}" if "drop" in ln else "-"] for ln in scores],
                    ["exp.", "test set", "row", "cells", "Dice %", "IoU %", "HD95 px", "NSD %", "drop (Dice)"]))
        pairs = [ln for ln in lines if ln["kind"] == "pair"]
        if pairs:
            print(table([[ln["experiment"], ln["test"], f"{ln['key']} - {ln['against']}",
                          f"{100 * ln['diff']:+.1f} [{100 * ln['diff_low']:+.1f}, {100 * ln['diff_high']:+.1f}]",
                          ln["n_groups"], ln["verdict"]] for ln in pairs],
                        ["exp.", "test set", "pair", "Δ Dice % (95% CI)", "groups resampled", "verdict"]))
        for ln in lines:
            if ln["kind"] == "choice":
                print(f"experiment {ln['experiment']}, {ln['model']}: {ln['by']} chooses {ln['chosen']}"
                      + (f", Dice {100 * ln['dice']:.1f} % on {ln['test']}" if "dice" in ln else ""))
            elif ln["kind"] == "reported":
                print(f"{ln['row']} ({ln['backbone']}): " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in ln["dice"].items())
                      + f" ({ln['note']})")
        return 0
    print(json.dumps(state) if args.json else
          f"{state['done']} of {state['cells']} cells done, {len(state['running'])} running, {state['left']} left")
    return 0


# --- synth --------------------------------------------------------------------------------


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `syndiff synth` (notebook 02)."""
    from .synthesis import SDXL_INPAINT_MODEL_ID, SDXL_INPAINT_REVISION

    parser.add_argument("--backend", choices=("copy-paste", "sdxl", "gan"), default="copy-paste",
                        help="sdxl: the paper's text-guided inpainting (downloads ~7 GB of weights, wants a GPU); "
                             "copy-paste: offline Poisson blending of real training polyps; "
                             "gan: a pix2pix inpainting GAN trained here on the split's training frames")
    parser.add_argument("--data", required=True, help='data set folder ("toy" for the toy set): its TRAINING '
                        "frames give the mask sources and, without --backgrounds, the backgrounds")
    parser.add_argument("--out", required=True, help="output folder: images/, masks/, manifest.jsonl")
    parser.add_argument("--n", type=int, default=100, help="number of samples (paper: 100)")
    parser.add_argument("--prompts", default=None, help="JSON Lines prompt file (default: the bundled 50-prompt bank)")
    parser.add_argument("--backgrounds", default=None, help="folder of polyp-free frames (default: training frames, "
                        "the new polyp placed away from the existing one, label = union of both masks)")
    parser.add_argument("--seed", type=int, default=0, help="sample i depends on (seed, i) only")
    parser.add_argument("--resume", action="store_true", help="continue a killed run: skip finished samples")
    parser.add_argument("--min-consistency", type=float, default=0.0,
                        help="move samples whose consistency score is below this to rejected/ (0: keep all)")
    parser.add_argument("--split-seed", type=int, default=0, help="the --seed of the training run: the split depends on it")
    parser.add_argument("--fold", type=int, default=None, help="the --fold of the training run (sequence-grouped k-fold)")
    parser.add_argument("--folds", type=int, default=5, help="the --folds of the training run")
    parser.add_argument("--model-id", default=SDXL_INPAINT_MODEL_ID, help="sdxl: hub id or local folder")
    parser.add_argument("--revision", default=SDXL_INPAINT_REVISION, help="sdxl: commit of --model-id")
    parser.add_argument("--steps", type=int, default=20, help="sdxl: denoising steps")
    parser.add_argument("--guidance", type=float, default=8.0, help="sdxl: classifier-free guidance scale")
    parser.add_argument("--strength", type=float, default=0.99, help="sdxl: how much noise the mask region gets")
    parser.add_argument("--resolution", type=int, default=1024, help="sdxl: working size of the long side")
    parser.add_argument("--padding-mask-crop", type=int, default=None,
                        help="sdxl: inpaint only the mask's box grown by this many px (helps small polyps)")
    parser.add_argument("--negative-prompt", default=None, help="sdxl: replaces every prompt's negative prompt")
    parser.add_argument("--fp16", action="store_true", help="sdxl: fp16 weights and compute (GPU)")
    parser.add_argument("--cpu-offload", action="store_true", help="sdxl: keep sub-models on the CPU until they run")
    parser.add_argument("--device", default=None, help="sdxl, gan: torch device (default: accelerate's device for "
                        "this process)")
    parser.add_argument("--gan-steps", type=int, default=None, help="gan: training steps (default: GANConfig.steps)")
    parser.add_argument("--gan-model", default=None, help="gan: folder of a GAN saved by an earlier run (OUT/gan) "
                        "to use instead of training one; it must come from this split's training frames")


def cmd_synth(args: argparse.Namespace) -> int:
    """Run `syndiff synth`; under `accelerate launch` the processes share the samples (notebook 02)."""
    import time

    from accelerate import PartialState

    from . import data as data_lib
    from .synthesis import (
        CopyPasteBackend, SDXLInpaintBackend, SynthesisError, load_backgrounds, load_prompts, synthesize, training_frames,
        write_manifest,
    )
    from .viz import read_jsonl

    if args.n <= 0:
        raise SynthesisError(f"--n must be a positive number of samples, got {args.n}")
    prompts = load_prompts(args.prompts)
    backgrounds = None if args.backgrounds is None else load_backgrounds(args.backgrounds)
    frames, split = training_frames(args.data, fold=args.fold, folds=args.folds, split_seed=args.split_seed)
    split_file = Path(args.out) / "split.json"
    if split_file.exists() and data_lib.load_split(split_file)["train"] != split["train"]:
        raise SynthesisError(f"{args.out} holds samples made from another split ({split_file}); choose another --out")
    state = PartialState(cpu=args.backend == "copy-paste" or args.device == "cpu")  # cpu: CPU processes share too
    if args.backend == "sdxl":
        backend = SDXLInpaintBackend(
            model_id=args.model_id, revision=args.revision, device=args.device or state.device, fp16=args.fp16,
            cpu_offload=args.cpu_offload, steps=args.steps, guidance=args.guidance, strength=args.strength,
            resolution=args.resolution, padding_mask_crop=args.padding_mask_crop, negative_prompt=args.negative_prompt)
    elif args.backend == "gan":  # trained here on this split's training frames, once, or loaded from --gan-model
        import torch

        from . import gan

        if args.gan_steps is not None and args.gan_steps < 1:
            raise SynthesisError(f"--gan-steps must be a positive number of steps, got {args.gan_steps}")
        folder, device = Path(args.gan_model or Path(args.out) / "gan"), args.device or state.device
        reuse = args.gan_model is not None or (args.resume and (folder / "generator.safetensors").exists())
        if not reuse and state.is_main_process:
            cfg = dataclasses.replace(gan.GANConfig(), steps=args.gan_steps or gan.GANConfig.steps)
            model = gan.train_inpainting_gan(frames, cfg, torch.Generator().manual_seed(cfg.seed), device=device)
            gan.save_gan(model, folder)
        state.wait_for_everyone()  # the other processes load what the main process trained
        model = gan.load_gan(folder, device=device)
        gan.check_trained_on(model, split["train"])
        backend = gan.GANInpaintBackend(model, model_id=str(folder), device=device)
    else:
        backend = CopyPasteBackend()
    if state.is_main_process:
        data_lib.save_split(split, split_file)  # which frames the samples come from: train --synthetic checks it
    start = time.perf_counter()
    with state.split_between_processes(list(range(args.n))) as mine:
        made = synthesize(backend, frames, args.out, args.n, prompts=prompts, backgrounds=backgrounds,
                          seed=args.seed, indices=mine, resume=args.resume, min_consistency=args.min_consistency)
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    if state.is_main_process:
        records = read_jsonl(write_manifest(args.out, args.n))
        kept = sum(r["kept"] for r in records)
        scores = np.array([r["consistency"] for r in records], dtype=float)
        print(f"synth: {len(records)}/{args.n} samples in {args.out} (backend {backend.name}); made {len(made)} "
              f"now in {seconds:.1f} s ({seconds / max(len(made), 1):.2f} s/sample on this process)")
        print(f"synth: consistency median {np.nanmedian(scores) if len(scores) else float('nan'):.2f}; "
              f"kept {kept}/{len(records)} ({kept / max(len(records), 1):.0%}) at --min-consistency "
              f"{args.min_consistency}")
    return 0


# --- the parser ---------------------------------------------------------------------------
FIT_HELP = ("stretch: squeeze each frame to the model's square; letterbox: pad it with black to a square instead, "
            "and crop the padding off the mask. Default: the fit the model was trained with (train.fit in its saved "
            "config; stretch for a model saved before the config recorded it)")


def build_parser() -> argparse.ArgumentParser:
    from .config import FITS

    parser = argparse.ArgumentParser(prog="syndiff", description="SynDiff: single-step latent-diffusion polyp segmentation")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("data", help="dataset tools")
    data_verbs = p.add_subparsers(dest="data_verb", required=True)
    check = data_verbs.add_parser("check", help="open and check every image/mask pair")
    check.add_argument("dir")
    check.set_defaults(func=cmd_data_check)

    p = verbs.add_parser("train", help="train a segmenter (frozen autoencoder first)")
    p.add_argument("--profile", default="tiny", choices=["tiny", "cpu", "full", "full-random"])
    p.add_argument("--model", default="syndiff", choices=["syndiff", "baseline"],
                   help="baseline: a plain pixel-space U-Net with the same data and budget")
    p.add_argument("--config", default=None, choices=["paper", "default"], help="diffusion recipe (default: the profile's)")
    p.add_argument("--data", action="append", default=None,
                   help="dataset folder (default: $SYNDIFF_DATA, else the toy dataset 'toy'); repeat it to train on "
                        "several: each keeps its own split, ids are prefixed with the folder's name")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (only a run: a folder holding other files is never deleted)")
    p.add_argument("--seed", type=int, default=0, help="initial weights, batches and noise")
    p.add_argument("--split-seed", type=int, default=None, help="the split's seed (default: --seed)")
    p.add_argument("--fold", type=int, default=None, help="k-fold cross-validation fold (ClinicDB, sequence-grouped)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--lambda-latent", type=float, default=None, help="lambda of Eq. 6 (0: noise loss only)")
    p.add_argument("--freeze-encoder", action="store_true", help="ablation: keep E_phi frozen at E's weights")
    p.add_argument("--traditional-augment", action="store_true", help="flips + rotation (the paper's 'traditional' row)")
    p.add_argument("--photometric-augment", action=argparse.BooleanOptionalAction, default=None,
                   help="beyond the paper: colour jitter, blur and JPEG artefacts on the training images "
                        "(default: the profile's, on in cpu, off in tiny)")
    p.add_argument("--zoom-augment", action="store_true",
                   help="beyond the paper: a random zoom of each training pair, 0.8 to 1.5 (polyps filmed nearer "
                        "or farther)")
    p.add_argument("--fit", default=None, choices=FITS,
                   help="how each training frame and its mask become the model's square (default: the profile's, "
                        "stretch): letterbox pads them with black / background first; the model records it, and "
                        "evaluate and segment use it")
    p.add_argument("--synthetic", action="append", help="folder of synthetic pairs added to training (repeatable)")
    p.add_argument("--prediction-type", choices=["epsilon", "sample", "v_prediction"], default=None)
    p.add_argument("--timestep-sampling", choices=["uniform", "fixed"], default=None)
    p.add_argument("--t-infer", type=int, default=None, help="the single inference step's t (with --timestep-sampling uniform)")
    p.add_argument("--fixed-timestep", type=int, default=None,
                   help="train at this one t and query it there (sets --timestep-sampling fixed and --t-infer)")
    p.add_argument("--decoder-loss-weight", type=float, default=None, help="beyond the paper: loss on the decoded mask")
    p.add_argument("--decoder-loss-fraction", type=float, default=None, help="share of each batch the decoder loss sees")
    p.add_argument("--latent-loss", choices=["l1", "balanced_l1"], default=None,
                   help="balanced_l1: polyp and background latent cells weigh half each (beyond the paper)")
    p.add_argument("--zero-snr", action="store_const", const=True, default=None, help="zero-terminal-SNR schedule")
    p.add_argument("--max-steps", type=positive_int, default=None, help="SynDiff's step budget")
    p.add_argument("--baseline-steps", type=positive_int, default=None,
                   help="the baseline's step budget (default: the profile's, equal in compute to SynDiff's)")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16", "auto"], default=None,
                   help="auto: bf16 where the hardware computes it natively (AVX512-BF16/AMX CPUs, GPUs), else fp32")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="beyond the paper: EMA of the weights, scored beside the raw ones at each validation (0: off)")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("evaluate", help="Dice, IoU, HD95, NSD on a split")
    p.add_argument("--checkpoint", required=True, help="run folder (or its pipeline/ subfolder)")
    _add_data(p)
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="train: the run's own training frames (to tell under- from overfitting)")
    p.add_argument("--steps", type=positive_int, default=1, help="1 = single step; > 1 = DDIM steps")
    p.add_argument("--t-infer", type=timestep, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the inference noise")
    p.add_argument("--nsd-tolerance", type=float, default=None, help="NSD tolerance in pixels")
    p.add_argument("--resolution", default="native", choices=["native", "model"],
                   help="native: score each mask at its image's own size (the model's prediction resized back); "
                        "model: frame and mask made the model's square input (by the fit) and scored there")
    p.add_argument("--fit", default=None, choices=FITS, help=FIT_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--per-image", default=None, help="also write per-image metrics to this JSONL file")
    p.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = verbs.add_parser("segment", help="write PNG masks for images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=positive_int, default=1)
    p.add_argument("--t-infer", type=timestep, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="onnxruntime: the graph of `syndiff export` (--checkpoint EXPORT_DIR, or a run exported on the fly)")
    p.add_argument("--fit", default=None, choices=FITS, help=FIT_HELP)
    p.add_argument("--overlay", default=None, metavar="CLIP.mp4",
                   help="with one video file or frame folder: also write the overlay clip (.mp4, or .gif)")
    p.set_defaults(func=cmd_segment)

    p = verbs.add_parser("export", help="one ONNX graph, frame to mask, plus its preprocess.json")
    p.add_argument("--checkpoint", required=True, help="run folder (SynDiff or baseline)")
    p.add_argument("--out", required=True, help="folder for model.onnx and preprocess.json")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (dynamic int8 quantisation)")
    p.add_argument("--decode-downscale", type=int, choices=[1, 2, 4], default=1,
                   help="SynDiff: the faster, approximate decoder (2 or 4; see `bench --speed-options`)")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("bench", help="latency of 1 vs T steps and of each part")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--random-init", default=None, choices=["tiny", "cpu", "full-random"], help="time an untrained architecture")
    p.add_argument("--image-size", type=positive_int, default=None, help="with --random-init: input side")
    p.add_argument("--train-step", default=None, choices=["tiny", "cpu", "full-random"],
                   help="time training steps of SynDiff and the baseline at this profile instead (--repeats steps)")
    p.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "auto"],
                   help="with --train-step: the training precision (default: the profile's)")
    p.add_argument("--steps", default=None, help="comma-separated step counts (default: 1,50,100; 1 with onnxruntime)")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="onnxruntime: time the exported graph of --checkpoint EXPORT_DIR_OR_RUN (one step)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile E_phi, the U-Net and D first (the warm-up calls compile them)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--speed-options", default=None, metavar="all|NAME,NAME",
                   help="time and score speed options of --checkpoint on real frames (bench.SPEED_OPTIONS)")
    p.add_argument("--data", default=None, help="with --speed-options: the run's dataset folder")
    p.add_argument("--frames", type=positive_int, default=60, help="with --speed-options: test frames timed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = verbs.add_parser("experiment", help="the paper's tables as grids of cells: run, status, report")
    p.add_argument("action", choices=["run", "status", "report"])
    p.add_argument("grid", help="table1, table2, table2_vs_full, table3, noise, precision or smoke (experiments.GRIDS)")
    _add_data(p)
    p.add_argument("--out", required=True, help="grid folder: cells/<row>/fold<k>-seed<s>/, synthetic/")
    p.add_argument("--syndiff-steps", type=int, default=None, help="steps per SynDiff cell (default: GridBudget's)")
    p.add_argument("--baseline-steps", type=int, default=None, help="steps per baseline cell (default: GridBudget's)")
    p.add_argument("--only", default=None, metavar="CELL[,CELL]",
                   help="with run: only these cells, named <row>/fold<k>-seed<s> (e.g. real/fold0-seed0)")
    p.add_argument("--folds", default=None, metavar="K[,K]", help="with run: only the cells of these folds (e.g. 0)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_experiment)

    p = verbs.add_parser("generalise", help="train on one data set, score on another (generalisation.EXPERIMENTS)")
    p.add_argument("action", choices=["run", "status", "report"])
    p.add_argument("--data-root", default=None, help="folder holding the data sets (cvc-clinicdb/, kvasir-seg/)")
    p.add_argument("--out", required=True, help="results folder: cells/<key>/seed<s>/, runs/, synthetic/")
    p.add_argument("--only", default=None, metavar="KEY,...", help="these rows only (default: every row)")
    p.add_argument("--profile", default=None, choices=["tiny", "cpu"], help="default: cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generalise)

    p = verbs.add_parser("synth", help="make synthetic polyp frames (SDXL inpainting, copy-paste or a GAN)")
    add_synth_arguments(p)
    p.set_defaults(func=cmd_synth)
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def describe_os_error(err: OSError) -> str:
    """One line for a failure of the disk or the network: the file (or model) and what to do."""
    if err.errno == errno.ENOSPC:
        return f"{err.filename or 'a file'}: the disk is full; free some space or choose another --out, then run again"
    if err.filename:
        return f"{err.filename}: {err.strerror or err}"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    first = first.replace(" Please check out the root cause in the stacktrace above.", "")  # we print none
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or "huggingface" in str(err).lower():
        first += (" (the model is not in the local cache and the hub cannot be reached: download it once with "
                  "network access, or pass a local folder)")
    return first


def main(argv=None) -> int:
    # Before torch loads (cli.py imports it lazily): OpenMP threads that sleep when idle
    # instead of spinning, so a run on a busy machine does not lose most of its steps.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .train import TrainingError

    try:
        return args.func(args)
    except (DataError, ValueError, FileNotFoundError, TrainingError) as err:
        return _fail(str(err))
    except OSError as err:  # disk full, permissions, weights not found offline
        return _fail(describe_os_error(err))
    except KeyboardInterrupt:
        return _fail("interrupted")
    except Exception:  # not an expected failure: the traceback is what a bug report needs
        traceback.print_exc()
        print("error: this is a bug in syndiff, not in your input; please report it with the command line and the "
              "traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
