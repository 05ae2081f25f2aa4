"""The teacher: what a checkpoint is (single file or diffusers folder), refused kinds in one line, offline loading."""

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "sd15"


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class TeacherError(UserError):
    """A teacher path the trainer cannot use, with what it is and what to do."""


@dataclass
class Teacher:
    """The frozen SD-family components the trainer needs."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    name: str
    sha256: str
    scheduler_config: Path = ASSETS / "scheduler"  # the folder its noise schedule (and spacing) is read from


def classify_keys(shapes):
    """'sd15' | 'sd15-inpaint' | 'sd2' | 'sdxl' | 'lora' | 'other' from {key: shape}."""
    unet = "model.diffusion_model."
    if any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_A." in k or ".lora_down." in k for k in shapes):
        return "lora"
    if f"{unet}label_emb.0.0.weight" in shapes or any(k.startswith("conditioner.embedders.") for k in shapes):
        return "sdxl"
    if f"{unet}input_blocks.0.0.weight" not in shapes:
        return "other"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"
    to_k = shapes.get(f"{unet}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None and to_k[-1] == 1024:
        return "sd2"
    if shapes[f"{unet}input_blocks.0.0.weight"][1] != 4:
        return "sd15-inpaint"
    return "sd15"


KIND_MESSAGES = {
    "sdxl": "is an SDXL checkpoint; this trainer distills SD1.5-family models only",
    "sd2": "is an SD2.x checkpoint (OpenCLIP text encoder, 1024-d cross-attention); this trainer distills "
    "SD1.5-family models only",
    "sd15-inpaint": "is an inpainting checkpoint (UNet input is not 4 channels); use a txt2img SD1.5 model",
    "lora": "is a LoRA, not a full checkpoint; pass the base model it was trained for",
    "other": "is not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet weights)",
}


def safetensors_shapes(path):
    """{key: shape} of a .safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a readable safetensors file"
        raise TeacherError(f"teacher {path} is not a readable .safetensors file ({exc})") from None


def check_teacher_path(path, trust_ckpt=False):
    """Raise TeacherError unless `path` is an SD1.5-family folder or single file we may open."""
    path = Path(path)
    if not path.exists():
        raise TeacherError(f"teacher {path} does not exist")
    if path.is_dir():
        return _check_diffusers_folder(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not trust_ckpt:
            raise TeacherError(
                f"teacher {path} is a pickle checkpoint, which can run code when opened; convert it to "
                ".safetensors, "
                "or pass --trust-ckpt if you trust its source"
            )
        return "sd15"
    if path.suffix.lower() != ".safetensors":
        raise TeacherError(f"teacher {path} must be a .safetensors file or a diffusers folder")
    kind = classify_keys(safetensors_shapes(path))
    if kind != "sd15":
        raise TeacherError(f"teacher {path} {KIND_MESSAGES[kind]}")
    return kind


def _check_diffusers_folder(path):
    index = path / "model_index.json"
    if not index.is_file() or not (path / "unet" / "config.json").is_file():
        raise TeacherError(
            f"teacher folder {path} is not a diffusers pipeline (no model_index.json or unet/config.json)"
        )
    pipeline = json.loads(index.read_text()).get("_class_name", "")
    unet_config = json.loads((path / "unet" / "config.json").read_text())
    if "XL" in pipeline or unet_config.get("addition_embed_type"):
        raise TeacherError(
            f"teacher {path} is an SDXL pipeline; this trainer distills SD1.5-family models only"
        )
    if unet_config.get("cross_attention_dim") == 1024:
        raise TeacherError(
            f"teacher {path} is an SD2.x pipeline; this trainer distills SD1.5-family models only"
        )
    if unet_config.get("prediction_type", "epsilon") != "epsilon" or _scheduler_prediction(path) != "epsilon":
        raise TeacherError(f"teacher {path} is not an epsilon-prediction model")
    return "sd15"


def _scheduler_prediction(path):
    config = path / "scheduler" / "scheduler_config.json"
    return json.loads(config.read_text()).get("prediction_type", "epsilon") if config.is_file() else "epsilon"


def file_sha256(path, chunk=1 << 24):
    """sha256 of a file, or of a folder's model files in name order (the base model's id)."""
    import hashlib

    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def load_teacher(path, trust_ckpt=False, dtype=torch.float32):
    """Load unet, vae, text encoder, tokenizer offline: single file (shipped SD1.5 configs) or folder."""
    from diffusers import StableDiffusionPipeline

    check_teacher_path(path, trust_ckpt)
    path = Path(path)
    common = dict(local_files_only=True, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if path.is_dir():
        pipe = StableDiffusionPipeline.from_pretrained(str(path), **common)
    else:
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(ASSETS), **common)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    scheduler = path / "scheduler" if path.is_dir() else ASSETS / "scheduler"
    return Teacher(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, path.stem, file_sha256(path), scheduler)


def tokenize(tokenizer, captions):
    """Token ids [N, 77], padded to the tokenizer's length as StableDiffusionPipeline pads them."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@contextlib.contextmanager
def on_device(module, device):
    """`module` on `device` inside the context, back where it was after (the VAE leaves the GPU once latents are
    cached; validation decodes on the GPU all the same)."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
        if home != torch.device(device) and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
