"""The frozen encoders on a micro-batch: captions -> their Conditioning, pixels -> the VAE posterior's moments, and
(z0, conditioning) from either the cache's entries or the batch itself, with the same random draws; the family adds
the images' size conditioning."""

import torch

from .models.teacher import encode_captions


@torch.no_grad()
def encode_text(run, captions, to_float=True):
    """The captions' Conditioning (the family's hidden states, and pooled embedding) on the run's device, float32
    (to_float=False: the encoders' own dtype, as the cache stores them); the encoders run where they are."""
    cond = encode_captions(run.teacher, captions)
    return (cond.float() if to_float else cond).to(run.accelerator.device)


def encode_uncond(run):
    """The unconditional embedding [1, ...] (float32): the empty caption's, or the family's zeros."""
    return run.teacher.family.uncond(encode_text(run, [""]))


@torch.no_grad()
def encode_moments(run, pixels):
    """The VAE posterior's mean and std [B, 4, h, w] of pixels in [-1, 1], in the VAE's dtype."""
    vae = run.teacher.vae
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


def sample_latents(mean, std, generator, scaling_factor):
    """z0 = (mean + std * noise) * scaling_factor, the noise drawn from `generator` (as vae's .sample())."""
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return (mean.float() + std.float() * noise) * scaling_factor


@torch.no_grad()
def encode_images(run, pixels, generator):
    """z0 = vae.encode(x).sample() * scaling_factor, the sample drawn from `generator`."""
    mean, std = encode_moments(run, pixels)
    return sample_latents(mean, std, generator, run.teacher.vae.config.scaling_factor).to(run.accelerator.device)


def batch_latents(run, batch, generator):
    """(z0, conditioning) of a micro-batch: from the cache's mean / std / text entries when it was served from the
    cache, else encoded now; the same draws from `generator` either way; with the images' size conditioning
    (batch 'sizes') where the family takes it."""
    device = run.accelerator.device
    if "mean" not in batch:
        z0, cond = encode_images(run, batch["pixels"], generator), encode_text(run, batch["captions"])
    else:
        z0 = sample_latents(batch["mean"].to(device), batch["std"].to(device), generator,
                            run.teacher.vae.config.scaling_factor)
        cond = batch["cond"].to(device).float()
    return z0, run.teacher.family.conditioned(cond, batch["sizes"])
