"""The teacher: what a checkpoint is (single file or diffusers folder), refused kinds in one line (scott_core's
family table), offline loading with its family's pipeline, and its captions encoded as the family encodes them."""

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scott_core import families

from ..errors import UserError
from .conditioning import Conditioning
from .family import ModelFamily, trainer_family

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED = "this trainer distills eps-prediction SD1.5- and SDXL-family models"


class TeacherError(UserError):
    """A teacher path the trainer cannot use, with what it is and what to do."""


@dataclass
class Teacher:
    """The frozen components the trainer needs, and the family that says how they are used."""

    family: ModelFamily
    unet: nn.Module
    vae: nn.Module
    text_encoders: tuple  # in family.text_encoders' order
    tokenizers: tuple  # in family.tokenizers' order
    name: str
    sha256: str
    scheduler_config: Path  # the folder its noise schedule (and spacing) is read from

    def component(self, part):
        """The module a LoRA part ('unet', 'text_encoder', 'text_encoder_2') patches; None if it has none."""
        if part == "unet":
            return self.unet
        return dict(zip(self.family.text_encoders, self.text_encoders)).get(part)


@dataclass(frozen=True)
class Detected:
    """What ComfyUI would detect a model as (comfy/supported_models.py, model_base.ModelType): the config class
    name, the prediction type, the UNet's input channels, zero terminal SNR."""

    config: str
    model_type: str = "EPS"
    in_channels: int = 4
    zero_terminal_snr: bool = False

    def family(self, path):
        """The trainer family of the detected model, or a TeacherError naming what it is (the family table's
        refusals)."""
        try:
            core = families.family_of(self.config, self.model_type, self.in_channels, self.zero_terminal_snr)
        except families.UnsupportedModel as exc:
            raise TeacherError(f"teacher {path} is {exc.what} ({exc.name}); {SUPPORTED}") from None
        return trainer_family(core)


NOT_A_MODEL = {
    "lora": "is a LoRA, not a full checkpoint; pass the base model it was trained for",
    "other": "is not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet weights)",
}
UNET = "model.diffusion_model."


def detect_keys(shapes):
    """Detected from a single file's {key: shape}; 'lora' or 'other' (a str) for what is no model at all. The
    marker keys are ComfyUI's (SDXL.model_type): edm_mean + edm_std -> EDM, edm_vpred.sigma_max -> v-prediction
    EDM, v_pred -> v-prediction, ztsnr -> zero terminal SNR."""
    if any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_A." in k or ".lora_down." in k for k in shapes):
        return "lora"
    conv_in = shapes.get(f"{UNET}input_blocks.0.0.weight")
    if conv_in is None:
        return "other"
    return Detected(_config_name(shapes, conv_in), _model_type(shapes), conv_in[1], "ztsnr" in shapes)


def _config_name(shapes, conv_in):
    xl = f"{UNET}label_emb.0.0.weight" in shapes or any(k.startswith("conditioner.embedders.") for k in shapes)
    to_k = shapes.get(f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if xl:
        name = "SDXLRefiner" if conv_in[0] == 384 else "SDXL"
    elif any(k.startswith("cond_stage_model.model.") for k in shapes) or (to_k is not None and to_k[-1] == 1024):
        name = "SD20"
    else:
        name = "SD15"
    return f"{name}_instructpix2pix" if conv_in[1] == 8 and name in ("SD15", "SDXL") else name


def _model_type(keys):
    if "edm_mean" in keys and "edm_std" in keys:
        return "EDM"
    if "edm_vpred.sigma_max" in keys:
        return "V_PREDICTION_EDM"
    return "V_PREDICTION" if "v_pred" in keys else "EPS"


def detect_folder(path):
    """Detected from a diffusers folder's model_index.json, unet/config.json and scheduler config."""
    index = path / "model_index.json"
    if not index.is_file() or not (path / "unet" / "config.json").is_file():
        raise TeacherError(
            f"teacher folder {path} is not a diffusers pipeline (no model_index.json or unet/config.json)"
        )
    unet = json.loads((path / "unet" / "config.json").read_text())
    scheduler = _scheduler_config(path)
    if unet.get("addition_embed_type") == "text_time":
        name = "SDXLRefiner" if unet.get("cross_attention_dim") == 1280 else "SDXL"
    else:
        name = "SD20" if unet.get("cross_attention_dim") == 1024 else "SD15"
    in_channels = unet.get("in_channels", 4)
    if in_channels == 8 and name in ("SD15", "SDXL"):
        name += "_instructpix2pix"
    v_pred = "v_prediction" in (scheduler.get("prediction_type"), unet.get("prediction_type"))
    edm = scheduler.get("_class_name", "").startswith("EDM")
    model_type = {(True, True): "V_PREDICTION_EDM", (True, False): "EDM", (False, True): "V_PREDICTION"}
    zero_terminal_snr = bool(scheduler.get("rescale_betas_zero_snr"))
    return Detected(name, model_type.get((edm, v_pred), "EPS"), in_channels, zero_terminal_snr)


def _scheduler_config(path):
    config = path / "scheduler" / "scheduler_config.json"
    return json.loads(config.read_text()) if config.is_file() else {}


def safetensors_shapes(path):
    """{key: shape} of a .safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a readable safetensors file"
        raise TeacherError(f"teacher {path} is not a readable .safetensors file ({exc})") from None


def pickle_shapes(path):
    """{key: shape} of a trusted pickle checkpoint (its 'state_dict', memory-mapped where the file allows)."""
    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=False)
    except RuntimeError:
        state = torch.load(str(path), map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else () for k, v in state.items()}


def check_teacher_path(path, trust_ckpt=False):
    """The ModelFamily of the folder or single file at `path`; a TeacherError unless it is an eps-prediction
    SD1.5- or SDXL-family model we may open."""
    path = Path(path)
    if not path.exists():
        raise TeacherError(f"teacher {path} does not exist")
    if path.is_dir():
        return detect_folder(path).family(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not trust_ckpt:
        raise TeacherError(
            f"teacher {path} is a pickle checkpoint, which can run code when opened; convert it to .safetensors, "
            "or pass --trust-ckpt if you trust its source"
        )
    if suffix not in (*PICKLE_SUFFIXES, ".safetensors"):
        raise TeacherError(f"teacher {path} must be a .safetensors file or a diffusers folder")
    detected = detect_keys(pickle_shapes(path) if suffix in PICKLE_SUFFIXES else safetensors_shapes(path))
    if isinstance(detected, str):
        raise TeacherError(f"teacher {path} {NOT_A_MODEL[detected]}")
    return detected.family(path)


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
    """Load the UNet, VAE, text encoders and tokenizers offline with the family's pipeline, in `dtype` (an SDXL VAE
    stays float32 under float16): a folder as it is, a single file against the family's shipped configs."""
    import diffusers

    family = check_teacher_path(path, trust_ckpt)
    path = Path(path)
    pipeline = getattr(diffusers, family.pipeline)
    common = dict(local_files_only=True, dtype=dtype, **family.pipeline_kwargs)
    if path.is_dir():
        pipe = pipeline.from_pretrained(str(path), **common)
    else:
        pipe = pipeline.from_single_file(str(path), config=str(family.assets), **common)
    encoders = tuple(getattr(pipe, name) for name in family.text_encoders)
    for module in (pipe.unet, pipe.vae, *encoders):
        module.requires_grad_(False)
    if family.vae_fp32_under_fp16 and dtype == torch.float16:
        pipe.vae.to(torch.float32)
    scheduler = path / "scheduler" if path.is_dir() else family.assets / "scheduler"
    tokenizers = tuple(getattr(pipe, name) for name in family.tokenizers)
    return Teacher(family, pipe.unet, pipe.vae, encoders, tokenizers, path.stem, file_sha256(path), scheduler)


def vae_scale(vae):
    """The VAE's downscale factor (pixels per latent): 2 per down block after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tokenize(tokenizer, captions):
    """Token ids [N, 77], padded to the tokenizer's length as the diffusers pipelines pad them."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_tokens(family, encoders, token_ids):
    """The Conditioning of token ids (one [B, 77] tensor per text encoder) as the family's pipeline encodes a prompt
    (no time ids): each encoder's last hidden states after the final norm (SD1.5) or penultimate hidden states (SDXL:
    CLIP-L's and bigG's concatenated), and SDXL's pooled embedding (bigG's projected pooled output); in the
    encoders' dtype, where they are; with grad where the caller has it (a teacher being trained)."""
    states, pooled = [], None
    for name, encoder, ids in zip(family.text_encoders, encoders, token_ids):
        out = encoder(ids.to(encoder.device), output_hidden_states=family.penultimate)
        states.append(out.hidden_states[-2] if family.penultimate else out[0])
        if name == family.pooled_from:
            pooled = out[0]
    return Conditioning(torch.cat(states, dim=-1), pooled)


@torch.no_grad()
def encode_captions(teacher, captions):
    """The captions' Conditioning from the teacher's tokenizers and frozen text encoders (encode_tokens)."""
    ids = [tokenize(tokenizer, captions) for tokenizer in teacher.tokenizers]
    return encode_tokens(teacher.family, teacher.text_encoders, ids)


def family_pipeline(family, vae, unet, text_encoders, tokenizers, scheduler):
    """The family's diffusers pipeline over these modules, with its pipeline_kwargs (no safety checker or
    watermark)."""
    import diffusers

    return getattr(diffusers, family.pipeline)(
        vae=vae, unet=unet, scheduler=scheduler, **dict(zip(family.text_encoders, text_encoders)),
        **dict(zip(family.tokenizers, tokenizers)), **family.pipeline_kwargs,
    )


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
