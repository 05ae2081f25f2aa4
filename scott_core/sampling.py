"""The SCott multi-step consistency sampler (LCM re-noise, TCD's gamma rule), in VP and k-diffusion form."""

import math

import torch
from tqdm.auto import trange

from .consistency import (
    SIGMA_DATA,
    TIMESTEP_SCALING,
    _per_sample,
    consistency_function,
    eps_from_x0,
    x0_from_eps,
)
from .schedule import alpha_sigma, check_timesteps, sigma_to_timestep
from .schedule import alphas_cumprod as sd15_alphas_cumprod
from .solvers import default_noise_sampler


def add_noise(z0, noise, timestep, alphas_cumprod):
    """z_t = alpha_t * z0 + sigma_t * noise (the forward process; img2img start)."""
    alpha, sigma = (_per_sample(v, z0) for v in alpha_sigma(timestep, alphas_cumprod))
    return alpha * z0 + sigma * noise


def consistency_denoiser(eps_fn, alphas_cumprod, sigma_data=SIGMA_DATA, timestep_scaling=TIMESTEP_SCALING):
    """denoiser(z, t) = f(z, t) = c_skip z + c_out x0(z, eps_fn(z, t)): an eps model as a consistency model."""

    def denoiser(z, timestep):
        alpha, sigma = alpha_sigma(timestep, alphas_cumprod)
        x0 = x0_from_eps(z, eps_fn(z, timestep), alpha, sigma)
        return consistency_function(z, x0, timestep, sigma_data, timestep_scaling)

    return denoiser


def tcd_timestep(t_next, gamma):
    """TCD's intermediate timestep s = floor((1 - gamma) * t_next); None for gamma = 1 (re-noise from x0)."""
    return None if gamma == 1 else math.floor((1 - gamma) * t_next)


def renoise(z, x0, t, t_next, gamma, alphas_cumprod, noise=None):
    """Move the clean estimate x0 at t to t_next: z_s = alpha_s x0 + sigma_s eps at s = tcd_timestep(t_next),
    then z' = sqrt(ab_next / ab_s) z_s + sqrt(1 - ab_next / ab_s) noise (gamma = 1: z_s = x0, ab_s = 1, as LCM)."""
    s = tcd_timestep(t_next, gamma)
    ab_next = alphas_cumprod[t_next]
    if s is None:
        z_s, ab_s = x0, 1.0
    else:
        eps = eps_from_x0(z, x0, *alpha_sigma(t, alphas_cumprod))
        alpha_s, sigma_s = alpha_sigma(s, alphas_cumprod)
        z_s, ab_s = alpha_s.to(z.dtype) * x0 + sigma_s.to(z.dtype) * eps, alphas_cumprod[s]
    if noise is None or gamma == 0:
        return z_s
    ratio = float(ab_next / ab_s)
    return math.sqrt(ratio) * z_s + math.sqrt(1 - ratio) * noise


def sample_scott(
    denoiser, z, timesteps, alphas_cumprod, gamma=1.0, generator=None, noise_sampler=None, callback=None
):
    """Multi-step consistency sampling from z at timesteps[0]; denoiser(z, t[B]) -> clean estimate; returns x0."""
    timesteps = check_sampling_inputs(z, timesteps, gamma)
    noise_sampler = noise_sampler or default_noise_sampler(z, generator)
    for i, t in enumerate(timesteps):
        x0 = denoiser(z, torch.full((z.shape[0],), float(t), device=z.device))
        if callback is not None:
            callback({"i": i, "timestep": t, "z": z, "denoised": x0})
        if i == len(timesteps) - 1:
            return x0
        t_next = timesteps[i + 1]
        z = renoise(z, x0, t, t_next, gamma, alphas_cumprod, _draw(noise_sampler, gamma, t, t_next))


@torch.no_grad()
def sample_scott_k(
    model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=1.0, noise_sampler=None,
    alphas_cumprod=None,
):
    """SCott sampling in k-diffusion form (x = x0 + sigma eps, model(x, sigma) -> x0), for ComfyUI's KSAMPLER.
    Returns x0 where the schedule ends on sigma 0, else x re-noised to the last sigma (a split schedule)."""
    extra_args = {} if extra_args is None else extra_args
    ab = sd15_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    positive = sigmas[sigmas > 0]
    timesteps = check_sampling_inputs(x, sigma_to_timestep(positive.double().cpu(), ab).round().tolist(), gamma)
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            return denoised
        z = x / (1 + sigmas[i] ** 2).sqrt()
        noise = _draw(noise_sampler, gamma, sigmas[i], sigmas[i + 1])
        x = renoise(z, denoised, timesteps[i], timesteps[i + 1], gamma, ab, noise) * (1 + sigmas[i + 1] ** 2).sqrt()
    return x


def _draw(noise_sampler, gamma, t, t_next):
    """A noise draw for a stochastic re-noise; none for gamma = 0 (deterministic)."""
    return None if gamma == 0 else noise_sampler(t, t_next)


def check_sampling_inputs(z, timesteps, gamma):
    """Validate gamma in [0, 1], the timestep list and a finite start latent; returns the timesteps as ints."""
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1] (1 = full re-noise as LCM, 0 = deterministic), got {gamma!r}")
    timesteps = check_timesteps(timesteps)
    if not torch.isfinite(z).all():
        raise ValueError("the start latent contains NaN or inf; check the input latent and noise")
    return timesteps
