"""A tiny StableDiffusionXLInpaintPipeline built from configs: no download, quick on a CPU.

For tests, and for notebook 02, which runs the SDXL code path with it where the real weights
cannot be downloaded (offline, or a CPU-only laptop). Random weights: it paints noise.

The components follow diffusers' own fast tests (tests/pipelines/stable_diffusion_xl/
test_stable_diffusion_xl_inpaint.py): a two-level UNet2DConditionModel with SDXL's "text_time"
added embedding, a two-level AutoencoderKL, two 5-layer CLIP text encoders and an Euler
scheduler. Two differences: the U-Net takes 9 input channels like the real inpainting
checkpoint (noisy latent 4 + mask 1 + masked-image latent 4), and the CLIP tokenizer is built
from a byte-level vocabulary written here instead of downloaded from the hub.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .synthesis import sdxl_inpaint_pipeline_class


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for the bytes 0..255 (as in GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(extra))]


def tiny_clip_tokenizer(folder) -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every byte is a token (514 ids, well under vocab_size 1000)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = _byte_characters()
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_sdxl_inpaint_pipeline(folder):
    """A random-weight StableDiffusionXLInpaintPipeline; `folder` receives the tokenizer's vocabulary files."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
        in_channels=9, out_channels=4,  # 9 = noisy latent (4) + mask (1) + masked-image latent (4)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,  # SDXL's size/crop micro-conditioning
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=72,  # 5 * 8 + 32
        cross_attention_dim=64,  # the two text encoders' hidden states, concatenated: 32 + 32
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, sample_size=128,
                        force_upcast=False)  # float32 already: nothing for the pipeline to upcast
    torch.manual_seed(0)
    text_config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                                 layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, pad_token_id=1,
                                 vocab_size=1000, hidden_act="gelu", projection_dim=32)
    tokenizer = tiny_clip_tokenizer(folder)
    pipe = sdxl_inpaint_pipeline_class()(
        vae=vae, text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, requires_aesthetics_score=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
