"""The SCott sampler against step-by-step loops of diffusers' LCMScheduler and TCDScheduler."""

import pytest
import torch
from diffusers import LCMScheduler, TCDScheduler

from scott_core import consistency, sampling, schedule

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
AB = schedule.alphas_cumprod()
WEIGHT = torch.randn(4, 4, generator=torch.Generator().manual_seed(7)) * 0.5


def toy_eps(z, timestep):
    """A fixed non-linear eps 'model' that depends on z and t."""
    t = torch.as_tensor(timestep, dtype=z.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(torch.einsum("ij,bjhw->bihw", WEIGHT, z) + t / 1000)


def raw_x0_denoiser(z, timestep):
    return consistency.x0_from_eps(z, toy_eps(z, timestep), *schedule.alpha_sigma(timestep, AB))


def assert_close(ours, reference, rtol=1e-6):
    """Equal up to float32 rounding, relative to the reference's scale (x0 at t = 999 reaches ~30)."""
    assert (ours - reference).abs().max() <= rtol * max(1.0, float(reference.abs().max())) * 10


def k_model(x, sigma, **extra_args):
    """raw_x0_denoiser in ComfyUI's convention: x = z / alpha, called with the k-diffusion sigma."""
    t = schedule.sigma_to_timestep(sigma.double(), AB).round()
    return raw_x0_denoiser(x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), t)


def _start(seed=0):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_gamma_one_reproduces_lcm_scheduler(steps):
    scheduler = LCMScheduler(**SD15)
    scheduler.set_timesteps(steps)
    z, generator = _start(), torch.Generator().manual_seed(42)
    for t in scheduler.timesteps:
        z, reference = scheduler.step(toy_eps(z, t), t, z, generator=generator, return_dict=False)
    denoiser = sampling.consistency_denoiser(toy_eps, AB)
    ours = sampling.sample_scott(
        denoiser, _start(), schedule.lcm_timesteps(steps), AB, gamma=1.0, generator=torch.Generator().manual_seed(42)
    )
    assert_close(ours, reference)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("steps", [2, 4])
def test_gamma_reproduces_tcd_scheduler(gamma, steps):
    scheduler = TCDScheduler(**SD15)
    scheduler.set_timesteps(steps)
    z, generator, reference = _start(), torch.Generator().manual_seed(3), []
    for t in scheduler.timesteps:
        reference.append(z)
        z = scheduler.step(toy_eps(z, t), t, z, eta=gamma, generator=generator).prev_sample
    ours = []
    sampling.sample_scott(
        raw_x0_denoiser, _start(), scheduler.timesteps.tolist(), AB, gamma=gamma,
        generator=torch.Generator().manual_seed(3), callback=lambda info: ours.append(info["z"]),
    )
    assert len(ours) == len(reference) == steps
    for mine, theirs in zip(ours, reference):
        assert_close(mine, theirs)


def test_gamma_zero_is_deterministic_and_gamma_one_is_not():
    denoiser = sampling.consistency_denoiser(toy_eps, AB)
    runs = {
        (gamma, seed): sampling.sample_scott(
            denoiser, _start(), [999, 759, 499, 259], AB, gamma=gamma, generator=torch.Generator().manual_seed(seed)
        )
        for gamma in (0.0, 1.0) for seed in (1, 2)
    }
    assert torch.equal(runs[0.0, 1], runs[0.0, 2])
    assert (runs[1.0, 1] - runs[1.0, 2]).abs().max() > 1e-3


def test_img2img_starts_from_the_noised_latent():
    z0, noise = _start(1), _start(2)
    timesteps = schedule.lcm_timesteps(2, denoise=0.6)
    seen = []
    sampling.sample_scott(
        raw_x0_denoiser, sampling.add_noise(z0, noise, timesteps[0], AB), timesteps, AB,
        callback=lambda info: seen.append(info), generator=torch.Generator().manual_seed(0),
    )
    alpha, sigma = schedule.alpha_sigma(599, AB)
    assert [info["timestep"] for info in seen] == [599, 299]
    assert torch.allclose(seen[0]["z"], alpha.float() * z0 + sigma.float() * noise)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_k_diffusion_form_equals_the_vp_form(gamma):
    """sample_scott_k (ComfyUI's x = x0 + sigma eps convention) walks the same path as sample_scott."""
    timesteps = [999, 759, 499, 259]
    sigmas = schedule.sigmas_for_timesteps(timesteps, AB)
    noise = _start()
    vp = sampling.sample_scott(
        raw_x0_denoiser, noise, timesteps, AB, gamma=gamma, noise_sampler=sampling.default_noise_sampler(noise, seed=9)
    )

    x = noise * (1 + sigmas[0] ** 2).sqrt()  # ComfyUI scales full-denoise noise so that z = noise
    k = sampling.sample_scott_k(k_model, x, sigmas, extra_args={"seed": 9}, disable=True, gamma=gamma)
    assert_close(k, vp)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gamma=1.5), r"gamma must be in \[0, 1\]"),
        (dict(gamma=-0.1), r"gamma must be in \[0, 1\]"),
        (dict(timesteps=[]), "timesteps is empty"),
        (dict(timesteps=[499, 999]), "strictly decreasing"),
        (dict(timesteps=[1200, 500]), r"outside the integers 0\.\.999"),
        (dict(z=torch.full((1, 4, 2, 2), float("nan"))), "NaN or inf"),
    ],
)
def test_bad_sampler_input_names_the_argument(kwargs, message):
    args = dict(z=torch.zeros(1, 4, 2, 2), timesteps=[999, 499], gamma=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        sampling.sample_scott(raw_x0_denoiser, args["z"], args["timesteps"], AB, gamma=args["gamma"])


def test_k_diffusion_form_continues_a_split_schedule():
    """Sampling [999, 759] then [759, 499, 0] equals sampling [999, 759, 499, 0] with the same noise stream."""
    sigmas = schedule.sigmas_for_timesteps([999, 759, 499], AB)
    x = _start() * (1 + sigmas[0] ** 2).sqrt()

    whole = sampling.sample_scott_k(k_model, x, sigmas, disable=True, extra_args={"seed": 4})
    noise_sampler = sampling.default_noise_sampler(x, seed=4)
    first = sampling.sample_scott_k(k_model, x, sigmas[:2], disable=True, noise_sampler=noise_sampler)
    second = sampling.sample_scott_k(k_model, first, sigmas[1:], disable=True, noise_sampler=noise_sampler)
    assert_close(second, whole)
