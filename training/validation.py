"""Validation grids: fixed prompts x {1, 2, 4} steps from scott_core's sampler with the student LoRA."""

from pathlib import Path

import torch
from PIL import Image

from scott_core.sampling import consistency_denoiser, sample_scott
from scott_core.schedule import lcm_timesteps

from .models import STUDENT, using

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red apple on a wooden table, studio lighting",
    "a cozy cabin in a snowy forest at dusk",
    "portrait of an old fisherman, detailed, 50mm",
)


def read_prompts(path):
    """The prompts of a text file, one a line (blank lines ignored); the built-in four for None."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        from .config import UserError

        raise UserError(f"--validation-prompts {path} has no prompts")
    return prompts


@torch.no_grad()
def consistency_sample(unet, cond, z, steps, alphas_cumprod, gamma, generator):
    """Clean latents from noise `z` in `steps` LCM-grid steps of the UNet's active LoRA (no CFG)."""

    def eps_fn(x, t):
        return unet(x, t.to(x.device), encoder_hidden_states=cond).sample.float()

    denoiser = consistency_denoiser(eps_fn, alphas_cumprod)
    return sample_scott(denoiser, z, lcm_timesteps(steps), alphas_cumprod, gamma=gamma, generator=generator)


@torch.no_grad()
def sample_latents(unet, cond, steps, alphas_cumprod, latent_shape, gamma=1.0, seed=0):
    """Student samples (clean latents) for the caption embeddings `cond` in `steps` LCM-grid steps."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((cond.shape[0], *latent_shape), generator=generator).to(cond.device)
    with using(unet, STUDENT):
        return consistency_sample(unet, cond, z, steps, alphas_cumprod, gamma, generator)


@torch.no_grad()
def decode(vae, latents):
    """Latents -> uint8 HWC images."""
    images = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample  # CPU once cached
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def grid(rows):
    """rows[i][j] uint8 HWC images -> one PIL image (rows = prompts, columns = step counts)."""
    height, width = rows[0][0].shape[:2]
    canvas = Image.new("RGB", (width * len(rows[0]), height * len(rows)))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas.paste(Image.fromarray(image.numpy()), (j * width, i * height))
    return canvas


def validation_grid(unet, vae, cond, step_counts, alphas_cumprod, latent_shape, path, gamma=1.0, seed=0):
    """Write the PNG grid prompts x step_counts to `path`; returns the grid image."""
    columns = [
        decode(vae, sample_latents(unet, cond, k, alphas_cumprod, latent_shape, gamma, seed))
        for k in step_counts
    ]
    image = grid([[column[i] for column in columns] for i in range(cond.shape[0])])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image
