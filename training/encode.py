"""The frozen encoders on a micro-batch: captions -> hidden states, pixels -> the VAE posterior's moments, and
(z0, caption states) from either the cache's entries or the batch itself, with the same random draws."""

import torch

from .models.teacher import tokenize


@torch.no_grad()
def encode_text(run, captions, to_float=True):
    """CLIP last hidden states [B, 77, D] of the captions (padded to the tokenizer's 77), on the run's device,
    float32 (to_float=False: the encoder's own dtype, as the cache stores them); the encoder runs where it is."""
    encoder = run.teacher.text_encoder
    hidden = encoder(tokenize(run.teacher.tokenizer, captions).to(encoder.device))[0]
    return (hidden.float() if to_float else hidden).to(run.accelerator.device)


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
    """(z0, caption hidden states) of a micro-batch: from the cache's mean / std / hidden states when it was
    served from the cache, else encoded now; the same draws from `generator` either way."""
    if "mean" not in batch:
        return encode_images(run, batch["pixels"], generator), encode_text(run, batch["captions"])
    device, scaling = run.accelerator.device, run.teacher.vae.config.scaling_factor
    z0 = sample_latents(batch["mean"].to(device), batch["std"].to(device), generator, scaling)
    return z0, batch["cond"].to(device).float()

