"""ONNX export and the video path (notebook 07): onnxruntime's masks are PyTorch's, int8 runs,
and an overlay clip has one frame per input frame at the input's size. Tiny random models:
equality needs no training."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from syndiff_lib.baseline import build_baseline_unet
from syndiff_lib.cli import main
from syndiff_lib.config import get_profile
from syndiff_lib.data import make_toy_dataset
from syndiff_lib.export import OnnxPipeline, compare_graphs, export_onnx, mask_dice
from syndiff_lib.pipeline import BaselinePipeline


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(tiny_run, out, int8=True)
    return out


def toy_images(n=5):
    """Frames at three sizes, none the model's 64: the resize in and back out is part of the check."""
    return [s.image for s in make_toy_dataset(n, size=80)[:3]] + [s.image for s in make_toy_dataset(n - 3, size=48)]


def test_preprocess_json_records_what_the_caller_must_do(exported):
    record = json.loads((exported / "preprocess.json").read_text())
    assert record["model"] == "syndiff" and record["image_size"] == 64 and record["value_range"] == [-1, 1]
    assert record["t_infer"] == 999 and record["threshold"] == 0.5 and record["noise"]["is_input"]
    assert record["noise"]["shape"] == ["B", 4, 8, 8]
    assert record["fit"] == "stretch"  # the tiny run was trained on stretched frames
    assert (exported / "model.onnx").exists() and (exported / "model.int8.onnx").exists()


def test_onnxruntime_masks_equal_pytorch_masks(tiny_pipe, exported):
    images = toy_images()
    ref = tiny_pipe(images, generator=torch.Generator().manual_seed(3), batch_size=2)  # several batches: noise order
    out = OnnxPipeline.from_pretrained(exported)(images, generator=torch.Generator().manual_seed(3), batch_size=2)
    assert 0 < sum(m.sum() for m in ref.masks) < sum(m.size for m in ref.masks)  # neither all empty nor all full
    assert mask_dice(ref.masks, out.masks) >= 0.999
    for a, b in zip(ref.soft_masks, out.soft_masks):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_run_folder_is_exported_on_the_fly(tiny_pipe, tiny_run):
    images = toy_images(4)
    ref = tiny_pipe(images, generator=torch.Generator().manual_seed(0))
    out = OnnxPipeline.from_pretrained(tiny_run)(images, generator=torch.Generator().manual_seed(0))
    assert mask_dice(ref.masks, out.masks) >= 0.999


def test_the_graph_refuses_steps_it_cannot_run(exported):
    pipe = OnnxPipeline.from_pretrained(exported)
    with pytest.raises(ValueError, match="--steps"):
        pipe(toy_images(4), num_inference_steps=50)
    with pytest.raises(ValueError, match="--t-infer"):
        pipe(toy_images(4), t_infer=50)


def test_int8_graph_runs_and_reports_its_dice_against_fp32(exported):
    agreement = compare_graphs(exported, toy_images())
    print(f"int8 vs fp32 on toy frames: Dice {agreement['dice']:.4f}, soft max |diff| {agreement['soft_max_abs']:.4f}")
    assert 0 <= agreement["dice"] <= 1 and np.isfinite(agreement["soft_max_abs"])  # reported, not judged here


def test_baseline_exports_as_unet_and_sigmoid(tmp_path):
    profile = get_profile("tiny")
    torch.manual_seed(0)
    baseline = BaselinePipeline(build_baseline_unet(profile), profile)
    baseline.save_pretrained(tmp_path / "run")
    export_onnx(tmp_path / "run", tmp_path / "onnx")
    images = toy_images(4)
    ref, out = baseline(images), OnnxPipeline.from_pretrained(tmp_path / "onnx")(images)
    assert mask_dice(ref.masks, out.masks) >= 0.999
    for a, b in zip(ref.soft_masks, out.soft_masks):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("clip_name", ["overlay.mp4", "overlay.gif"])
def test_segment_writes_an_overlay_clip_of_the_input_frames(exported, tmp_path, capsys, clip_name):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, sample in enumerate(make_toy_dataset(6, size=72)):  # 10 before 2 in plain sorting: natural order is checked
        Image.fromarray(sample.image).save(frames / f"frame{[1, 2, 3, 10, 11, 20][i]}.png")
    clip = tmp_path / clip_name
    code = main(["segment", "--checkpoint", str(exported), "--runtime", "onnxruntime", str(frames),
                 "--out", str(tmp_path / "masks"), "--overlay", str(clip)])
    assert code == 0
    assert "frames/s" in capsys.readouterr().out
    read_back = iio.imread(clip, index=None, **({"plugin": "FFMPEG"} if clip.suffix == ".mp4" else {}))
    assert read_back.shape[:3] == (6, 72, 72)
    assert len(list((tmp_path / "masks").glob("*.png"))) == 6


def test_segment_reads_a_video_file(exported, tmp_path, capsys):
    video = tmp_path / "in.mp4"
    iio.imwrite(video, np.stack([s.image for s in make_toy_dataset(6, size=64)]), plugin="FFMPEG", fps=5,
                macro_block_size=1)
    code = main(["segment", "--checkpoint", str(exported), "--runtime", "onnxruntime", str(video),
                 "--out", str(tmp_path / "masks"), "--overlay", str(tmp_path / "out.mp4")])
    assert code == 0, capsys.readouterr().err
    assert iio.imread(tmp_path / "out.mp4", index=None, plugin="FFMPEG").shape[:3] == (6, 64, 64)
    assert sorted(p.name for p in (tmp_path / "masks").iterdir())[0] == "in_00000.png"


def test_without_ffmpeg_the_overlay_clip_is_a_gif(monkeypatch, tmp_path, capsys):
    import imageio_ffmpeg

    from syndiff_lib.video import open_clip_writer

    def no_ffmpeg():
        raise RuntimeError("no ffmpeg")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_ffmpeg)
    writer, path = open_clip_writer(tmp_path / "clip.mp4", fps=10, frame_shape=(32, 40, 3))
    for i in range(3):
        writer.append_data(np.full((32, 40, 3), 60 * i, np.uint8))
    writer.close()
    assert path == tmp_path / "clip.gif" and "GIF" in capsys.readouterr().out
    assert iio.imread(path, index=None).shape[:3] == (3, 32, 40)
