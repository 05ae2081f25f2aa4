"""Validation grids: prompt lines with kohya-style options, the grids (prompts x {1, 2, 4} steps from scott_core's
sampler with the student LoRA). Keep-best's score: keep_best.py."""

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from scott_core.sampling import consistency_denoiser, sample_scott
from scott_core.schedule import lcm_timesteps

from .errors import UserError
from .models.adapters import STUDENT, using
from .models.family import square_sizes
from .models.teacher import vae_scale
from .models.unet import guided_eps_fn, unet_eps_fn

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red apple on a wooden table, studio lighting",
    "a cozy cabin in a snowy forest at dusk",
    "portrait of an old fisherman, detailed, 50mm",
)


@dataclass(frozen=True)
class PromptLine:
    """One validation prompt and its per-line settings (kohya sd-scripts' sample-prompt options); None = the
    run's default: --validation-steps' columns, cfg 1 (no guidance), seed --seed + row, --resolution, the
    LoRA's recommended gamma."""

    prompt: str
    negative: str = ""
    steps: int | None = None
    cfg: float = 1.0
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    gamma: float | None = None


def _number(kind, check):
    def parse(text):
        value = kind(text)
        if not check(value):
            raise ValueError(text)
        return value

    return parse


# kohya's letters (library/train_util.py line_to_prompt_dict) plus g = gamma: option -> (field, parser, what).
PROMPT_OPTIONS = {
    "n": ("negative", str, "a negative prompt"),
    "s": ("steps", _number(int, lambda v: 1 <= v <= 50), "an integer in 1..50"),
    "l": ("cfg", _number(float, lambda v: 0 < v < math.inf), "a number > 0"),
    "d": ("seed", _number(int, lambda v: v >= 0), "an integer >= 0"),
    "w": ("width", _number(int, lambda v: v > 0 and v % 8 == 0), "a positive multiple of 8"),
    "h": ("height", _number(int, lambda v: v > 0 and v % 8 == 0), "a positive multiple of 8"),
    "g": ("gamma", _number(float, lambda v: 0 <= v <= 1), "a number in [0, 1]"),
}


def parse_prompt_line(line):
    """'a red apple --n blurry --s 2 --l 1.5 --d 42 --w 512 --h 768 --g 0.5' -> PromptLine. kohya's syntax: the
    options split off at ' --', each a letter, a space and its value (the last one of a letter wins). A bad
    option is a ValueError naming it."""
    prompt, *options = (" " + line.strip()).split(" --")
    if not prompt.strip():
        raise ValueError("no prompt before the options")
    values = {}
    for option in options:
        letter, _, text = option.strip().partition(" ")
        if letter.lower() not in PROMPT_OPTIONS:
            known = ", ".join(f"--{k}" for k in PROMPT_OPTIONS)
            raise ValueError(f"unknown option --{letter} (the options are {known})")
        field, parse, what = PROMPT_OPTIONS[letter.lower()]
        try:
            values[field] = parse(text.strip())
        except ValueError:
            raise ValueError(f"--{letter} must be {what}, got {text.strip()!r}") from None
    return PromptLine(prompt.strip(), **values)


def read_prompts(path):
    """The PromptLines of a text file, one a line (blank lines and '#' comments skipped); the built-in four for
    None. A malformed line is a UserError naming the file and the line number."""
    if path is None:
        return [PromptLine(prompt) for prompt in DEFAULT_PROMPTS]
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--validation-prompts {path} does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"--validation-prompts {path} cannot be read as UTF-8 text") from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.strip().startswith("#"):
            try:
                lines.append(parse_prompt_line(line))
            except ValueError as exc:
                raise UserError(f"--validation-prompts {path} line {number}: {exc}") from None
    if not lines:
        raise UserError(f"--validation-prompts {path} has no prompts")
    return lines


@torch.no_grad()
def consistency_sample(unet, cond, z, steps, alphas_cumprod, gamma, generator):
    """Clean latents from noise `z` in `steps` LCM-grid steps of the UNet's active LoRA on the Conditioning `cond`
    (no CFG)."""
    denoiser = consistency_denoiser(unet_eps_fn(unet, cond), alphas_cumprod)
    return sample_scott(denoiser, z, lcm_timesteps(steps), alphas_cumprod, gamma=gamma, generator=generator)


@torch.no_grad()
def decode(vae, latents):
    """Latents -> uint8 HWC images; a float32 VAE (SDXL's under fp16, as its pipeline upcasts it) decodes outside
    autocast, in float32."""
    fp32 = torch.autocast(vae.device.type, enabled=False) if vae.dtype == torch.float32 else contextlib.nullcontext()
    with fp32:
        images = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample  # CPU once cached
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def guided_sample(unet, cond, uncond, cfg, z, steps, alphas_cumprod, gamma, generator):
    """consistency_sample with classifier-free guidance as the nodes apply it: eps = eps(uncond) + cfg
    (eps(cond) - eps(uncond)), one UNet call on [cond, uncond]; cfg 1 is consistency_sample itself."""
    if cfg == 1:
        return consistency_sample(unet, cond, z, steps, alphas_cumprod, gamma, generator)

    eps_fn = guided_eps_fn(unet, cond, uncond.like(cond), cfg - 1)
    denoiser = consistency_denoiser(eps_fn, alphas_cumprod)
    return sample_scott(denoiser, z, lcm_timesteps(steps), alphas_cumprod, gamma=gamma, generator=generator)


@torch.no_grad()
def sample_row(unet, cond, uncond, steps, cfg, alphas_cumprod, latent_shape, gamma, seed):
    """Student samples (clean latents [1, C, h, w]) of one prompt line, its noise and re-noise from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((len(cond), *latent_shape), generator=generator).to(cond.states.device)
    with using(unet, STUDENT):
        return guided_sample(unet, cond, uncond, cfg, z, steps, alphas_cumprod, gamma, generator)


def row_settings(line, row, step_counts, resolution, gamma, seed):
    """(step counts, cfg, gamma, seed, (height, width)) of prompt line number `row`: its options over the run's."""
    return (
        [line.steps] if line.steps is not None else list(step_counts),
        line.cfg,
        gamma if line.gamma is None else line.gamma,
        seed + row if line.seed is None else line.seed,
        (line.height or resolution, line.width or resolution),
    )


def grid(rows):
    """rows[i][j] uint8 HWC images -> one PIL image; a cell is as large as the largest image (smaller ones sit in
    its top-left corner), a row shorter than the longest leaves its last cells black."""
    height = max(image.shape[0] for row in rows for image in row)
    width = max(image.shape[1] for row in rows for image in row)
    canvas = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas.paste(Image.fromarray(image.numpy()), (j * width, i * height))
    return canvas


def validation_grid(unet, vae, family, cond, uncond, lines, step_counts, alphas_cumprod, resolution, path, gamma=1.0,
                    seed=0):
    """Write the PNG grid to `path`, one row per PromptLine (cond / uncond: the Conditionings of its prompt and its
    negative, given the row's size conditioning by `family`): a line's --s renders that step count, others the
    step_counts; returns the grid image."""
    scale = vae_scale(vae)
    rows = []
    for i, line in enumerate(lines):
        counts, cfg, row_gamma, row_seed, (height, width) = row_settings(
            line, i, step_counts, resolution, gamma, seed
        )
        shape = (unet.config.in_channels, height // scale, width // scale)
        c, u = family.conditioned(cond[i : i + 1], square_sizes(height, width)), uncond[i : i + 1]
        rows.append(
            [decode(vae, sample_row(unet, c, u, k, cfg, alphas_cumprod, shape, row_gamma, row_seed))[0] for k in counts]
        )
    image = grid(rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image
