"""Speed options (notebook 07): the approximate decoder, bf16 and channels-last inference,
their export, the side-by-side table and its choice on validation only, the training
precision "auto", and the clip of one video sequence. Tiny random models unless a test
needs a trained one."""

import json

import numpy as np
import pytest
import torch

from syndiff_lib import train as train_lib
from syndiff_lib.autoencoder import decode_mask, decode_skipping_upsamplers
from syndiff_lib.bench import SPEED_OPTIONS, fastest_that_holds, speed_options
from syndiff_lib.cli import main
from syndiff_lib.data import make_toy_dataset
from syndiff_lib.export import OnnxPipeline, export_onnx, mask_dice
from syndiff_lib.pipeline import Speed
from syndiff_lib.video import sequence_folder


def images(n=4, size=80):
    return [s.image for s in make_toy_dataset(n, size=size)]


def test_the_step_by_step_decoder_is_diffusers_decoder(tiny_pipe):
    vae = tiny_pipe.vae
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = decode_skipping_upsamplers(vae, z, skip=0)
        theirs = vae.decode(z).sample
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("downscale", [2, 4])
def test_the_approximate_decoder_gives_a_full_size_soft_mask(tiny_pipe, downscale):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        soft = decode_mask(tiny_pipe.vae, z, downscale)
        exact = decode_mask(tiny_pipe.vae, z)
    assert soft.shape == exact.shape == (2, 1, 64, 64)
    assert 0 <= soft.min() and soft.max() <= 1
    assert not torch.equal(soft, exact)  # it is an approximation, not D
    with pytest.raises(ValueError, match="decode_downscale"):
        Speed(decode_downscale=3)


def test_channels_last_changes_the_layout_not_the_masks(tiny_pipe):
    exact = tiny_pipe(images(), generator=torch.Generator().manual_seed(1))
    try:
        tiny_pipe.set_speed(Speed(channels_last=True))
        assert tiny_pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        fast = tiny_pipe(images(), generator=torch.Generator().manual_seed(1))
    finally:
        tiny_pipe.set_speed(Speed())
    assert mask_dice(exact.masks, fast.masks) >= 0.999


def test_bf16_runs_the_networks_in_bf16_and_returns_float32(tiny_pipe):
    seen = []
    hook = tiny_pipe.unet.register_forward_hook(lambda module, args, output: seen.append(output.sample.dtype))
    try:
        tiny_pipe.set_speed(Speed(bf16=True))
        out = tiny_pipe(images(2), generator=torch.Generator().manual_seed(1))
    finally:
        hook.remove()
        tiny_pipe.set_speed(Speed())
    assert seen == [torch.bfloat16]
    assert out.soft_masks.dtype == np.float32 and out.masks.shape == (2, 80, 80)


def test_an_export_with_the_approximate_decoder_equals_the_pipeline_with_it(tiny_pipe, tiny_run, tmp_path):
    record = export_onnx(tiny_run, tmp_path, decode_downscale=2)
    assert record["decode_downscale"] == 2
    try:
        tiny_pipe.set_speed(Speed(decode_downscale=2))
        ref = tiny_pipe(images(), generator=torch.Generator().manual_seed(2))
    finally:
        tiny_pipe.set_speed(Speed())
    out = OnnxPipeline.from_pretrained(tmp_path)(images(), generator=torch.Generator().manual_seed(2))
    assert mask_dice(ref.masks, out.masks) >= 0.999


def test_speed_options_time_and_score_each_option_beside_the_exact_pipeline(tiny_run):
    samples = make_toy_dataset(6, size=80)
    rows = speed_options(tiny_run, [s.image for s in samples[:3]], samples[:3], samples[3:],
                         ["fp32", "decode/2", "onnxruntime"], repeats=2)
    assert [r["option"] for r in rows] == ["fp32", "decode/2", "onnxruntime"]
    exact, _, onnx = rows
    assert exact["speedup"] == 1 and exact["val_dice_change"] == 0
    assert set(exact["parts_ms"]) == {"pre", "encoder", "unet", "decoder", "post"} and onnx["parts_ms"] is None
    assert abs(onnx["val_dice_change"]) < 1e-3 and abs(onnx["test_dice_change"]) < 1e-3  # the same model, exported
    assert all(r["p95_ms"] >= r["p50_ms"] > 0 and r["frames_per_s"] > 0 for r in rows)


def test_the_choice_between_speed_options_looks_at_validation_only():
    rows = [{"option": "exact", "p50_ms": 100, "val_dice_change": 0.0, "test_dice_change": 0.0},
            {"option": "fast but worse on validation", "p50_ms": 20, "val_dice_change": -0.05, "test_dice_change": +0.02},
            {"option": "a bit faster", "p50_ms": 60, "val_dice_change": -0.005, "test_dice_change": -0.03}]
    assert fastest_that_holds(rows)["option"] == "a bit faster"


def test_every_speed_option_is_a_runtime_and_a_speed():
    assert list(SPEED_OPTIONS)[0] == "fp32" and SPEED_OPTIONS["fp32"] == ("torch", Speed())
    for runtime, speed in SPEED_OPTIONS.values():
        assert runtime in ("torch", "onnxruntime", "onnxruntime-int8") and isinstance(speed, Speed)
        assert not (runtime != "torch" and (speed.bf16 or speed.channels_last))  # a graph is exported in fp32, NCHW


def test_bench_speed_options_refuses_an_unknown_option_before_any_work(tiny_run, capsys):
    assert main(["bench", "--checkpoint", str(tiny_run), "--speed-options", "fp32,warp-drive", "--data", "toy"]) == 2
    assert "warp-drive" in capsys.readouterr().err


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_takes_bf16_only_where_the_cpu_has_it(monkeypatch, has_bf16):
    monkeypatch.setattr(train_lib, "cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_lib.resolve_mixed_precision("auto") == ("bf16" if has_bf16 else "no")
    assert train_lib.resolve_mixed_precision("no") == "no" and train_lib.resolve_mixed_precision("bf16") == "bf16"


def test_a_clip_of_toy_frames_and_of_a_clinicdb_sequence_in_frame_order(tmp_path, clinicdb):
    folder, info = sequence_folder("toy", tmp_path / "toy", max_frames=5)
    assert sorted(p.name for p in folder.iterdir()) == [f"toy_{i:03d}.png" for i in range(5)] and info["sequence"] is None
    assert info["frames"] == [s.id for s in make_toy_dataset(5)]  # ids a split names
    folder, info = sequence_folder(clinicdb, tmp_path / "clinicdb", sequence=2)
    ids = [int(i) for i in info["frames"]]
    assert info["sequence"] == 2 and ids == list(range(ids[0], ids[-1] + 1))  # whole, in order
    assert len(list(folder.iterdir())) == len(ids) and all(p.is_symlink() for p in folder.iterdir())
    folder, again = sequence_folder(clinicdb, tmp_path / "clinicdb", sequence=3)  # rebuilt, not added to
    assert len(list(folder.iterdir())) == len(again["frames"])


def test_bench_times_the_exported_graph_with_onnxruntime(tiny_run, capsys):
    assert main(["bench", "--checkpoint", str(tiny_run), "--runtime", "onnxruntime", "--repeats", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["runtime"] == "onnxruntime" and result["latency_s"]["1"] > 0 and result["model"] == str(tiny_run)


def test_compiled_networks_keep_their_types_and_give_the_same_masks():
    """bench --compile on a GPU: torch.compile in place. Here with the eager backend, which
    traces the modules as torch.compile does but needs no compiler, so the test stays quick."""
    from syndiff_lib.bench import benchmark, compile_networks
    from syndiff_lib.config import get_profile
    from syndiff_lib.pipeline import SynDiffPipeline

    torch.manual_seed(0)
    pipe = SynDiffPipeline.from_profile(get_profile("tiny"))
    frames = images(2, size=64)
    before = pipe(frames, generator=torch.Generator().manual_seed(0), output_size="model")
    kinds = [type(m) for m in (pipe.image_encoder, pipe.unet, pipe.vae.decoder)]
    compile_networks(pipe, backend="eager")
    assert [type(m) for m in (pipe.image_encoder, pipe.unet, pipe.vae.decoder)] == kinds
    after = pipe(frames, generator=torch.Generator().manual_seed(0), output_size="model")
    np.testing.assert_allclose(np.stack(after.soft_masks), np.stack(before.soft_masks), atol=1e-5)
    result = benchmark(pipe, steps=(1,), warmup=0, repeats=1)
    assert result["compiled"] is False and result["peak_memory_gb"] is None  # what it records, on a CPU


@pytest.mark.parametrize("flags", [["--train-step", "tiny"], ["--runtime", "onnxruntime"]])
def test_bench_refuses_compile_where_it_does_not_apply(tiny_run, capsys, flags):
    assert main(["bench", "--checkpoint", str(tiny_run), "--compile", *flags]) == 2
    assert "--compile" in capsys.readouterr().err


def test_a_training_step_benchmark_records_its_device_and_memory():
    from syndiff_lib.bench import train_step_benchmark
    from syndiff_lib.config import get_profile

    result = train_step_benchmark(get_profile("tiny"), steps=1, warmup=0)
    assert result["device"] == "cpu" and set(result["seconds_per_step"]) == {"syndiff", "baseline"}
    assert result["peak_memory_gb"] == {"syndiff": None, "baseline": None}  # GPU memory only
