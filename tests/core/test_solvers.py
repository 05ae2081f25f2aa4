"""Teacher solvers against diffusers' DDIM and SDE-DPM-Solver++ steps, and against exact Gaussian-mixture marginals."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from experiments.toy2d.mixture import GaussianMixture
from scott_core import schedule, solvers

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
AB = schedule.alphas_cumprod()


def _latents(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("eta", [0.0, 0.1, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("t", [999, 519, 39])
def test_ddim_step_equals_diffusers(eta, t):
    scheduler = DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    z, eps, noise = _latents(0, 2, 4, 8, 8), _latents(1, 2, 4, 8, 8), _latents(2, 2, 4, 8, 8)
    reference = scheduler.step(eps, t, z, eta=eta, variance_noise=noise).prev_sample
    ours = solvers.solver_step("ddim", z, eps, t, t - 20, AB, noise, eta=eta)
    assert (ours - reference).abs().max() < 1e-5


@pytest.mark.parametrize("t", [999, 519, 39])
def test_er_sde_ode_equals_ddim_eta_zero(t):
    z, eps = _latents(0, 2, 4, 8, 8).double(), _latents(1, 2, 4, 8, 8).double()
    ode = solvers.solver_step("ode", z, eps, t, t - 24, AB)
    ddim = solvers.solver_step("ddim", z, eps, t, t - 24, AB, eta=0.0)
    assert (ode - ddim).abs().max() < 1e-12


def test_er_sde_full_sde_equals_sde_dpmsolver_first_order():
    scheduler = DPMSolverMultistepScheduler(
        **SD15, algorithm_type="sde-dpmsolver++", solver_order=1, timestep_spacing="trailing"
    )
    scheduler.set_timesteps(20)
    z = _latents(0, 2, 4, 8, 8)
    timesteps = scheduler.timesteps.tolist()
    for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        eps, noise = _latents(10 + i, 2, 4, 8, 8), _latents(100 + i, 2, 4, 8, 8)
        reference = scheduler.step(eps, t, z, variance_noise=noise).prev_sample
        ours = solvers.solver_step("sde", z, eps, t, t_next, AB, noise)
        assert (ours - reference).abs().max() < 1e-4 * max(1.0, reference.abs().max())
        z = reference


def test_cfg_combine_is_lcm_form_per_sample():
    cond, uncond = _latents(0, 2, 4, 2, 2), _latents(1, 2, 4, 2, 2)
    w = torch.tensor([0.0, 3.0])
    out = solvers.cfg_combine(cond, uncond, w)
    assert torch.equal(out[0], cond[0])
    assert torch.allclose(out[1], 4.0 * cond[1] - 3.0 * uncond[1])


# --- marginals on a 2-D Gaussian mixture whose score is exact -------------------------------------------

MIXTURE = GaussianMixture.ring(modes=6, radius=1.2, std=0.25)
N = 8192
FAMILIES = [
    ("ddim", dict(eta=0.0)), ("ddim", dict(eta=0.3)), ("ddim", dict(eta=1.0)), ("ode", {}), ("sde", {}),
    ("er_sde_5", {}), ("noise_strength", dict(noise_strength=0.3)), ("noise_strength", dict(noise_strength=1.0)),
    ("er_sde_5_below", dict(noise_below=500)),
]
SPANS = [(999, 975), (263, 239), (71, 47)]


def _exact_eps(z, t):
    alpha, sigma = schedule.alpha_sigma(t, AB)
    return MIXTURE.eps(z, alpha, sigma)


def _marginal(t):
    return MIXTURE.marginal(*schedule.alpha_sigma(t, AB))


def _sliced_w2(a, b, projections=64, seed=0):
    directions = torch.randn(projections, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    pa, pb = (a @ directions.T).sort(0).values, (b @ directions.T).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt()


def _solve_from_exact(t_n, t_m, solver, knobs, seed, noise_scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    z_n = _marginal(t_n).sample(N, generator)
    noise_sampler = lambda s, s2: noise_scale * torch.randn(N, 2, generator=generator, dtype=torch.float64)  # noqa: E731
    return solvers.solve(
        _exact_eps, z_n, t_n, t_m, AB, solver=solver, sub_steps=3, noise_sampler=noise_sampler, **knobs
    )


def _noise_floor(target, seed):
    """The largest sliced W2 between independent exact sample sets of size N (the test's resolution)."""
    pairs = [(target.sample(N, torch.Generator().manual_seed(seed + 2 * k)),
              target.sample(N, torch.Generator().manual_seed(seed + 2 * k + 1))) for k in range(8)]
    return max(_sliced_w2(a, b) for a, b in pairs)


def _assert_matches_marginal(samples, target, seed):
    mean_err = samples.mean(0) - target.mean()
    assert (mean_err.abs() <= 3 * samples.std(0) / N**0.5).all(), f"mean off by {mean_err}"
    centred = samples - samples.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    cov_err = products.mean(0) - target.covariance()
    assert (cov_err.abs() <= 3 * products.std(0) / N**0.5).all(), f"covariance off by {cov_err}"
    exact = target.sample(N, torch.Generator().manual_seed(seed + 1000))
    assert _sliced_w2(samples, exact) <= 1.5 * _noise_floor(target, seed + 2000)


@pytest.mark.parametrize("t_n, t_m", SPANS)
@pytest.mark.parametrize("solver, knobs", FAMILIES)
def test_multistep_solve_preserves_the_marginal(solver, knobs, t_n, t_m):
    samples = _solve_from_exact(t_n, t_m, solver, knobs, seed=t_n)
    _assert_matches_marginal(samples, _marginal(t_m), seed=t_n)


def test_marginal_check_catches_a_wrong_noise_scale():
    samples = _solve_from_exact(71, 47, "sde", {}, seed=5, noise_scale=1.5)
    with pytest.raises(AssertionError):
        _assert_matches_marginal(samples, _marginal(47), seed=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver="euler"), "solver must be one of ddim, ode, sde, er_sde_5, noise_strength, er_sde_5_below"),
        (dict(sub_steps=0), "sub_steps must be an integer >= 1"),
        (dict(solver="noise_strength", noise_strength=-0.1), "noise_strength must be a finite number >= 0"),
        (dict(solver="noise_strength", noise_strength=float("nan")), "noise_strength must be a finite number >= 0"),
        (dict(solver="ddim", eta=-0.1), "eta must be a finite number >= 0"),
        (dict(solver="er_sde_5", noise_strength=0.3),
         r"solver er_sde_5 takes no noise_strength; it takes no knob \(noise_strength is for solver noise_strength\)"),
        (dict(solver="ddim", noise_strength=0.3), r"solver ddim takes no noise_strength; it takes eta \(noise_str"),
        (dict(solver="noise_strength", eta=0.3), r"solver noise_strength takes no eta; it takes noise_strength \(eta"),
        (dict(solver="ode", eta=0.0), r"solver ode takes no eta; it takes no knob \(eta is for solver ddim\)"),
        (dict(solver="sde", noise_strength=0.0), "solver sde takes no noise_strength"),
        (dict(solver="er_sde_5", noise_below=500), r"solver er_sde_5 takes no noise_below; .*er_sde_5_below\)"),
        (dict(solver="er_sde_5_below", noise_below=-1), "noise_below must be a finite number >= 0"),
    ],
)
def test_bad_solver_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        solvers.solve(lambda z, t: z, torch.zeros(1, 2), 999, 975, AB, **kwargs)


def test_solver_step_checks_knobs_too():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="solver er_sde_5 takes no noise_strength"):
        solvers.solver_step("er_sde_5", z, z, 999, 975, AB, noise_strength=0.3)


@pytest.mark.parametrize("solver", list(solvers.SOLVERS))
def test_every_solver_runs_with_unused_knobs_left_none(solver):
    """The trainer passes every knob, None where the solver does not take it."""
    z = _latents(0, 4, 2).double()
    out = solvers.solve(_exact_eps, z, 519, 495, AB, solver, 3, generator=torch.Generator().manual_seed(0),
                        **dict.fromkeys(solvers.KNOBS))
    assert out.shape == z.shape and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "solver, knobs, draws",
    [("ode", {}, False), ("ddim", {}, False), ("ddim", dict(eta=0.0), False), ("ddim", dict(eta=0.3), True),
     ("noise_strength", {}, False), ("noise_strength", dict(noise_strength=0.3), True), ("sde", {}, True),
     ("er_sde_5", {}, True), ("er_sde_5_below", {}, True), ("er_sde_5_below", dict(noise_below=0), False)],
)
def test_only_noisy_solvers_draw_from_the_generator(solver, knobs, draws):
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    solvers.solve(_exact_eps, _latents(0, 4, 2).double(), 519, 495, AB, solver, 3, generator=generator, **knobs)
    assert (not torch.equal(generator.get_state(), before)) == draws


@pytest.mark.parametrize("t", [999, 519, 39])
def test_knob_defaults_are_zero_noise(t):
    """ddim without eta and the family without noise_strength are the ODE."""
    z, eps = _latents(0, 2, 4, 8, 8).double(), _latents(1, 2, 4, 8, 8).double()
    ode = solvers.solver_step("ode", z, eps, t, t - 24, AB)
    assert (solvers.solver_step("ddim", z, eps, t, t - 24, AB) - ode).abs().max() < 1e-12
    assert torch.equal(solvers.solver_step("noise_strength", z, eps, t, t - 24, AB), ode)


@pytest.mark.parametrize("t", [999, 519, 39])
def test_noise_below_is_er_sde_5_below_t_star_and_the_ode_above(t):
    """Per sample: a step starting below t* is ER-SDE 5's (same noise), one at or above t* the ODE's; t* = 0 is the
    ODE everywhere and t* = 1000 ER-SDE 5 everywhere."""
    z, eps, noise = _latents(0, 2, 4, 8, 8).double(), _latents(1, 2, 4, 8, 8).double(), _latents(2, 2, 4, 8, 8).double()
    t_s = torch.tensor([t, t - 30], dtype=torch.float64)
    ode = solvers.solver_step("ode", z, eps, t_s, t_s - 24, AB)
    sde = solvers.solver_step("er_sde_5", z, eps, t_s, t_s - 24, AB, noise)
    assert not torch.allclose(ode, sde)

    def below(t_star):
        return solvers.solver_step("er_sde_5_below", z, eps, t_s, t_s - 24, AB, noise, noise_below=t_star)

    assert torch.equal(below(0), ode) and torch.equal(below(1000), sde)
    split = below(t - 15)  # sample 0 starts above t*, sample 1 below
    assert torch.equal(split[0], ode[0]) and torch.equal(split[1], sde[1])
