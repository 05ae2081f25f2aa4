"""The models the trainer benchmarks run on (a tiny SD-family UNet + VAE + text encoder, or random full-size SD1.5 from
the shipped configs) and the GPU memory of the trainer's step: the product's estimate (training/memory.py: the loop's
own build and step on fake tensors), or, on a CUDA GPU, the same loop functions on random weights measured with
torch.cuda.max_memory_allocated."""

import shutil
import tempfile
from pathlib import Path

import torch

from training.config import DistillConfig
from training.memory import GIB, estimate, random_teacher, run_steps, step_run
from training.models.family import SD15

TINY_RANKS = dict(lora_rank=4, disc_lora_rank=4)


def tiny_components():
    """A tiny SD-family UNet (cross-attention 32) with a matching tiny VAE and text encoder; (unet, vae, text,
    cross-attention width, VAE downscale)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4))
    return unet, vae, text, 32, 2


def sd15_components():
    """Random full-size SD1.5 UNet, VAE and CLIP-L text encoder from the shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15.assets / "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SD15.assets / "vae")))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SD15.assets / "text_encoder")))
    return unet, vae, text, 768, 8


def tiny_config_folder(folder):
    """A diffusers-layout folder with the tiny components' configs (no weights) and SD1.5's tokenizer: what the
    estimate reads a teacher's configs from."""
    folder = Path(folder)
    with torch.device("meta"):
        unet, vae, text, _, _ = tiny_components()
    unet.save_config(str(folder / "unet"))
    vae.save_config(str(folder / "vae"))
    text.config.save_pretrained(str(folder / "text_encoder"))
    shutil.copytree(SD15.assets / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)
    shutil.copy(SD15.assets / "model_index.json", folder / "model_index.json")
    return folder


def run_config(teacher, mode, resolution, batch_size, mixed_precision, gradient_checkpointing, cache_latents,
               model="sd15"):
    """The resolved trainer config of one memory figure: square crops (the largest bucket at `resolution` is
    resolution^2), the trainer's ranks (tiny: 4)."""
    return DistillConfig(
        teacher=str(teacher), data="-", output=tempfile.gettempdir(), mode=mode, resolution=resolution,
        batch_size=batch_size, mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
        cache_latents=cache_latents, buckets=False, **(TINY_RANKS if model == "tiny" else {}),
    ).resolved()


def settings(cfg):
    """The settings columns of one JSON line."""
    return {"config": cfg.mode, "gradient_checkpointing": cfg.gradient_checkpointing,
            "cache_latents": cfg.cache_latents, "resolution": cfg.resolution, "batch_size": cfg.batch_size,
            "mixed_precision": cfg.mixed_precision}


def estimate_line(cfg):
    """One JSON-ready dict: the product's estimate of cfg (peak, resident, per phase in GiB; TFLOP per phase)."""
    found = estimate(cfg)
    return {**settings(cfg), "peak_gib": round(found.peak_gib, 3), "peak_bytes": found.peak_bytes,
            "resident_gib": round(found.resident_bytes / GIB, 3),
            "phases": {k: round(v / GIB, 3) for k, v in found.phase_bytes.items()},
            "tflop": round(sum(found.phase_flops.values()) / 1e12, 3),
            "phase_tflop": {k: round(v / 1e12, 3) for k, v in found.phase_flops.items()}}


def measure_line(cfg):
    """The same loop functions on a CUDA GPU with random weights: the step's torch.cuda.max_memory_allocated /
    max_memory_reserved (GiB) from the second step on (AdamW's state exists)."""
    from training.loop import make_accelerator
    from training.memory import LiveBytes

    accelerator = make_accelerator(cfg)
    run = step_run(cfg, accelerator, random_teacher(cfg, accelerator.device))
    if cfg.cache_latents:  # as the loop moves them after caching
        for module in (run.teacher.vae, *run.teacher.text_encoders):
            module.to("cpu")
    run_steps(run, LiveBytes(), steps=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run_steps(run, LiveBytes(), steps=1)
    torch.cuda.synchronize()
    return {**settings(cfg), "max_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "max_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
            "device": torch.cuda.get_device_name()}
