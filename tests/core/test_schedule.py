"""The SD1.5 schedule and timestep grids against diffusers' schedulers."""

import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler

from scott_core import schedule


def test_alphas_cumprod_equals_diffusers_scaled_linear():
    """diffusers multiplies 1000 factors in float32 (drift up to ~5e-7); ours is float64 like CompVis and ComfyUI."""
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = schedule.alphas_cumprod()
    assert ours.shape == (1000,)
    assert (ours - reference.alphas_cumprod.double()).abs().max() < 6e-7
    assert (ours.float() - reference.alphas_cumprod).abs().max() < 6e-7
    assert (ours[[0, 499, 999]] - torch.tensor([0.99915, 0.27767, 0.0046601], dtype=torch.float64)).abs().max() < 5e-6


def test_sigma_round_trips_at_fractional_timesteps():
    ab = schedule.alphas_cumprod()
    t = torch.tensor([0.0, 0.25, 12.5, 499.0, 998.75, 999.0], dtype=torch.float64)
    sigma = schedule.timestep_to_sigma(t, ab)
    assert torch.allclose(sigma[[0, 3, 5]], ((1 - ab[[0, 499, 999]]) / ab[[0, 499, 999]]).sqrt(), rtol=1e-12)
    assert torch.allclose(schedule.sigma_to_timestep(sigma, ab), t, atol=1e-9)


def test_alpha_sigma_is_a_unit_vp_pair():
    ab = schedule.alphas_cumprod()
    alpha, sigma = schedule.alpha_sigma(torch.tensor([3, 500, 999]), ab)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(alpha**2, ab[[3, 500, 999]])


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_lcm_timesteps_equal_lcm_scheduler(steps, denoise):
    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(steps, strength=denoise)
    assert schedule.lcm_timesteps(steps, denoise=denoise) == scheduler.timesteps.tolist()


def test_paper_grids():
    assert schedule.lcm_timesteps(4) == [999, 759, 499, 259]
    grid = schedule.training_grid(8)
    assert grid[0] == 7 and grid[-1] == 999 and (grid.diff() == 8).all()
    assert schedule.skip_timestep(grid, 24)[:5].tolist() == [0, 0, 0, 7, 15]
    # vanilla CD: LCM's DDIM-solver grid (arange(1, 51) * 20 - 1) with t_m = t_n - 20 clamped at 0
    lcm_grid = schedule.training_grid(20)
    assert lcm_grid.tolist() == [k * 20 - 1 for k in range(1, 51)]
    assert schedule.skip_timestep(lcm_grid, 20)[:2].tolist() == [0, 19]


def test_sigmas_for_timesteps_end_on_zero():
    ab = schedule.alphas_cumprod()
    sigmas = schedule.sigmas_for_timesteps([999, 499], ab)
    assert sigmas[-1] == 0 and sigmas.dtype == torch.float32
    assert schedule.sigma_to_timestep(sigmas[:-1].double(), ab).round().tolist() == [999, 499]


@pytest.mark.parametrize(
    "text, message",
    [
        ("999, 999", "strictly decreasing"),
        ("499, 999", "strictly decreasing"),
        ("1000, 10", "outside the integers 0..999"),
        ("-1", "outside the integers 0..999"),
        ("12.5", "outside the integers 0..999"),
        ("", "timesteps is empty"),
        ("nine", "comma-separated list of integers"),
    ],
)
def test_bad_timesteps_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        schedule.parse_timesteps(text)


@pytest.mark.parametrize("steps", [0, -1, 51, 2.5])
def test_bad_step_counts_name_the_range(steps):
    with pytest.raises(ValueError, match=r"steps must be an integer in 1\.\.50"):
        schedule.lcm_timesteps(steps)


@pytest.mark.parametrize("denoise", [0.0, 1.5, float("nan")])
def test_bad_denoise_names_the_range(denoise):
    with pytest.raises(ValueError, match=r"denoise must be in \(0.0, 1.0\]"):
        schedule.lcm_timesteps(2, denoise=denoise)


def test_sigma_table_equals_comfyui_model_sampling_discrete(comfyui_path):
    from comfy.model_sampling import ModelSamplingDiscrete

    class SD15Config:
        sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012}

    comfy = ModelSamplingDiscrete(SD15Config())
    ab = schedule.alphas_cumprod()
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(schedule.timestep_to_sigma(t, ab).float(), comfy.sigmas, rtol=1e-6, atol=0)
    fractional = torch.tensor([0.5, 12.25, 998.5])
    assert torch.allclose(schedule.timestep_to_sigma(fractional, ab).float(), comfy.sigma(fractional), rtol=1e-5)
    sigmas = schedule.sigmas_for_timesteps([999, 759, 499, 259], ab)[:-1]
    assert comfy.timestep(sigmas).tolist() == [999, 759, 499, 259]
