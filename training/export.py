"""Export the student LoRA as kohya-format .safetensors (lora_unet_* + real .alpha) with SCott metadata and the
family's kohya / modelspec base-model names."""

import json
import os
from pathlib import Path

from scott_core import lora_format
from scott_core.solvers import SOLVERS

from .models.adapters import STUDENT


def peft_state_dict(unet, adapter=STUDENT):
    """The adapter's weights in peft/diffusers naming ('<module>.lora_A.weight'), adapter tag removed."""
    from peft.utils import get_peft_model_state_dict

    return {
        k: v.detach().float().cpu().contiguous()
        for k, v in get_peft_model_state_dict(unet, adapter_name=adapter).items()
    }


def to_kohya(peft_sd, alpha, family):
    """peft UNet LoRA keys -> the family's kohya keys (lora_unet_*.lora_down/up) with the real lora_alpha as .alpha."""
    meta = {lora_format.DIFFUSERS_METADATA_KEY: json.dumps({"lora_alpha": float(alpha)})}
    return {k: v.contiguous() for k, v in lora_format.to_kohya(peft_sd, meta, family.core).items()}


def metadata(cfg, family, teacher_name, teacher_sha256, step=None, extra=None):
    """String metadata: what the LoRA is, what it was distilled from and how (solver + only its knob, the adversarial
    schedule), how to sample, (given) the optimiser step it was taken at, and `extra` {key: value} (keep-best's score
    and its name)."""
    values = {
        "scott.format": "1",
        "scott.base_model": teacher_name,
        "scott.base_model_sha256": teacher_sha256,
        "scott.resolution": cfg.resolution,
        "scott.mode": cfg.mode,
        "scott.solver": cfg.solver,
        **{f"scott.{knob}": getattr(cfg, knob) for knob in SOLVERS[cfg.solver].knobs},  # only the knob it used
        "scott.sub_steps": cfg.sub_steps,
        "scott.adv_weight": cfg.adv_weight,
        **adversarial_schedule(cfg),
        "ss_network_module": "networks.lora",
        "ss_network_dim": cfg.lora_rank,
        "ss_network_alpha": cfg.lora_alpha,
        "ss_base_model_version": family.kohya_base_version,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.title": cfg.name,
        **({"scott.step": step} if step is not None else {}),
        **(extra or {}),
    }
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
    return {
        **values,
        **lora_format.sampling_metadata(cfg.recommended_steps, cfg.recommended_gamma, cfg.recommended_cfg),
    }


def adversarial_schedule(cfg):
    """The adversarial term's schedule as metadata (adversarial runs only): its linear decay and how often the
    discriminator updated."""
    if not cfg.adv_weight:
        return {}
    return {"scott.adv_decay_steps": cfg.adv_decay_steps, "scott.disc_every": cfg.disc_every}


def export_lora(unet, cfg, family, teacher_name, teacher_sha256, path, step=None, extra=None):
    """Write the student LoRA to `path` atomically (temp + rename) in `family`'s kohya naming, `step` and `extra` in
    its metadata; returns the kohya state dict."""
    from safetensors.torch import save_file

    state = to_kohya(peft_state_dict(unet), cfg.lora_alpha, family)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata(cfg, family, teacher_name, teacher_sha256, step, extra))
    os.replace(tmp, path)
    return state
