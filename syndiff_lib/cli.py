"""The `syndiff` command: thin verbs over the library (train, evaluate, segment, bench, data, synth).

    syndiff data check DIR
    syndiff train --profile tiny|cpu|full --data DIR --out RUN_DIR [--resume] [--seed N] ...
    syndiff evaluate --checkpoint RUN_DIR --data DIR --split test|val|all [--steps N] [--t-infer T] [--json]
    syndiff segment --checkpoint RUN_DIR IMAGE_OR_DIR... --out DIR
    syndiff bench --checkpoint RUN_DIR --steps 1,50,100 [--batch B] [--device cpu|cuda] [--json]
    syndiff synth --backend sdxl|copy-paste --data DIR --out DIR --n 100 ...

``--data`` defaults to $SYNDIFF_DATA, else the built-in toy dataset ("toy"). Bad input ends
with one line "error: ..." on stderr and exit code 2, before any long work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
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


def cmd_train(args) -> int:
    from .config import get_profile
    from .train import train

    profile = get_profile(args.profile, recipe=args.config)
    overrides = {
        "lambda_latent": args.lambda_latent, "t_infer": args.t_infer,
        "prediction_type": args.prediction_type, "timestep_sampling": args.timestep_sampling,
        "decoder_loss_weight": args.decoder_loss_weight, "rescale_zero_terminal_snr": args.zero_snr,
        "decoder_loss_fraction": args.decoder_loss_fraction, "latent_loss": args.latent_loss,
    }
    profile.diffusion = dataclasses.replace(profile.diffusion, **{k: v for k, v in overrides.items() if v is not None})
    train_overrides = {"max_steps": args.max_steps, "max_minutes": args.max_minutes, "lr": args.lr,
                       "batch_size": args.batch_size, "checkpoint_every": args.checkpoint_every,
                       "val_every": args.val_every, "mixed_precision": args.mixed_precision, "ema_decay": args.ema_decay}
    profile.train = dataclasses.replace(profile.train, **{k: v for k, v in train_overrides.items() if v is not None})
    if args.freeze_encoder:
        profile.train.freeze_encoder = True
    if args.traditional_augment:
        profile.train.rotate_augment = True
    common = dict(seed=args.seed, fold=args.fold, folds=args.folds, synthetic=args.synthetic or ())
    if args.model == "baseline":
        from .baseline import train_baseline

        if args.resume:
            raise ValueError("the baseline trains in one go: --resume is for SynDiff runs")
        results = train_baseline(profile, args.data or default_data(), args.out, **common)
    else:
        results = train(profile, args.data or default_data(), args.out, resume=args.resume, **common)
    print(json.dumps({k: results[k] for k in ("steps", "train_seconds", "val_dice", "best_step")}))
    return 0


def _split_samples(run_dir: Path, data, split_name: str, size: int):
    """The samples of one split: the run's own split.json when the data is the one it trained on."""
    from . import data as data_lib

    samples = data_lib.load_dataset(data, size=size)
    if split_name == "all":
        return samples
    split_file = run_dir / "split.json"
    split = data_lib.load_split(split_file) if split_file.exists() else None
    same_data = split is not None and (split.get("data") == str(data) or
                                       (split.get("data") not in (None, "toy") and str(data) != "toy" and
                                        Path(split["data"]).resolve() == Path(data).resolve()))
    if not same_data:
        is_toy = str(data) == "toy"
        split = data_lib.make_split([s.id for s in samples], "random" if is_toy else data_lib.default_scheme(data))
    wanted = set(split[split_name])
    return [s for s in samples if s.id in wanted]


def cmd_evaluate(args) -> int:
    import torch

    from .pipeline import evaluate, load_pipeline

    data = args.data or default_data()
    pipe = load_pipeline(args.checkpoint, device=args.device)
    samples = _split_samples(Path(args.checkpoint), data, args.split, pipe.profile.train.image_size)
    if not samples:
        raise ValueError(f"the {args.split} split of {data} is empty")
    summary, per_image = evaluate(pipe, samples, args.steps, args.t_infer, args.seed, args.nsd_tolerance)
    summary.update(split=args.split, data=str(data), checkpoint=str(args.checkpoint), torch_threads=torch.get_num_threads())
    if args.per_image:
        rows = [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in per_image.items()} for i in range(len(samples))]
        Path(args.per_image).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.split} ({summary['n']} images, {args.steps} step(s), t_infer {summary['t_infer']}):")
        for name in ("dice", "iou", "hd95", "nsd"):
            print(f"  {name:5s} {summary[name]:.4f} ± {summary[name + '_std']:.4f}")
    return 0


def cmd_segment(args) -> int:
    import torch
    from PIL import Image

    from .data import read_image
    from .pipeline import load_pipeline

    files = []
    for item in map(Path, args.inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"))
        elif item.exists():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    if not files:
        raise ValueError(f"no images found in {', '.join(args.inputs)}")
    images = [read_image(f) for f in files]  # checked up front: an unreadable file stops here
    pipe = load_pipeline(args.checkpoint, device=args.device)
    out = pipe(images, args.steps, args.t_infer, torch.Generator().manual_seed(args.seed))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f, mask in zip(files, out.masks):
        Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(out_dir / f"{f.stem}.png")
    print(f"wrote {len(files)} masks to {out_dir}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .bench import benchmark
    from .config import get_profile
    from .pipeline import SynDiffPipeline

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
    steps = [int(s) for s in args.steps.split(",")]
    result = benchmark(pipe, steps, args.batch, args.warmup, args.repeats)
    result["model"] = str(args.checkpoint or f"random-init {args.random_init}")
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result["latency_s"].items():
            print(f"{k:>4} step(s): {v * 1000:9.1f} ms  speedup x{result['speedup'][k]:.1f} (ceiling x{result['speedup_ceiling'][k]:.1f})")
        print(f"parts: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in result["components"].items()))
        print(f"1-step overhead over the bare forwards: x{result['overhead']:.3f}")
    return 0


# --- the parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
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
    _add_data(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fold", type=int, default=None, help="k-fold cross-validation fold (ClinicDB, sequence-grouped)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--lambda-latent", type=float, default=None, help="lambda of Eq. 6 (0: noise loss only)")
    p.add_argument("--freeze-encoder", action="store_true", help="ablation: keep E_phi frozen at E's weights")
    p.add_argument("--traditional-augment", action="store_true", help="flips + rotation (the paper's 'traditional' row)")
    p.add_argument("--synthetic", action="append", help="folder of synthetic pairs added to training (repeatable)")
    p.add_argument("--prediction-type", choices=["epsilon", "sample", "v_prediction"], default=None)
    p.add_argument("--timestep-sampling", choices=["uniform", "fixed"], default=None)
    p.add_argument("--t-infer", type=int, default=None)
    p.add_argument("--decoder-loss-weight", type=float, default=None, help="beyond the paper: loss on the decoded mask")
    p.add_argument("--decoder-loss-fraction", type=float, default=None, help="share of each batch the decoder loss sees")
    p.add_argument("--latent-loss", choices=["l1", "balanced_l1"], default=None,
                   help="balanced_l1: polyp and background latent cells weigh half each (beyond the paper)")
    p.add_argument("--zero-snr", action="store_const", const=True, default=None, help="zero-terminal-SNR schedule")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--ema-decay", type=float, default=None,
                   help="beyond the paper: EMA of the weights, scored beside the raw ones at each validation (0: off)")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("evaluate", help="Dice, IoU, HD95, NSD on a split")
    p.add_argument("--checkpoint", required=True, help="run folder (or its pipeline/ subfolder)")
    _add_data(p)
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="train: the run's own training frames (to tell under- from overfitting)")
    p.add_argument("--steps", type=int, default=1, help="1 = single step; > 1 = DDIM steps")
    p.add_argument("--t-infer", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the inference noise")
    p.add_argument("--nsd-tolerance", type=float, default=None, help="NSD tolerance in pixels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--per-image", default=None, help="also write per-image metrics to this JSONL file")
    p.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = verbs.add_parser("segment", help="write PNG masks for images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--t-infer", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_segment)

    p = verbs.add_parser("bench", help="latency of 1 vs T steps and of each part")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--random-init", default=None, choices=["tiny", "cpu", "full-random"], help="time an untrained architecture")
    p.add_argument("--image-size", type=int, default=None, help="with --random-init: input side")
    p.add_argument("--steps", default="1,50,100")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = verbs.add_parser("synth", help="make synthetic polyp frames (SDXL inpainting or copy-paste)")
    try:
        from .synthesis import add_synth_arguments, synth_command

        add_synth_arguments(p)
        p.set_defaults(func=synth_command)
    except ImportError as err:  # pragma: no cover
        p.set_defaults(func=lambda args: _fail(f"synth is unavailable: {err}"))
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError

    known = (DataError, ValueError, FileNotFoundError)
    try:
        from .train import TrainingError

        known += (TrainingError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        return args.func(args)
    except known as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
