"""The trainer's one typed config (defaults from METHOD.md) in field groups by concern, the flat CLI generated from it,
the TOML run file, range checks and resolution."""

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from scott_core.solvers import KNOBS, SOLVERS, knob_owners

from .data import holdout
from .data.buckets import BUCKET_DEFAULTS, STEP, bucketable
from .data.sources import WORLD_PREFIX, DataSource, parse_source
from .errors import UserError
from .eval.scores import DEFAULT_SCORE, SCORES

MODES = ("scott", "lcm")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
DISC_FEATURES = ("up", "down_mid")  # where the discriminator's features (and its LoRA) come from

# What each mode means for the fields left unset (None): SCott (METHOD.md 2-4), vanilla CD (LCM). Neither mode's
# solver takes a knob (--eta is DDIM's, --noise-strength the noise_strength family's), so none is set here.
MODE_DEFAULTS = {
    "scott": {
        "solver": "er_sde_5",
        "sub_steps": 3,
        "span": 24,
        "grid_spacing": 8,
        "adv_weight": 0.4,
    },
    "lcm": {
        "solver": "ode",
        "sub_steps": 1,
        "span": 20,
        "grid_spacing": 20,
        "adv_weight": 0.0,
    },
}


DEMO_TEACHER = Path(__file__).resolve().parent / "assets" / "demo"
DEMO_XL_TEACHER = Path(__file__).resolve().parent / "assets" / "demo_xl"
# `--teacher demo` / `--teacher demo-xl`: the shipped shapes-world teachers (training/data/scenes.py; SD1.5- and
# SDXL-family), with defaults sized for minutes on a CPU. Flags given on the command line (or in a --config file)
# still win.
DEMO_NAMES = ("demo", "demo-xl")
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


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric option: [low, high] (either end open or absent), optionally a multiple."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple: int | None = None

    def contains(self, value):
        """Whether value is a finite number inside the range."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return self.multiple is None or value % self.multiple == 0

    def describe(self):
        """'> 0', '>= 1', 'in [0, 1)', 'a multiple of 8, >= 8'."""
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low}"
        else:
            text = f"{'<' if self.high_open else '<='} {self.high}"
        return text if self.multiple is None else f"a multiple of {self.multiple}, {text}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, low_open=True)
PROBABILITY = Range(0, 1)


def _opt(default, help, **extra):
    """A config field: its default, its --help text, and extra: required, choices, range (a Range)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelOptions:
    """The teacher and the LoRAs trained on it."""

    teacher: str = _opt(
        None,
        "the teacher: a single-file SD1.5- or SDXL-family checkpoint (.safetensors, original SD layout, as model "
        "sites ship them) or a diffusers folder (eps prediction; refiners, inpainting, v-prediction and EDM models "
        "are refused); 'demo' / 'demo-xl' = the shipped 64 px shapes-world teachers (SD1.5- / SDXL-family), with "
        "defaults sized for a few minutes on a CPU (data world:4000, resolution 64, batch 16, 300 steps, rank 16)",
        required=True,
    )
    trust_ckpt: bool = _opt(False, "allow a .ckpt/.pt teacher (pickle: run only files you trust)")
    lora_rank: int = _opt(64, "rank of the student LoRA (LCM-LoRA's layers)", range=AT_LEAST_1)
    lora_alpha: float = _opt(None, "LoRA alpha of the student; default = --lora-rank (scale 1)", range=POSITIVE)
    disc_lora_rank: int = _opt(32, "rank of the discriminator's LoRA on the UNet's up blocks", range=AT_LEAST_1)


@dataclass
class DataOptions:
    """What the student learns from: images, the shapes world, or teacher images drawn from prompts."""

    data: str = _opt(
        None,
        "training images: a folder of images with same-name .txt captions (or metadata.jsonl / "
        ".csv with file_name,text), or webdataset .tar shards, brace patterns allowed "
        "('shards/{000..099}.tar'); 'world:N' renders N shapes-world images into <output>/world "
        "('diverse:N': the same images with captions that name only some attributes, into <output>/diverse). Omit it "
        "for data-free distillation: the teacher first draws --synth-images "
        "images from the built-in prompt list into <output>/synth; 'prompts:FILE' does the same from your "
        "prompts (one a line)",
    )
    synth_images: int = _opt(
        10000,
        "data-free only: how many teacher images to draw (about 4 h of a 2024 GPU at 512 px, so that "
        "drawing and a 1000-step run fit in one GPU-day)",
        range=AT_LEAST_1,
    )
    synth_steps: int = _opt(25, "data-free only: DPM-Solver++ 2M steps per teacher image", range=AT_LEAST_1)
    synth_cfg: float = _opt(
        7.5, "data-free only: classifier-free guidance scale of the teacher images", range=AT_LEAST_0
    )
    resolution: int = _opt(
        None,
        "training resolution in pixels: images go to aspect-ratio buckets of about resolution^2 pixels (a multiple "
        "of 64), or with --no-buckets are resized and center-cropped to resolution^2 (a multiple of 8)",
        range=Range(8, multiple=8),
    )
    buckets: bool = _opt(
        True,
        "aspect-ratio buckets for image folders and .tar shards, by kohya sd-scripts' rules: sizes of at most "
        "resolution^2 pixels with sides multiples of 64 from --min-bucket-reso to --max-bucket-reso, each image "
        "resized to cover the bucket nearest its aspect ratio and center-cropped, one bucket per batch; world and "
        "data-free images stay square",
    )
    min_bucket_reso: int = _opt(
        None, "shortest bucket side in pixels (kohya's --min_bucket_reso), at most --resolution",
        range=Range(STEP, multiple=STEP),
    )
    max_bucket_reso: int = _opt(
        None, "longest bucket side in pixels (kohya's --max_bucket_reso), at least --resolution",
        range=Range(STEP, multiple=STEP),
    )
    bucket_upscale: bool = _opt(
        True,
        "resize an image smaller than its bucket up to cover it (kohya's default); --no-bucket-upscale skips it "
        "instead and lists it in <output>/skipped.txt",
    )
    cache_latents: bool = _opt(
        True,
        "encode every image (VAE mean and std) and caption (CLIP) once into <output>/cache before training, "
        "then free the VAE and text encoder from the GPU; --no-cache-latents encodes each batch as it is drawn",
    )
    caption_dropout: float = _opt(
        0.1, "probability a sample's caption is replaced by the empty caption", range=PROBABILITY
    )
    num_workers: int = _opt(2, "data-loader worker processes per process (0: load in the main process)",
                            range=AT_LEAST_0)
    validation_split: str = _opt(
        "auto",
        "what keep-best scores and training never sees: a count (50) or a fraction (0.05) of the image pairs, or "
        "of a data-free prompt file's prompts, withheld by a seeded draw before bucketing; auto = 5 percent, at "
        "least 2, at most 64 (docs/keep_best.md says why); 0 = none (keep-best off). World data keeps all N "
        "training scenes and scores as many scenes of captions none of them has; the built-in prompt list stays "
        "whole and keep-best takes prompts after it. Without validation (--validate-every 0) nothing is withheld",
    )
    validation_data: str = _opt(
        None,
        "a folder (or .tar shards) of image + caption pairs for keep-best that training never reads; then nothing "
        "is withheld from --data",
    )


@dataclass
class MethodOptions:
    """The distillation method: mode, teacher solver, timestep grid, guidance, losses."""

    mode: str = _opt(
        "scott",
        "scott: stochastic multi-step teacher + adversarial loss (METHOD.md 2-4); lcm: "
        "vanilla consistency distillation (ODE, 1 sub-step, span 20 on the 50-step grid, no "
        "adversarial loss), the baseline",
        choices=MODES,
    )
    solver: str = _opt(
        None,
        "teacher solver from t_n to t_m: ddim takes --eta, noise_strength takes --noise-strength, er_sde_5_below "
        "(ER-SDE 5 below a timestep, the ODE above) takes --noise-below, ode, sde and er_sde_5 take no knob (giving "
        "a solver a knob it does not take is an error)",
        choices=SOLVERS,
    )
    eta: float = _opt(
        None,
        "DDIM's eta, the teacher's noise for --solver ddim only: 0 = deterministic DDIM, 1 = DDPM-like",
        range=AT_LEAST_0,
    )
    noise_strength: float = _opt(
        None,
        "the teacher's noise for --solver noise_strength only: s in phi(x)=x^(1+s^2), 0 = the ODE, 1 = the "
        "full reverse SDE",
        range=AT_LEAST_0,
    )
    noise_below: float = _opt(
        None,
        "for --solver er_sde_5_below only: the timestep t* below which the teacher's sub-steps add ER-SDE 5's noise "
        "(the ODE above t*, where modes are still undecided); 0 = the ODE, 1000 = er_sde_5",
        range=Range(0, 1000),
    )
    sub_steps: int = _opt(
        None, "teacher sub-steps h from t_n to t_m; default 3 (scott), 1 (lcm)", range=AT_LEAST_1
    )
    span: int = _opt(
        None, "skip K in timesteps: t_m = max(t_n - K, 0); default 24 (scott), 20 (lcm)", range=Range(1, 999)
    )
    grid_spacing: int = _opt(
        None, "spacing of the t_n grid (T-1, T-1-spacing, ...); default 8 (scott), 20 (lcm)", range=Range(1, 999)
    )
    w_min: float = _opt(
        2.0, "lowest guidance scale w drawn per sample, in the (1+w)*cond - w*uncond form", range=AT_LEAST_0
    )
    w_max: float = _opt(14.0, "highest guidance scale w drawn per sample (>= --w-min)", range=AT_LEAST_0)
    huber_c: float = _opt(
        0.001, "pseudo-Huber constant c of the consistency loss sqrt(d^2 + c^2) - c", range=AT_LEAST_0
    )
    ema_decay: float = _opt(
        0.95, "EMA decay of the target LoRA after each optimiser step", range=Range(0, 1, high_open=True)
    )
    adv_weight: float = _opt(
        None,
        "weight of the adversarial loss (0 turns it and the discriminator off); default 0.4 (scott), 0 (lcm)",
        range=AT_LEAST_0,
    )
    adv_decay_steps: int = _opt(
        0,
        "the adversarial weight falls linearly from --adv-weight to 0 over the first N optimiser steps; from step N "
        "on the discriminator neither trains nor runs, so the steps cost what they cost without it (0: constant "
        "weight)",
        range=AT_LEAST_0,
    )
    disc_renoise: bool = _opt(
        False,
        "the discriminator scores real and fake latents re-noised with fresh noise (the same for both) to a fresh "
        "timestep drawn uniformly from the grid, and is told that timestep; off: clean latents, told t_n",
    )
    disc_features: str = _opt(
        "up",
        "the discriminator's features (mean-pooled into its head) and the blocks its LoRA sits on: up = the "
        "UNet's up blocks; down_mid = the down blocks and the mid block, as SDXL-Lightning and ADD use (its "
        "UNet pass stops after the mid block, about half the cost)",
        choices=DISC_FEATURES,
    )


@dataclass
class OptimOptions:
    """Optimisation: learning rates, batch, steps, precision, seed."""

    lr: float = _opt(1e-4, "student LoRA learning rate (AdamW)", range=POSITIVE)
    disc_lr: float = _opt(
        2e-5, "discriminator (LoRA + head) learning rate; 0 freezes it at its initial weights (a control: the "
        "adversarial term without adversarial learning)", range=AT_LEAST_0
    )
    disc_head_warmup: int = _opt(
        0,
        "for the first N optimiser steps only the discriminator trains against the student's estimates; the "
        "student gets no adversarial term (0: off)",
        range=AT_LEAST_0,
    )
    disc_every: int = _opt(
        1,
        "update the discriminator on every N-th optimiser step only (steps N, 2N, ...); the student gets the "
        "generator term from it on every step (1: every step)",
        range=AT_LEAST_1,
    )
    lr_warmup_steps: int = _opt(0, "linear learning-rate warm-up in optimiser steps (0: off)", range=AT_LEAST_0)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)", range=AT_LEAST_0)
    batch_size: int = _opt(4, "images per process per micro-batch", range=AT_LEAST_1)
    grad_accum: int = _opt(1, "micro-batches accumulated per optimiser step", range=AT_LEAST_1)
    max_steps: int = _opt(1000, "optimiser steps to train", range=AT_LEAST_1)
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
    seed: int = _opt(
        0, "seed of data order, noise, timesteps, guidance scales and caption dropout", range=AT_LEAST_0
    )


@dataclass
class OutputOptions:
    """What the run writes: checkpoints, validation grids, logs, the LoRA and its sampling metadata."""

    output: str = _opt(
        "output", "output folder: checkpoints/, validation/, logs/, config.toml and the exported LoRA"
    )
    name: str = _opt(
        None, "file name (no extension) of the exported LoRA; default <teacher name>_<mode>_lora"
    )
    checkpoint_every: int = _opt(
        500, "write a resumable checkpoint every N optimiser steps (0: only at the end)", range=AT_LEAST_0
    )
    keep_checkpoints: int = _opt(3, "how many of the latest checkpoints to keep", range=AT_LEAST_1)
    save_every: int = _opt(
        0,
        "also export the LoRA every N optimiser steps as <output>/<name>_step<N>.safetensors (kohya's "
        "--save_every_n_steps; 0: only the final LoRA)",
        range=AT_LEAST_0,
    )
    save_steps: str = _opt(
        None,
        "also export the LoRA at these optimiser steps, comma-separated (e.g. 100,300,1000), as "
        "<output>/<name>_step<N>.safetensors, the last step too if listed",
    )
    resume: str = _opt(
        None, "resume from a checkpoint folder, or 'latest' for the newest in <output>/checkpoints"
    )
    validate_every: int = _opt(
        500, "write a validation grid every N optimiser steps (0: off)", range=AT_LEAST_0
    )
    validation_prompts: str = _opt(
        None, "text file, one prompt a line, for the validation grids; default 4 built-in prompts"
    )
    validation_steps: str = _opt(
        "1,2,4", "sampling step counts of the validation grid and of keep-best's score, comma-separated"
    )
    validation_samples: int = _opt(
        256,
        "student samples keep-best scores at each validation, from fixed noises over the withheld captions (each "
        "caption at least once); fewer rank checkpoints worse (docs/keep_best.md: 64 against 256)",
        range=AT_LEAST_1,
    )
    keep_best_score: str = _opt(
        DEFAULT_SCORE,
        "keep-best's score (lower is better): <features>_<distance>_<reference>, features of the teacher's own "
        "networks (unet: its UNet's mid block, vae: its VAE decoder's mid block, latent: the pooled latent), "
        "distance fd (Frechet, between the sets) or paired (per sample), reference teacher (its many-step samples "
        "from the same noise and caption: --synth-steps, --synth-cfg) or images (the withheld images); "
        "docs/keep_best.md measures how each ranks checkpoints",
        choices=tuple(SCORES),
    )
    inception: str = _opt(
        None,
        "FID Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth): each validation also logs "
        "the FID of keep-best's samples against the withheld images (or the teacher's samples)",
    )
    clip: str = _opt(
        None, "a local transformers CLIP folder: each validation also logs the CLIP score of keep-best's samples"
    )
    log_every: int = _opt(10, "log losses to TensorBoard every N optimiser steps", range=AT_LEAST_1)
    recommended_steps: int = _opt(
        4, "sampling steps written into the LoRA's metadata as the recommendation", range=AT_LEAST_1
    )
    recommended_gamma: float = _opt(
        1.0, "sampler gamma written into the LoRA's metadata (1: LCM's full re-noise)", range=PROBABILITY
    )
    recommended_cfg: float = _opt(1.0, "CFG scale written into the LoRA's metadata", range=AT_LEAST_0)


# The groups in CLI / run-file order (DistillConfig's fields come in the reverse of its bases' order).
GROUPS = (ModelOptions, DataOptions, MethodOptions, OptimOptions, OutputOptions)


@dataclass
class DistillConfig(OutputOptions, OptimOptions, MethodOptions, DataOptions, ModelOptions):
    """Every knob of one distillation run, flat (cfg.lr, cfg.solver, ...); None means "the mode's default"."""

    @cached_property
    def source(self) -> DataSource:
        """--data parsed once (sources.parse_source); the config itself keeps the user's string."""
        return parse_source(self.data)

    def resolved(self):
        """A copy with every None that a mode or another field decides filled in, validated."""
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        values = dataclasses.asdict(self)
        if self.teacher in DEMO_NAMES:
            values["teacher"] = str(demo_teacher(self.teacher))
        family = teacher_family(values["teacher"], self.trust_ckpt)
        for key, value in (("resolution", family.core.default_resolution), *family_bucket_defaults(family)):
            if values[key] is None:
                values[key] = value
        for key, value in MODE_DEFAULTS[self.mode].items():
            if values[key] is None:
                values[key] = value
        for knob, value in SOLVERS[values["solver"]].knobs.items() if values["solver"] in SOLVERS else ():
            if values[knob] is None:
                values[knob] = value
        values.update(hardware_defaults(values["mixed_precision"], values["gradient_checkpointing"]))
        if values["lora_alpha"] is None:
            values["lora_alpha"] = float(values["lora_rank"])
        if values["name"] is None:
            values["name"] = f"{Path(str(self.teacher)).stem}_{self.mode}_lora"
        values["validation_split"] = resolved_split(values)
        config = DistillConfig(**values)
        config.check()
        return config

    def check(self):
        """Raise a UserError naming the first option out of its range (see each field's `range`)."""
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), flag_name(f.name)
            if "range" in f.metadata and value is not None and not f.metadata["range"].contains(value):
                finite = "" if math.isfinite(value) else "a finite number "
                raise UserError(f"{flag} must be {finite}{f.metadata['range'].describe()}, got {value}")
            if f.metadata.get("choices") and value is not None and value not in f.metadata["choices"]:
                raise UserError(f"{flag} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
        if not self.w_min <= self.w_max:
            raise UserError(f"need 0 <= --w-min <= --w-max, got {self.w_min} and {self.w_max}")
        self.check_solver_knobs(self.solver)
        self.validation_step_counts()
        self.save_step_set()
        self.source  # noqa: B018 - parse --data now: a malformed world:N stops the run before anything loads
        self.check_bucket_resolution()
        self.check_keep_best_reference()

    def check_keep_best_reference(self):
        """A keep-best score against the withheld images needs images: data-free runs have none of their own."""
        needs_images = SCORES[self.keep_best_score].reference == "images"
        if needs_images and self.validate_every and self.source.data_free and self.validation_data is None:
            raise UserError(
                f"--keep-best-score {self.keep_best_score} compares with withheld images, and data-free runs have "
                f"none: give --validation-data PATH, or a score against the teacher's samples (e.g. {DEFAULT_SCORE})"
            )

    def check_bucket_resolution(self):
        """Bucket sides are multiples of 64, so with buckets on the user's images the resolution must be one too."""
        if self.buckets and self.resolution % STEP and bucketable(self.source):
            near = max(STEP, round(self.resolution / STEP) * STEP)
            raise UserError(
                f"--resolution must be a multiple of {STEP} with --buckets, got {self.resolution}: "
                f"give --resolution {near}, or --no-buckets for square crops"
            )

    def check_solver_knobs(self, solver):
        """A knob `solver` does not take is a UserError naming the solver and the knob it does take."""
        if solver not in SOLVERS:
            raise UserError(f"--solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        takes = [flag_name(k) for k in SOLVERS[solver].knobs]
        by_mode = solver == MODE_DEFAULTS.get(self.mode, {}).get("solver")
        named = f"--solver {solver}" + (f" (the default of --mode {self.mode})" if by_mode else "")
        for knob in KNOBS:
            value, flag = getattr(self, knob), flag_name(knob)
            if value is None:
                continue
            if knob not in SOLVERS[solver].knobs:
                its = "it takes " + ", ".join(takes) if takes else "it takes no knob"
                owner = " / ".join(knob_owners(knob))
                raise UserError(f"{named} takes no {flag} ({its}): drop {flag}, or use --solver {owner}")

    def validation_step_counts(self):
        """'1,2,4' -> [1, 2, 4]."""
        return step_list(self.validation_steps, "--validation-steps")

    def save_step_set(self):
        """--save-steps '100,300' -> {100, 300}; empty when unset."""
        return set() if self.save_steps is None else set(step_list(self.save_steps, "--save-steps"))


def step_list(text, flag):
    """'1,2,4' -> [1, 2, 4]; a UserError naming `flag` unless comma-separated integers >= 1."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"{flag} must be comma-separated integers >= 1, got {text!r}")
    return counts


def resolved_split(values):
    """--validation-split as the run applies it: '0' without validation or with --validation-data (a UserError when
    both are given), else the user's spec."""
    spec = holdout.parse_split(values["validation_split"])
    if values["validation_data"] is not None and spec not in (holdout.AUTO, 0):
        raise UserError("give --validation-split or --validation-data, not both")
    return "0" if not values["validate_every"] or values["validation_data"] is not None else str(spec)


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


def demo_folder(name):
    """Where the shipped 'demo' / 'demo-xl' teacher lives."""
    return {"demo": DEMO_TEACHER, "demo-xl": DEMO_XL_TEACHER}[name]


def demo_teacher(name="demo"):
    """The shipped shapes-world teacher's folder ('demo' or 'demo-xl'); a UserError saying how to rebuild it if it
    is missing."""
    folder = demo_folder(name)
    if not (folder / "model_index.json").is_file():
        family = " --family sdxl" if name == "demo-xl" else ""
        raise UserError(
            f"the {name} teacher is missing from {folder}; rebuild it with "
            f"python -m experiments.world.teacher --out {folder}{family}"
        )
    return folder


def demo_defaults(name):
    """The flag defaults of `--teacher demo` / `--teacher demo-xl`: DEMO_DEFAULTS with the teacher's own output
    folder and validation prompts."""
    folder = demo_folder(name)
    return {**DEMO_DEFAULTS, "output": f"runs/{name}", "validation_prompts": str(folder / "prompts.txt")}


def teacher_family(teacher, trust_ckpt=False):
    """The teacher's ModelFamily, whose defaults fill the resolution and bucket range left unset (its refusal if it is
    refused); SD1.5's for a path that does not exist (the run stops at the teacher check before any training)."""
    from .models.family import SD15
    from .models.teacher import check_teacher_path

    return check_teacher_path(teacher, trust_ckpt) if Path(teacher).exists() else SD15


def family_bucket_defaults(family):
    """(flag field, value) of the family's bucket range (SD1.5: kohya's 256..1024, SDXL: 512..2048)."""
    return tuple(zip(BUCKET_DEFAULTS, family.core.bucket_range))


def flag_name(name):
    return "--" + name.replace("_", "-")


