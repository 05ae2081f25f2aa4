"""Feature spaces that need no download, made of the teacher's own networks, for keep-best's score: clean latents
[N, C, h, w] -> features [N, D] (float64, on the CPU). Each runs the networks as they are: the caller makes the bare
teacher the active model (no LoRA).

- latent: the latent itself, average-pooled to 4 x 4 per channel (its coarse layout and colour);
- vae: the VAE decoder's mid-block output (post-quant conv, conv_in, mid block: no upsampling), mean-pooled;
- unet: the teacher UNet's mid-block output for the latent re-noised to timestep UNET_T with fixed noise and the
  family's unconditional embedding (with the size conditioning of an uncropped image of the latent's size),
  mean-pooled (the pass stops after the mid block).
"""

import torch

from scott_core.sampling import add_noise
from scott_core.schedule import alphas_cumprod

from ..models.discriminator import unet_features
from ..models.family import square_sizes
from ..models.teacher import vae_scale
from .scores import FEATURE_NAMES

UNET_T = 250  # the re-noise level of the unet features: timestep 250 of 1000 keeps the layout, blurs the texture
NOISE_SEED = 0xFEA7  # the unet features' re-noise: one fixed draw for a set of a given shape


@torch.no_grad()
def latent_features(teacher, latents, uncond):
    """The latent average-pooled to 4 x 4 per channel, flattened."""
    return torch.nn.functional.adaptive_avg_pool2d(latents.float(), 4).flatten(1).double().cpu()


@torch.no_grad()
def vae_features(teacher, latents, uncond):
    """The VAE decoder's mid-block output of latents / scaling_factor, mean-pooled over space."""
    vae = teacher.vae
    z = (latents / vae.config.scaling_factor).to(vae.device, vae.dtype)
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    hidden = vae.decoder.mid_block(vae.decoder.conv_in(z), None)
    return hidden.float().mean(dim=(2, 3)).double().cpu()


@torch.no_grad()
def unet_mid_features(teacher, latents, uncond):
    """The UNet's mid-block output of the latents noised to UNET_T (fixed noise), empty caption, mean-pooled."""
    unet, batch = teacher.unet, latents.shape[0]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(NOISE_SEED)).to(latents.device)
    t = torch.full((batch,), UNET_T, dtype=torch.long)
    x = add_noise(latents.float(), noise, t, alphas_cumprod()).to(unet.dtype)
    scale = vae_scale(teacher.vae)
    sizes = square_sizes(latents.shape[2] * scale, latents.shape[3] * scale, batch)
    rows = uncond.map(lambda part: part.expand(batch, *part.shape[1:]).to(latents.device, unet.dtype))
    cond = teacher.family.conditioned(rows, sizes)
    return unet_features(unet, "down_mid", x, t, cond)[-1].float().mean(dim=(2, 3)).double().cpu()


FEATURES = dict(zip(FEATURE_NAMES, (latent_features, vae_features, unet_mid_features)))


def features(name, teacher, latents, uncond, batch_size=16):
    """FEATURES[name] of the latents, batch_size at a time."""
    parts = [FEATURES[name](teacher, latents[i : i + batch_size], uncond) for i in range(0, len(latents), batch_size)]
    return torch.cat(parts)
