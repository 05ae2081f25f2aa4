"""The boundary condition and eps <-> x0 against diffusers' LCMScheduler."""

import torch
from diffusers import LCMScheduler

from scott_core import consistency, schedule


def test_boundary_scalings_equal_lcm_scheduler():
    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for t in [0, 1, 19, 259, 499, 999]:
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        c_skip, c_out = consistency.boundary_scalings(t)
        assert abs(float(c_skip) - float(ref_skip)) < 1e-9 * max(1.0, float(ref_skip))
        assert abs(float(c_out) - float(ref_out)) < 1e-7


def test_boundary_condition_holds_at_zero():
    z, x0 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(consistency.consistency_function(z, x0, 0), z)


def test_eps_x0_round_trip_per_sample():
    ab = schedule.alphas_cumprod()
    alpha, sigma = schedule.alpha_sigma(torch.tensor([10, 500, 999]), ab)
    x0, eps = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    z = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    assert torch.allclose(consistency.x0_from_eps(z, eps, alpha, sigma), x0, atol=1e-10)
    assert torch.allclose(consistency.eps_from_x0(z, x0, alpha, sigma), eps, atol=1e-10)
