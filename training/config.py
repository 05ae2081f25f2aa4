"""The trainer's one typed config (defaults from METHOD.md), the CLI generated from it, and its resolution."""

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from scott_core.solvers import SOLVERS

MODES = ("scott", "lcm")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")

# What each mode means for the fields left unset (None): SCott (METHOD.md 2-4), vanilla CD (LCM).
MODE_DEFAULTS = {
    "scott": {
        "solver": "er_sde_5",
        "noise_strength": 0.3,
        "sub_steps": 3,
        "span": 24,
        "grid_spacing": 8,
        "adv_weight": 0.4,
    },
    "lcm": {
        "solver": "ode",
        "noise_strength": 0.0,
        "sub_steps": 1,
        "span": 20,
        "grid_spacing": 20,
        "adv_weight": 0.0,
    },
}


DEMO_TEACHER = Path(__file__).resolve().parent / "assets" / "demo"
WORLD_PREFIX = "world:"
# `--teacher demo`: the shipped shapes-world teacher (training/world), with defaults sized for minutes on a CPU.
# Flags given on the command line still win.
DEMO_DEFAULTS = {
    "data": WORLD_PREFIX + "4000",
    "output": "runs/demo",
    "resolution": 64,
    "batch_size": 16,
    "max_steps": 300,
    "lr": 3e-4,
    "lora_rank": 16,
    "disc_lora_rank": 8,
    "checkpoint_every": 100,
    "validate_every": 100,
    "validation_prompts": str(DEMO_TEACHER / "prompts.txt"),
    "num_workers": 0,
}


class UserError(ValueError):
    """A mistake the user can fix (bad flag, teacher, data): the CLI prints one line, exits non-zero."""


def _opt(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DistillConfig:
    """Every knob of one distillation run; None means "the mode's default" (see MODE_DEFAULTS)."""

    teacher: str = _opt(
        None,
        "the teacher: a single-file SD1.5-family checkpoint (.safetensors, original SD "
        "layout) or a diffusers folder; 'demo' = the shipped 64 px shapes-world teacher, with defaults sized "
        "for a few minutes on a CPU (data world:4000, resolution 64, batch 16, 300 steps, rank 16)",
        required=True,
    )
    data: str = _opt(
        None,
        "training images: a folder of images with same-name .txt captions (or metadata.jsonl / "
        ".csv with file_name,text), or webdataset .tar shards, brace patterns allowed "
        "('shards/{000..099}.tar'); 'world:N' renders N shapes-world images into <output>/world. Omit it "
        "for data-free distillation: the teacher first draws --synth-images "
        "images from the built-in prompt list into <output>/synth; 'prompts:FILE' does the same from your "
        "prompts (one a line)",
    )
    synth_images: int = _opt(
        10000,
        "data-free only: how many teacher images to draw (about 4 h of a 2024 GPU at 512 px, so that "
        "drawing and a 1000-step run fit in one GPU-day)",
    )
    synth_steps: int = _opt(25, "data-free only: DPM-Solver++ 2M steps per teacher image")
    synth_cfg: float = _opt(7.5, "data-free only: classifier-free guidance scale of the teacher images")
    output: str = _opt(
        "output", "output folder: checkpoints/, validation/, logs/, config.json and the exported LoRA"
    )
    name: str = _opt(
        None, "file name (no extension) of the exported LoRA; default <teacher name>_<mode>_lora"
    )
    mode: str = _opt(
        "scott",
        "scott: stochastic multi-step teacher + adversarial loss (METHOD.md 2-4); lcm: "
        "vanilla consistency distillation (ODE, 1 sub-step, span 20 on the 50-step grid, no "
        "adversarial loss), the baseline",
        choices=MODES,
    )
    solver: str = _opt(
        None, "teacher solver from t_n to t_m; default er_sde_5 (scott), ode (lcm)", choices=SOLVERS
    )
    noise_strength: float = _opt(
        None,
        "teacher noise: DDIM's eta for --solver ddim, the exponent knob "
        "phi(x)=x^(1+s^2) for --solver noise_strength; default 0.3 (scott), 0 (lcm)",
    )
    sub_steps: int = _opt(None, "teacher sub-steps h from t_n to t_m; default 3 (scott), 1 (lcm)")
    span: int = _opt(None, "skip K in timesteps: t_m = max(t_n - K, 0); default 24 (scott), 20 (lcm)")
    grid_spacing: int = _opt(
        None, "spacing of the t_n grid (T-1, T-1-spacing, ...); default 8 (scott), 20 (lcm)"
    )
    w_min: float = _opt(2.0, "lowest guidance scale w drawn per sample, in the (1+w)*cond - w*uncond form")
    w_max: float = _opt(14.0, "highest guidance scale w drawn per sample")
    huber_c: float = _opt(0.001, "pseudo-Huber constant c of the consistency loss sqrt(d^2 + c^2) - c")
    ema_decay: float = _opt(0.95, "EMA decay of the target LoRA after each optimiser step")
    adv_weight: float = _opt(
        None,
        "weight of the adversarial loss (0 turns it and the discriminator off); default 0.4 (scott), 0 (lcm)",
    )
    disc_renoise: bool = _opt(False, "score real and fake latents re-noised to t_n instead of clean at t_n")
    lora_rank: int = _opt(64, "rank of the student LoRA (LCM-LoRA's layers)")
    lora_alpha: float = _opt(None, "LoRA alpha of the student; default = --lora-rank (scale 1)")
    disc_lora_rank: int = _opt(32, "rank of the discriminator's LoRA on the UNet's up blocks")
    lr: float = _opt(1e-4, "student LoRA learning rate (AdamW)")
    disc_lr: float = _opt(2e-5, "discriminator (LoRA + head) learning rate")
    lr_warmup_steps: int = _opt(0, "linear learning-rate warm-up in optimiser steps")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)")
    batch_size: int = _opt(4, "images per process per micro-batch")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimiser step")
    max_steps: int = _opt(1000, "optimiser steps to train")
    resolution: int = _opt(512, "training resolution in pixels (resize of the short side + center crop)")
    caption_dropout: float = _opt(0.1, "probability a sample's caption is replaced by the empty caption")
    mixed_precision: str = _opt(
        "auto",
        "autocast precision of the UNet passes and of data-free synthesis; auto = bf16 on a CUDA GPU that has "
        "it, else fp16 on CUDA, no (fp32) on a CPU (bf16 also works on CPUs)",
        choices=MIXED_PRECISION,
    )
    gradient_checkpointing: bool = _opt(
        None,
        "recompute UNet activations in backward to save memory (every pass, the discriminator's included); "
        "default: on with CUDA, off on a CPU",
    )
    checkpoint_every: int = _opt(
        500, "write a resumable checkpoint every N optimiser steps (0: only at the end)"
    )
    keep_checkpoints: int = _opt(3, "how many of the latest checkpoints to keep")
    resume: str = _opt(
        None, "resume from a checkpoint folder, or 'latest' for the newest in <output>/checkpoints"
    )
    validate_every: int = _opt(500, "write a validation grid every N optimiser steps (0: off)")
    validation_prompts: str = _opt(
        None, "text file, one prompt a line, for the validation grids; default 4 built-in prompts"
    )
    validation_steps: str = _opt(
        "1,2,4", "sampling step counts shown in the validation grid, comma-separated"
    )
    num_workers: int = _opt(2, "data-loader worker processes per process")
    log_every: int = _opt(10, "log losses to TensorBoard every N optimiser steps")
    seed: int = _opt(0, "seed of data order, noise, timesteps, guidance scales and caption dropout")
    trust_ckpt: bool = _opt(False, "allow a .ckpt/.pt teacher (pickle: run only files you trust)")
    recommended_steps: int = _opt(4, "sampling steps written into the LoRA's metadata as the recommendation")
    recommended_gamma: float = _opt(
        1.0, "sampler gamma written into the LoRA's metadata (1: LCM's full re-noise)"
    )
    recommended_cfg: float = _opt(1.0, "CFG scale written into the LoRA's metadata")

    def resolved(self):
        """A copy with every None that a mode or another field decides filled in, validated."""
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        values = dataclasses.asdict(self)
        if self.teacher == "demo":
            values["teacher"] = str(demo_teacher())
        for key, value in MODE_DEFAULTS[self.mode].items():
            if values[key] is None:
                values[key] = value
        values.update(hardware_defaults(values["mixed_precision"], values["gradient_checkpointing"]))
        if values["lora_alpha"] is None:
            values["lora_alpha"] = float(values["lora_rank"])
        if values["name"] is None:
            values["name"] = f"{Path(str(self.teacher)).stem}_{self.mode}_lora"
        config = DistillConfig(**values)
        config.check()
        return config

    def check(self):
        """Raise ValueError naming the first out-of-range value."""
        positive = (
            "sub_steps",
            "span",
            "grid_spacing",
            "lora_rank",
            "batch_size",
            "grad_accum",
            "max_steps",
            "resolution",
            "keep_checkpoints",
            "disc_lora_rank",
            "log_every",
            "synth_images",
            "synth_steps",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.w_min <= self.w_max:
            raise UserError(f"need 0 <= --w-min <= --w-max, got {self.w_min} and {self.w_max}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.caption_dropout <= 1:
            raise UserError(f"--caption-dropout must be in [0, 1], got {self.caption_dropout}")
        if self.adv_weight < 0 or self.noise_strength < 0:
            raise UserError("--adv-weight and --noise-strength must be >= 0")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.span >= 1000:
            raise UserError(f"--span must be below 1000, got {self.span}")
        self.validation_step_counts()

    def validation_step_counts(self):
        """'1,2,4' -> [1, 2, 4]."""
        try:
            counts = [int(part) for part in self.validation_steps.split(",") if part.strip()]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1:
            raise UserError(
                f"--validation-steps must be comma-separated integers >= 1, got {self.validation_steps!r}"
            )
        return counts

    def save(self, path):
        """Write the config as JSON (the resolved config beside a run's outputs)."""
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")


def uses_cuda():
    """True where the run will train on a CUDA GPU (accelerate's ACCELERATE_USE_CPU forces the CPU)."""
    import os

    import torch

    return torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")


def hardware_defaults(mixed_precision, gradient_checkpointing):
    """'auto' precision and unset checkpointing resolved for this machine: bf16 (fp16 without bf16) and
    checkpointing on with CUDA, fp32 and no checkpointing on a CPU."""
    cuda = uses_cuda()
    if mixed_precision == "auto":
        import torch

        mixed_precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if gradient_checkpointing is None:
        gradient_checkpointing = cuda
    return {"mixed_precision": mixed_precision, "gradient_checkpointing": gradient_checkpointing}


def demo_teacher():
    """The shipped shapes-world teacher's folder; a UserError saying how to rebuild it if it is missing."""
    if not (DEMO_TEACHER / "model_index.json").is_file():
        raise UserError(
            f"the demo teacher is missing from {DEMO_TEACHER}; rebuild it with "
            f"python -m training.world.teacher --out {DEMO_TEACHER}"
        )
    return DEMO_TEACHER


def _base_type(annotation):
    """str / int / float / bool from a (possibly Optional) annotation."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _metavar(name, kind):
    if name == "data":
        return "PATH|prompts:FILE|world:N"
    if name in ("teacher", "output", "validation_prompts"):
        return "PATH"
    return "PATH|latest" if name == "resume" else kind.__name__.upper()


def _default_text(f):
    if f.metadata.get("required"):
        return " (required)"
    if f.name == "gradient_checkpointing":
        return " (default: auto)"
    if f.default is None and f.name == "data":
        return " (default: the built-in prompt list, data-free)"
    if f.name in MODE_DEFAULTS["scott"]:
        return " (default: by --mode: " + ", ".join(f"{m} {MODE_DEFAULTS[m][f.name]}" for m in MODES) + ")"
    return f" (default: {f.default})"


def build_parser():
    """argparse generated from DistillConfig: one --flag per field, its help and default from the field."""
    parser = argparse.ArgumentParser(
        prog="python -m training.distill",
        description="Distill a SCott (or LCM) LoRA from an SD1.5-family checkpoint. Flags left out take the "
        "defaults shown.",
    )
    hints = typing.get_type_hints(DistillConfig)
    for f in dataclasses.fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        help_text = f.metadata["help"] + _default_text(f)
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
            continue
        parser.add_argument(
            flag,
            type=kind,
            default=f.default,
            help=help_text,
            required=f.metadata.get("required", False),
            choices=f.metadata.get("choices"),
            metavar=None if f.metadata.get("choices") else _metavar(f.name, kind),
        )
    return parser


def parse_config(argv=None):
    """CLI arguments -> resolved DistillConfig (`--teacher demo` first swaps in DEMO_DEFAULTS)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.teacher == "demo":
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    return DistillConfig(**vars(args)).resolved()
