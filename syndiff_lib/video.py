"""Segment a clip, frame by frame, and write the overlay clip (`syndiff segment --overlay`).

Taught in notebook 07 (efficiency). A clip is a video file (read with imageio's ffmpeg
plugin) or a folder of frames in natural order ("2" before "10"). Frames stream through:
read one, segment it, write its mask and overlay frame, so memory stays that of one frame
(the GIF fallback alone keeps every overlay frame until it writes them).

One noise generator runs through all the frames, as in pipeline.segment_files, so the masks
are those of one call on the whole clip with batch size 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import DataError, files_to_segment, read_image
from .pipeline import BaselinePipeline
from .viz import PRED_COLOR, overlay

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
FOLDER_FPS = 10  # a frame folder carries no frame rate: the overlay clip plays at this one


@dataclass
class Clip:
    """Where the frames come from: a video file, or the checked image files of a folder (notebook 07)."""

    path: Path
    files: list[Path] | None  # None for a video file
    fps: float


def find_clip(inputs, out_dir, overlay_path=None) -> Clip | None:
    """The clip `syndiff segment` was given, checked before any model loads, or None when the
    inputs are plain images and no overlay is asked for. Taught in notebook 07 (efficiency)."""
    inputs = [Path(i) for i in inputs]
    videos = [i for i in inputs if i.suffix.lower() in VIDEO_SUFFIXES]
    if not videos and overlay_path is None:
        return None
    if len(inputs) != 1:
        raise DataError(f"a clip is one video file or one frame folder, got {len(inputs)} inputs")
    if overlay_path is not None and Path(overlay_path).suffix.lower() not in (".mp4", ".gif"):
        raise DataError(f"{overlay_path}: --overlay writes an .mp4 or a .gif clip")
    source, out_dir = inputs[0], Path(out_dir)
    if source.is_dir():
        return Clip(source, files_to_segment([source], out_dir), FOLDER_FPS)  # naturally sorted, checked
    if not videos:
        raise DataError(f"{source}: --overlay takes a video file ({' '.join(VIDEO_SUFFIXES)}) or a frame folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: the masks of a video go to a new or empty folder; choose another --out")
    import imageio.v3 as iio

    try:
        fps = iio.immeta(source, plugin="FFMPEG").get("fps") or FOLDER_FPS
    except Exception as error:  # imageio raises many kinds for a missing or broken file
        raise DataError(f"{source}: cannot be read as a video ({str(error).splitlines()[0]})") from None
    return Clip(source, None, float(fps))


def clip_frames(clip: Clip):
    """(mask name, uint8 [H, W, 3] frame) pairs in order. Taught in notebook 07 (efficiency)."""
    if clip.files is not None:
        for f in clip.files:
            yield f"{f.stem}.png", read_image(f)
        return
    import imageio.v3 as iio

    for i, frame in enumerate(iio.imiter(clip.path, plugin="FFMPEG")):
        yield f"{clip.path.stem}_{i:05d}.png", np.ascontiguousarray(frame[..., :3])


class GifWriter:
    """imageio's writer interface (append_data, close) over PIL's animated GIF (notebook 07, efficiency)."""

    def __init__(self, path, fps: float):
        self.path, self.fps, self.frames = Path(path), fps, []

    def append_data(self, frame):
        self.frames.append(Image.fromarray(frame))

    def close(self):
        if self.frames:
            self.frames[0].save(self.path, save_all=True, append_images=self.frames[1:],
                                duration=round(1000 / self.fps), loop=0)


def open_clip_writer(path, fps: float, frame_shape):
    """An mp4 writer through imageio-ffmpeg, or a GifWriter for .gif and when ffmpeg is missing
    (then the clip goes to path.gif). Returns (writer, the path it writes). Taught in notebook 07 (efficiency)."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        try:
            import imageio.v2 as iio2
            import imageio_ffmpeg

            imageio_ffmpeg.get_ffmpeg_exe()  # raises when there is no ffmpeg binary
        except (ImportError, RuntimeError):
            path = path.with_suffix(".gif")
            print(f"note: ffmpeg is not available, writing an animated GIF instead: {path}")
        else:
            even = frame_shape[0] % 2 == 0 and frame_shape[1] % 2 == 0
            # yuv420p is what every player reads, but it needs even sides; 4:4:4 takes any size.
            # macro_block_size=1: keep the frame's own size (imageio would pad it to a multiple of 16).
            writer = iio2.get_writer(path, fps=fps, codec="libx264", macro_block_size=1,
                                     pixelformat="yuv420p" if even else "yuv444p")
            return writer, path
    return GifWriter(path, fps), path


def segment_clip(pipe, clip: Clip, out_dir, overlay_path=None, num_inference_steps: int = 1,
                 t_infer: int | None = None, seed: int = 0) -> dict:
    """Segment every frame: masks to out_dir (0/255 PNG), overlay frames to overlay_path.
    Returns frames, frames_per_s (end to end: read, segment, write) and the model call's
    per-frame latency p50/p95 in seconds. Taught in notebook 07 (efficiency)."""
    out_dir = Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    writer, written_to, latencies = None, None, []
    start = time.perf_counter()
    try:
        for name, frame in clip_frames(clip):
            t0 = time.perf_counter()
            if isinstance(pipe, BaselinePipeline):  # no steps, timestep or noise (segment_files does the same)
                out = pipe([frame], batch_size=1)
            else:
                out = pipe([frame], num_inference_steps, t_infer, generator, batch_size=1)
            mask = out.masks[0]  # [H, W] bool
            latencies.append(time.perf_counter() - t0)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out_dir / name)
            if overlay_path is not None:
                if writer is None:
                    writer, written_to = open_clip_writer(overlay_path, clip.fps, frame.shape)
                shaded = overlay(frame, mask, color=PRED_COLOR, alpha=0.35)  # the polyp tinted
                writer.append_data(overlay(shaded, mask, color=PRED_COLOR, contour_only=True))  # and outlined
    finally:
        if writer is not None:
            writer.close()
    if not latencies:
        raise DataError(f"{clip.path}: no frames")
    seconds = time.perf_counter() - start
    return {"frames": len(latencies), "frames_per_s": len(latencies) / seconds,
            "latency_p50_s": float(np.percentile(latencies, 50)), "latency_p95_s": float(np.percentile(latencies, 95)),
            "overlay": None if written_to is None else str(written_to)}


def sequence_folder(data, dest, sequence: int | None = None, max_frames: int = 60) -> tuple[Path, dict]:
    """A frame folder to play as a clip (notebook 07): one CVC-ClinicDB video sequence in frame
    order (links to the data set's images; ``sequence`` None takes the longest), or, for any
    other data, its first frames as they come (then it is no video, only frames in a row).
    Returns the folder and what it holds: the sequence and the frame ids."""
    from .data import clinicdb_frame, clinicdb_sequence, find_pairs, is_toy, make_toy_dataset

    dest = Path(dest)
    if dest.exists():  # rebuilt on every call: only what an earlier call wrote goes
        others = [f for f in dest.iterdir() if not (f.is_symlink() or f.name.startswith("toy_"))]
        if others:
            raise DataError(f"{dest}: holds files this function did not write (e.g. {others[0].name}); choose an empty folder")
        for old in dest.iterdir():
            old.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    if is_toy(data):
        samples = make_toy_dataset(max_frames)
        for sample in samples:
            Image.fromarray(sample.image).save(dest / f"{sample.id}.png")
        return dest, {"sequence": None, "frames": [s.id for s in samples]}
    images = {frame_id: image for frame_id, image, _ in find_pairs(data)}
    sequences = {}
    if all(clinicdb_frame(frame_id) is not None for frame_id in images):
        for frame_id in images:  # find_pairs sorts naturally: frame order within each sequence
            sequences.setdefault(clinicdb_sequence(frame_id), []).append(frame_id)
    if sequences:
        sequence = sequence or max(sequences, key=lambda k: len(sequences[k]))
        ids = sequences[sequence][:max_frames]
    else:
        sequence, ids = None, list(images)[:max_frames]
    for frame_id in ids:
        (dest / f"{frame_id}{images[frame_id].suffix}").symlink_to(Path(images[frame_id]).resolve())
    return dest, {"sequence": sequence, "frames": ids}
