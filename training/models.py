"""Teacher loading (offline, single file or diffusers folder); the UNet's adapters: student, target, disc."""

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import UserError

ASSETS = Path(__file__).resolve().parent / "assets" / "sd15"

# LCM-LoRA's adapted layers (diffusers' train_lcm_distill_lora_sd*.py).
STUDENT_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]
# The discriminator's LoRA: the same kinds of layers, only in the blocks its features come from (--disc-features):
# the up (decoder) blocks, or the down (encoder) blocks and the mid block.
DISC_LAYERS = r"(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2)"
DISC_TARGETS = {
    "up": rf"up_blocks\.\d+\..*\.{DISC_LAYERS}",
    "down_mid": rf"(down_blocks\.\d+|mid_block)\..*\.{DISC_LAYERS}",
}
STUDENT, TARGET, DISC = "student", "target", "disc"
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


def lora_config(rank, alpha, targets):
    """peft LoraConfig for a UNet adapter (gaussian A, zero B: the adapter starts as the identity)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)


def add_adapters(unet, rank, alpha, disc_rank=None, disc_features="up"):
    """Student (trainable), target (its EMA copy, frozen) and, given disc_rank, the discriminator's LoRA on the
    blocks its features come from."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Already found a `peft_config`"
        )  # several adapters: on purpose
        unet.add_adapter(lora_config(rank, alpha, STUDENT_TARGETS), adapter_name=STUDENT)
        unet.add_adapter(lora_config(rank, alpha, STUDENT_TARGETS), adapter_name=TARGET)
        if disc_rank:
            unet.add_adapter(lora_config(disc_rank, disc_rank, DISC_TARGETS[disc_features]), adapter_name=DISC)
    for name, param in unet.named_parameters():
        if ".lora_" in name:
            param.data = param.data.float()  # adapters train (and average) in fp32 over a bf16/fp16 base
        param.requires_grad_(f".{STUDENT}." in name or f".{DISC}." in name)
    copy_adapter(unet, STUDENT, TARGET)
    unet.set_adapter(STUDENT)
    _restore_trainable(unet)


def adapter_params(unet, adapter):
    """{name: parameter} of one adapter, names with the adapter tag."""
    return {n: p for n, p in unet.named_parameters() if f".{adapter}." in n}


def _pairs(unet, source, dest):
    src, dst = adapter_params(unet, source), adapter_params(unet, dest)
    return [(p, dst[n.replace(f".{source}.", f".{dest}.")]) for n, p in src.items()]


@torch.no_grad()
def copy_adapter(unet, source, dest):
    """dest LoRA weights := source LoRA weights."""
    for p_src, p_dst in _pairs(unet, source, dest):
        p_dst.copy_(p_src)


@torch.no_grad()
def ema_update(unet, decay):
    """target = decay * target + (1 - decay) * student, per LoRA tensor."""
    for p_student, p_target in _pairs(unet, STUDENT, TARGET):
        p_target.lerp_(p_student.to(p_target.dtype), 1 - decay)


def _restore_trainable(unet):
    """peft's set_adapter flips requires_grad; the rule here is fixed: student and disc train (unless frozen)."""
    trains = [a for a in (STUDENT, DISC) if a not in getattr(unet, "_scott_frozen", ())]
    for name, param in unet.named_parameters():
        trainable = any(f".{a}." in name for a in trains)
        if param.requires_grad != trainable:
            param.requires_grad_(trainable)


@contextlib.contextmanager
def frozen(unet, adapter, *modules):
    """Inside the context `adapter`'s LoRA and `modules` take no gradient (a pass through them still does)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    unet._scott_frozen = (*getattr(unet, "_scott_frozen", ()), adapter)
    _restore_trainable(unet)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        unet._scott_frozen = tuple(a for a in unet._scott_frozen if a != adapter)
        _restore_trainable(unet)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def using(unet, adapter):
    """Run the UNet as `adapter` (student | target | disc), or as the bare teacher for None."""
    if adapter is None:
        unet.disable_adapters()
    else:
        unet.set_adapter(adapter)
    _restore_trainable(unet)
    try:
        yield unet
    finally:
        if adapter is None:
            unet.enable_adapters()
        unet.set_adapter(STUDENT)
        _restore_trainable(unet)


class DiscriminatorHead(nn.Module):
    """One logit per sample from the UNet's block features: mean-pool each block, concat, small MLP."""

    def __init__(self, channels, hidden=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(sum(channels), hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features):
        pooled = torch.cat([f.float().mean(dim=(2, 3)) for f in features], dim=1)
        return self.mlp(pooled).squeeze(1)


def up_block_channels(unet):
    """Output channels of each up block, in order (the reversed block_out_channels)."""
    return list(reversed(unet.config.block_out_channels))


def feature_channels(unet, source="up"):
    """Channels of each feature the disc's head pools: the up blocks' ('up'), or each down block's then the mid
    block's ('down_mid')."""
    if source == "up":
        return up_block_channels(unet)
    channels = list(unet.config.block_out_channels)
    return [*channels, channels[-1]]


class _FeaturesTaken(Exception):
    """Raised by the mid block's hook under 'down_mid': the disc needs nothing the UNet computes after it."""


def unet_features(unet, source, x, t, cond):
    """The disc's features of one pass of the UNet's active adapter: each up block's output ('up'), or each down
    block's and the mid block's ('down_mid': the pass stops after the mid block, so the up blocks never run)."""
    features = []

    def take(module, inputs, output):
        features.append(output[0] if isinstance(output, tuple) else output)

    def take_and_stop(module, inputs, output):
        take(module, inputs, output)
        raise _FeaturesTaken

    if source == "up":
        hooks = [block.register_forward_hook(take) for block in unet.up_blocks]
    else:
        hooks = [block.register_forward_hook(take) for block in unet.down_blocks]
        hooks.append(unet.mid_block.register_forward_hook(take_and_stop))
    try:
        unet(x, t.to(x.device), encoder_hidden_states=cond)
    except _FeaturesTaken:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return features


def unet_eps_fn(unet, cond):
    """eps_fn(z, t) of the UNet's active adapter for caption embeddings `cond`, in float32: the one place a UNet
    call becomes an eps model (scott_core's consistency_denoiser / x0_from_eps take it from there)."""

    def eps_fn(z, t):
        return unet(z, t.to(z.device), encoder_hidden_states=cond).sample.float()

    return eps_fn


def guided_eps_fn(unet, cond, uncond, w):
    """eps_fn(z, t) with classifier-free guidance in LCM's form (1 + w) eps(z, t, c) - w eps(z, t, u), one UNet call
    on [c, u]; w a number or per-sample [B]."""
    from scott_core.solvers import cfg_combine

    eps = unet_eps_fn(unet, torch.cat([cond, uncond]))

    def eps_fn(z, t):
        e_cond, e_uncond = eps(torch.cat([z, z]), torch.cat([t, t])).chunk(2)
        return cfg_combine(e_cond, e_uncond, w)

    return eps_fn


def _lora_layers(module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapter_state(layers, state):
    """Inside the context the peft layers run with `state` = [(active adapters, disabled)], one per layer."""
    saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    for layer, (active, disabled) in zip(layers, state):
        layer._active_adapter, layer._disable_adapters = active, disabled
    try:
        yield
    finally:
        for layer, (active, disabled) in zip(layers, saved):
            layer._active_adapter, layer._disable_adapters = active, disabled


def adapter_checkpoint(module, *args):
    """torch.utils.checkpoint (non-reentrant) of one UNet block whose recompute in backward runs under the
    adapter that was active in its forward (the disc's backward runs after the context that chose it ends)."""
    layers = _lora_layers(module)
    state = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    return torch.utils.checkpoint.checkpoint(
        module.__call__,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), adapter_state(layers, state)),
    )


def enable_checkpointing(unet):
    """Gradient checkpointing of the UNet's blocks in every pass with grad, recomputed under the right adapter."""
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=adapter_checkpoint)
