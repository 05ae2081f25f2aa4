"""Teacher solvers from t_n to t_m: DDIM(eta), first-order ER-SDE(phi), multi-step solve, CFG."""

import math

import torch

from .consistency import _per_sample, x0_from_eps
from .schedule import alpha_sigma

SOLVERS = ("ddim", "ode", "sde", "er_sde_5", "noise_strength")


def default_noise_sampler(x, generator=None, seed=None):
    """noise_sampler(t, t_next) drawing standard normals shaped like x from `generator` (or a new one seeded `seed`)."""
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
    device = x.device if generator is None else generator.device  # a CPU generator also serves a CUDA latent
    return lambda t, t_next: torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def cfg_combine(eps_cond, eps_uncond, w):
    """LCM's guidance: (1 + w) * eps_cond - w * eps_uncond; w a scalar or per-sample [B]."""
    w = _per_sample(w, eps_cond)
    return (1 + w) * eps_cond - w * eps_uncond


def phi_er_sde_5(x):
    """ER-SDE 5's noise scale phi(x) = x * (exp(x^0.3) + 10)."""
    return x * (torch.exp(x**0.3) + 10)


def noise_scale_function(solver, noise_strength=0.0):
    """phi for an ER-SDE solver: ode x, sde x^2, er_sde_5, noise_strength x^(1 + noise_strength^2)."""
    if solver == "ode":
        return lambda x: x
    if solver == "sde":
        return lambda x: x**2
    if solver == "er_sde_5":
        return phi_er_sde_5
    if solver == "noise_strength":
        return lambda x: x ** (1 + noise_strength**2)
    raise ValueError(f"solver {solver!r} has no noise-scale function; choose one of {SOLVERS[1:]}")


def ddim_step(z, x0, eps, alpha_s, sigma_s, alpha_s2, sigma_s2, eta, noise=None):
    """DDIM(eta): z' = alpha_s2 x0 + sqrt(1 - ab_s2 - var) eps + sqrt(var) noise,
    var = eta^2 (1 - ab_s2) / (1 - ab_s) (1 - ab_s / ab_s2)."""
    var = eta**2 * (sigma_s2 / sigma_s) ** 2 * (1 - (alpha_s / alpha_s2) ** 2)
    z_next = alpha_s2 * x0 + (sigma_s2**2 - var).clamp(min=0).sqrt() * eps
    return z_next if noise is None or eta == 0 else z_next + var.sqrt() * noise


def er_sde_step(z, x0, alpha_s, sigma_s, alpha_s2, sigma_s2, phi, noise=None):
    """First-order VP ER-SDE with lam = sigma/alpha and r = phi(lam_s2) / phi(lam_s):
    z' = (alpha_s2 / alpha_s) r z + alpha_s2 (1 - r) x0 + alpha_s2 sqrt(lam_s2^2 - lam_s^2 r^2) noise."""
    lam_s, lam_s2 = sigma_s / alpha_s, sigma_s2 / alpha_s2
    r = phi(lam_s2) / phi(lam_s)
    z_next = (alpha_s2 / alpha_s) * r * z + alpha_s2 * (1 - r) * x0
    if noise is None:
        return z_next
    return z_next + alpha_s2 * (lam_s2**2 - lam_s**2 * r**2).clamp(min=0).sqrt() * noise


def solver_step(solver, z, eps, t_s, t_s2, alphas_cumprod, noise=None, noise_strength=0.0):
    """One teacher step s -> s2 (timesteps, scalars or [B]) from the (guided) eps at s."""
    alpha_s, sigma_s, alpha_s2, sigma_s2 = (
        _per_sample(v, z) for v in (*alpha_sigma(t_s, alphas_cumprod), *alpha_sigma(t_s2, alphas_cumprod))
    )
    x0 = x0_from_eps(z, eps, alpha_s, sigma_s)
    if solver == "ddim":
        return ddim_step(z, x0, eps, alpha_s, sigma_s, alpha_s2, sigma_s2, noise_strength, noise)
    return er_sde_step(z, x0, alpha_s, sigma_s, alpha_s2, sigma_s2, noise_scale_function(solver, noise_strength), noise)


def is_deterministic(solver, noise_strength=0.0):
    """True where the solver draws no noise: the ODE, DDIM with eta 0, the family at strength 0."""
    return solver == "ode" or (solver in ("ddim", "noise_strength") and noise_strength == 0)


def solve(
    eps_fn, z, t_n, t_m, alphas_cumprod, solver="er_sde_5", sub_steps=3, noise_strength=0.0,
    generator=None, noise_sampler=None,
):
    """Teacher solve t_n -> t_m in `sub_steps` equal sub-steps, fresh noise each; eps_fn(z, t[B]) -> eps."""
    check_solver(solver, sub_steps, noise_strength)
    t_n, t_m = (torch.as_tensor(t).to("cpu", torch.float64).expand(z.shape[0]) for t in (t_n, t_m))
    if noise_sampler is None and not is_deterministic(solver, noise_strength):
        noise_sampler = default_noise_sampler(z, generator)
    for k in range(sub_steps):
        s, s2 = t_n + (t_m - t_n) * (k / sub_steps), t_n + (t_m - t_n) * ((k + 1) / sub_steps)
        noise = None if noise_sampler is None else noise_sampler(s, s2)
        eps = eps_fn(z, s.to(z.device, torch.float32))
        z = solver_step(solver, z, eps, s, s2, alphas_cumprod, noise, noise_strength)
    return z


def check_solver(solver, sub_steps, noise_strength):
    """Validate a solver name, sub-step count and noise strength, naming the allowed values."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    if isinstance(sub_steps, bool) or int(sub_steps) != sub_steps or sub_steps < 1:
        raise ValueError(f"sub_steps must be an integer >= 1, got {sub_steps!r}")
    if not (0 <= noise_strength and math.isfinite(noise_strength)):
        raise ValueError(f"noise_strength must be a finite number >= 0, got {noise_strength!r}")
