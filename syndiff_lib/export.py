"""One ONNX graph per trained run, and OnnxPipeline, which runs it with onnxruntime.

Taught in notebook 07 (efficiency). The SynDiff graph is the single step written out:

    pixels [B, 3, S, S] in [-1, 1] -> E_phi -> z_c ; [z_c || noise] -> U-Net(t_infer) -> z~_0 -> D -> soft_mask, mask
    inputs:  pixels  float32 [B, 3, S, S]   the frame after pipeline.images_to_tensor
             noise   float32 [B, 4, h, w]   z_t ~ N(0, I), drawn outside the graph (below)
    outputs: soft_mask float32 [B, 1, S, S] in [0, 1];  mask bool [B, 1, S, S] = soft_mask > threshold

B is dynamic; S is the model's image_size and h = w = S / 8. The baseline's graph is its
U-Net and a sigmoid, with no noise input. DIR/preprocess.json records everything a caller
must do around the graph (resize, value range, threshold, t_infer, how to draw the noise).

Why the noise is an input and not a constant: SynDiffPipeline draws it with
``torch.randn(shape, generator)``, one draw per batch, so its value depends on the batch
size and on how many batches came before. Fed from outside, the same generator gives the
same noise to both runtimes, and the ONNX masks are those of SynDiffPipeline for any batch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .autoencoder import decode_mask
from .diffusion import single_step
from .metrics import dice_score
from .pipeline import BaselinePipeline, Speed, images_to_tensor, load_pipeline, soft_maps_to_output

GRAPH_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
PREPROCESS_NAME = "preprocess.json"
# Opset 17: new enough for every operator these graphs use, old enough that onnxruntime
# releases of the last years read it.
OPSET = 17


class SingleStepGraph(torch.nn.Module):
    """SynDiffPipeline's one-step call as a module of two tensors, for torch.onnx.export (notebook 07)."""

    def __init__(self, pipe, threshold: float):
        super().__init__()
        self.pipe, self.threshold = pipe, threshold
        self.image_encoder, self.unet, self.vae = pipe.image_encoder, pipe.unet, pipe.vae  # registered: exported weights

    def forward(self, pixels, noise):
        cfg = self.pipe.profile.diffusion
        image_latent = self.image_encoder(pixels)  # [B, 4, h, w]
        # The library's own single step and decoder: the graph is this code traced, not a copy of it.
        mask_latent = single_step(self.unet, self.pipe.scheduler, cfg, image_latent, cfg.t_infer, noise=noise)
        soft = decode_mask(self.vae, mask_latent, self.pipe.speed.decode_downscale)  # [B, 1, S, S]
        return soft, soft > self.threshold


class BaselineGraph(torch.nn.Module):
    """BaselinePipeline's call: the pixel U-Net's logits through a sigmoid (notebook 07)."""

    def __init__(self, unet, threshold: float):
        super().__init__()
        self.unet, self.threshold = unet, threshold

    def forward(self, pixels):
        soft = self.unet(pixels, 0).sample.sigmoid()  # [B, 1, S, S]
        return soft, soft > self.threshold


def export_onnx(checkpoint, out_dir, int8: bool = False, threshold: float = 0.5, decode_downscale: int = 1) -> dict:
    """Write DIR/model.onnx (and model.int8.onnx with ``int8``) and DIR/preprocess.json for a
    run folder, SynDiff or baseline, on the CPU in float32. Returns the preprocess record.
    ``decode_downscale`` 2 or 4 exports SynDiff with the faster, approximate D
    (pipeline.Speed). Taught in notebook 07 (efficiency)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(checkpoint, device="cpu", dtype=torch.float32)
    if decode_downscale != 1:
        if isinstance(pipe, BaselinePipeline):
            raise ValueError("--decode-downscale applies to SynDiff runs only: the baseline has no decoder")
        pipe.set_speed(Speed(decode_downscale=decode_downscale))
    size = pipe.profile.train.image_size
    pixels = torch.zeros(2, 3, size, size)  # a batch of 2, so nothing is traced as batch 1
    if isinstance(pipe, BaselinePipeline):
        graph, inputs, names = BaselineGraph(pipe.unet, threshold), (pixels,), ["pixels"]
    else:
        with torch.no_grad():
            latent_shape = list(pipe.image_encoder(pixels[:1]).shape[1:])  # [4, h, w]
        graph, inputs, names = SingleStepGraph(pipe, threshold), (pixels, torch.zeros(2, *latent_shape)), ["pixels", "noise"]
    outputs = ["soft_mask", "mask"]
    # The TorchScript exporter (dynamo=False): with this torch it works offline and needs no
    # package beyond onnx, where the torch.export-based one (dynamo=True, dynamic_shapes) also
    # needs onnxscript and onnx-ir; it exports this graph too, so switch when torch drops this one.
    # It warns that it is deprecated and about Python ifs on shapes inside diffusers (fixed
    # for a given S, so tracing them is right); those warnings are silenced here.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.eval(), inputs, str(out_dir / GRAPH_NAME), dynamo=False, opset_version=OPSET,
                          input_names=names, output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in names + outputs})
    record = {
        "model": "baseline" if isinstance(pipe, BaselinePipeline) else "syndiff",
        "graph": GRAPH_NAME, "int8_graph": INT8_NAME if int8 else None, "opset": OPSET, "batch": "dynamic",
        "checkpoint": str(checkpoint), "torch": torch.__version__,
        "inputs": {"pixels": f"float32 [B, 3, {size}, {size}]"},
        "outputs": {"soft_mask": f"float32 [B, 1, {size}, {size}]", "mask": f"bool [B, 1, {size}, {size}]"},
        "image_size": size, "channels": "RGB", "layout": "NCHW", "value_range": [-1, 1], "normalise": "x / 127.5 - 1",
        "resize": "bilinear, antialias=True, align_corners=False (torch F.interpolate in pipeline.images_to_tensor), "
                  "only when the frame is not already image_size x image_size",
        "resize_back": "soft_mask bilinear, align_corners=False, to the frame's size, then > threshold",
        "threshold": threshold,
        # How a frame became the square the model was trained on (data.letterbox): a caller
        # feeding the graph must make its squares the same way.
        "fit": pipe.profile.train.fit,
    }
    if record["model"] == "syndiff":
        cfg = pipe.profile.diffusion
        record["inputs"]["noise"] = f"float32 [B, {', '.join(map(str, latent_shape))}]"
        record.update(t_infer=cfg.t_infer, prediction_type=cfg.prediction_type, decode_downscale=decode_downscale, noise={
            "is_input": True, "shape": ["B", *latent_shape], "distribution": "N(0, I)",
            "draw": "torch.randn([b, *shape[1:]], generator=generator) per batch of b frames, "
                    "one generator = torch.Generator().manual_seed(seed) for the whole call (as SynDiffPipeline)"})
    if int8:
        quantize_int8(out_dir / GRAPH_NAME, out_dir / INT8_NAME)
    (out_dir / PREPROCESS_NAME).write_text(json.dumps(record, indent=2))
    return record


def quantize_int8(graph_path, int8_path) -> Path:
    """int8 weights, activations quantised on the fly (onnxruntime's quantize_dynamic). Whether
    to ship it is decided on measured Dice and speed, not here. Taught in notebook 07 (efficiency)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # It logs a warning for every integer tensor it leaves alone (shapes, pads): silenced.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(str(graph_path), str(int8_path), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return Path(int8_path)


def mask_dice(masks_a, masks_b) -> float:
    """Dice between two sets of binary masks, all pixels pooled (both empty: 1.0, as
    metrics.dice_score): how well two runtimes agree. Taught in notebook 07 (efficiency)."""
    a = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks_a])[None]  # [1, P]
    b = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks_b])[None]
    return dice_score(a, b)


def compare_graphs(export_dir, images, seed: int = 0) -> dict:
    """The int8 graph against the fp32 one on ``images``, with the same noise: Dice of the
    masks (mask_dice) and the largest soft-mask difference. Taught in notebook 07 (efficiency)."""
    fp32, int8 = (OnnxPipeline.from_pretrained(export_dir, int8=q)(images, generator=torch.Generator().manual_seed(seed))
                  for q in (False, True))
    return {"dice": mask_dice(fp32.masks, int8.masks),
            "soft_max_abs": float(max(np.abs(a - b).max() for a, b in zip(fp32.soft_masks, int8.soft_masks)))}


class OnnxPipeline:
    """An exported graph behind SynDiffPipeline's call: same arguments, same SynDiffOutput, so
    evaluate and segment treat it alike. Taught in notebook 07 (efficiency)."""

    def __init__(self, session, record: dict):
        self.session, self.record = session, record
        self.image_size = record["image_size"]

    @classmethod
    def from_pretrained(cls, path, int8: bool = False, device: str = "cpu") -> "OnnxPipeline":
        """An export folder (holding preprocess.json), or a run folder, exported first into a
        temporary folder that is deleted once onnxruntime holds the graph in memory."""
        path = Path(path)
        if not (path / PREPROCESS_NAME).exists():
            tmp = Path(tempfile.mkdtemp(prefix="syndiff-onnx-"))
            try:
                export_onnx(path, tmp, int8=int8)
                return cls.from_pretrained(tmp, int8, device)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        record = json.loads((path / PREPROCESS_NAME).read_text())
        name = record["int8_graph"] if int8 else record["graph"]
        if name is None:
            raise FileNotFoundError(f"{path} holds no int8 graph: export it with `syndiff export --int8`")
        return cls(make_session(path / name, device), record)

    def check_inputs(self, num_inference_steps: int = 1, t_infer: int | None = None, output_size: str = "input") -> None:
        """Refuse what the graph cannot do (it is one step at the exported t_infer), naming the flag."""
        if num_inference_steps != 1:
            raise ValueError(f"the exported graph is one step: --steps must be 1 with --runtime onnxruntime, "
                             f"got {num_inference_steps}")
        if t_infer is not None and self.record["model"] == "baseline":
            raise ValueError("the baseline has no diffusion: --t-infer applies to SynDiff runs only")
        if t_infer is not None and t_infer != self.record["t_infer"]:
            raise ValueError(f"the exported graph runs at t_infer {self.record['t_infer']} only: drop --t-infer {t_infer}, "
                             "or use --runtime torch")
        if output_size not in ("input", "model"):
            raise ValueError(f"output_size must be 'input' or 'model', got {output_size!r}")

    def __call__(self, images, num_inference_steps: int = 1, t_infer: int | None = None,
                 generator: torch.Generator | None = None, threshold: float = 0.5, batch_size: int = 16,
                 output_size: str = "input"):
        """Segment uint8 RGB images, as SynDiffPipeline.__call__ (same generator -> same masks)."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        self.check_inputs(num_inference_steps, t_infer, output_size)
        soft_maps = []
        for start in range(0, len(images), batch_size):
            pixels = images_to_tensor(images[start : start + batch_size], self.image_size)  # [b, 3, S, S]
            feeds = {"pixels": pixels.numpy()}
            if self.record["model"] == "syndiff":  # drawn exactly as diffusion.single_step draws it
                shape = [len(pixels), *self.record["noise"]["shape"][1:]]
                feeds["noise"] = torch.randn(shape, generator=generator).numpy()  # [b, 4, h, w]
            soft, _ = self.session.run(["soft_mask", "mask"], feeds)
            soft_maps.append(torch.from_numpy(soft))  # [b, 1, S, S]
        # The graph's own mask is at the model's size; masks at the frame's size come from the
        # resized soft map, as in SynDiffPipeline.
        return soft_maps_to_output(images, torch.cat(soft_maps), output_size, threshold)


def make_session(graph_path, device: str = "cpu"):
    """An onnxruntime session on the CPU (or CUDA, with onnxruntime-gpu), using torch's thread count.
    Taught in notebook 07 (efficiency)."""
    import onnxruntime as ort

    providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}.get(device)
    if providers is None or providers[0] not in ort.get_available_providers():
        raise ValueError(f"--device {device} is not available to onnxruntime here (it has {ort.get_available_providers()})")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as the torch runtime
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":  # as cli.main asks of torch: idle threads sleep
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(graph_path), options, providers=providers)


def load_segmenter(path, runtime: str = "torch", device: str = "cpu"):
    """SynDiffPipeline or BaselinePipeline (runtime "torch") or OnnxPipeline ("onnxruntime").
    Taught in notebook 07 (efficiency)."""
    if runtime == "onnxruntime":
        return OnnxPipeline.from_pretrained(path, device=device)
    if runtime == "torch":
        return load_pipeline(path, device=device)
    raise ValueError(f"--runtime must be torch or onnxruntime, got {runtime!r}")
