"""The UNet's LoRA adapters: student (trainable), target (its EMA) and disc on one base UNet; switching between them
(and the bare teacher), freezing one, and gradient checkpointing that recomputes a block under the adapter it ran."""

import contextlib
import json
import warnings

import torch

from scott_core import lora_format

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


def load_student(unet, path):
    """The student adapter's weights := those of a LoRA file (any format scott_core.lora_format reads, such as
    export_lora's kohya file): export's inverse. A file of another rank or alpha is a ValueError."""
    from peft import set_peft_model_state_dict

    state, metadata = lora_format.read_safetensors(path)
    weights, meta = lora_format.to_diffusers(state, metadata, prefixed=False)
    found = json.loads(meta[lora_format.DIFFUSERS_METADATA_KEY])
    config = unet.peft_config[STUDENT]
    if (found["r"], found["lora_alpha"]) != (config.r, float(config.lora_alpha)):
        raise ValueError(f"{path}: rank {found['r']}, alpha {found['lora_alpha']}; the student adapter has rank "
                         f"{config.r}, alpha {config.lora_alpha}")
    result = set_peft_model_state_dict(unet, weights, adapter_name=STUDENT)
    if result.unexpected_keys:
        raise ValueError(f"{path}: layers the student adapter lacks, e.g. {result.unexpected_keys[:2]}")


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
