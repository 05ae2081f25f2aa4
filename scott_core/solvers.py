"""Teacher solvers from t_n to t_m: a registry of one-step functions (DDIM(eta), first-order ER-SDE(phi), ER-SDE 5
below a timestep and the ODE above it), each with its own knobs, the multi-step solve, CFG."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .consistency import _per_sample, x0_from_eps
from .schedule import alpha_sigma


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


def phi_ode(x):
    """The probability-flow ODE's noise scale phi(x) = x (no noise; equals DDIM eta 0)."""
    return x


def phi_sde(x):
    """The full reverse SDE's noise scale phi(x) = x^2 (first-order SDE-DPM-Solver++)."""
    return x**2


def phi_er_sde_5(x):
    """ER-SDE 5's noise scale phi(x) = x * (exp(x^0.3) + 10)."""
    return x * (torch.exp(x**0.3) + 10)


def phi_noise_strength(x, noise_strength=0.0):
    """The family joining them: phi(x) = x^(1 + noise_strength^2); 0 = the ODE, 1 = the full reverse SDE."""
    return x ** (1 + noise_strength**2)


def ddim_step(z, x0, eps, alpha_s, sigma_s, alpha_s2, sigma_s2, noise=None, eta=0.0):
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


def er_sde(phi):
    """The registry's step for ER-SDE with noise scale phi(x, **knobs), in ddim_step's signature."""

    def step(z, x0, eps, alpha_s, sigma_s, alpha_s2, sigma_s2, noise=None, **knobs):
        return er_sde_step(z, x0, alpha_s, sigma_s, alpha_s2, sigma_s2, lambda x: phi(x, **knobs), noise)

    return step


def er_sde_below(phi):
    """The registry's step for ER-SDE with noise scale phi on steps that start below timestep `noise_below` and the
    ODE on the others (per sample; the step also gets t_s, the start timesteps): noise only where modes are decided."""
    noisy, ode = er_sde(phi), er_sde(phi_ode)

    def step(z, x0, eps, alpha_s, sigma_s, alpha_s2, sigma_s2, noise=None, *, t_s, noise_below):
        below = _per_sample(torch.as_tensor(t_s) < noise_below, z).bool()
        coefs = (alpha_s, sigma_s, alpha_s2, sigma_s2)
        return torch.where(below, noisy(z, x0, eps, *coefs, noise), ode(z, x0, eps, *coefs))

    return step


@dataclass(frozen=True)
class SolverSpec:
    """A teacher solver: its step (ddim_step's signature, plus its knobs) and its knobs, name -> default."""

    step: Callable
    knobs: dict = field(default_factory=dict)
    stochastic: bool = True  # False: never draws noise; True: draws it unless all its knobs are 0
    timed: bool = False  # True: the step also takes t_s, the start timestep of each sample


SOLVERS = {
    "ddim": SolverSpec(ddim_step, {"eta": 0.0}),
    "ode": SolverSpec(er_sde(phi_ode), stochastic=False),
    "sde": SolverSpec(er_sde(phi_sde)),
    "er_sde_5": SolverSpec(er_sde(phi_er_sde_5)),
    "noise_strength": SolverSpec(er_sde(phi_noise_strength), {"noise_strength": 0.0}),
    "er_sde_5_below": SolverSpec(er_sde_below(phi_er_sde_5), {"noise_below": 500.0}, timed=True),
}
KNOBS = tuple(dict.fromkeys(k for spec in SOLVERS.values() for k in spec.knobs))  # eta, noise_strength, noise_below


def knob_owners(knob):
    """The solvers that take `knob`."""
    return [name for name, spec in SOLVERS.items() if knob in spec.knobs]


def solver_knobs(solver, **given):
    """The knobs `solver` runs with (its defaults, then the given non-None values); ValueError naming a bad one."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    knobs = dict(SOLVERS[solver].knobs)
    for name, value in given.items():
        if value is None:
            continue
        if name not in knobs:
            takes = f"it takes {', '.join(knobs)}" if knobs else "it takes no knob"
            owners = f" ({name} is for solver {' / '.join(knob_owners(name))})" if knob_owners(name) else ""
            raise ValueError(f"solver {solver} takes no {name}; {takes}{owners}")
        if isinstance(value, bool) or not (0 <= value and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        knobs[name] = value
    return knobs


def is_deterministic(solver, **knobs):
    """True where the solver draws no noise: the ODE, DDIM with eta 0, the family at strength 0."""
    spec = SOLVERS[solver]
    return not spec.stochastic or (bool(spec.knobs) and all(v == 0 for v in solver_knobs(solver, **knobs).values()))


def _step(solver, z, eps, t_s, t_s2, alphas_cumprod, noise, knobs):
    """One registered step s -> s2 with already-checked knobs."""
    coefs = [_per_sample(v, z) for v in (*alpha_sigma(t_s, alphas_cumprod), *alpha_sigma(t_s2, alphas_cumprod))]
    x0 = x0_from_eps(z, eps, coefs[0], coefs[1])
    timed = {"t_s": t_s} if SOLVERS[solver].timed else {}
    return SOLVERS[solver].step(z, x0, eps, *coefs, noise, **timed, **knobs)


def solver_step(solver, z, eps, t_s, t_s2, alphas_cumprod, noise=None, **knobs):
    """One teacher step s -> s2 (timesteps, scalars or [B]) from the (guided) eps at s; knobs as in `solve`."""
    return _step(solver, z, eps, t_s, t_s2, alphas_cumprod, noise, solver_knobs(solver, **knobs))


def solve(
    eps_fn, z, t_n, t_m, alphas_cumprod, solver="er_sde_5", sub_steps=3, *, generator=None, noise_sampler=None,
    **knobs,
):
    """Teacher solve t_n -> t_m in `sub_steps` equal sub-steps, fresh noise each; eps_fn(z, t[B]) -> eps.
    Knobs: `eta` is DDIM's (solver "ddim"), `noise_strength` the family's (solver "noise_strength"), `noise_below`
    the timestep below which "er_sde_5_below" adds noise; None = the solver's default; a knob the solver does not
    take is a ValueError."""
    knobs = check_solver(solver, sub_steps, **knobs)
    t_n, t_m = (torch.as_tensor(t).to("cpu", torch.float64).expand(z.shape[0]) for t in (t_n, t_m))
    if noise_sampler is None and not is_deterministic(solver, **knobs):
        noise_sampler = default_noise_sampler(z, generator)
    for k in range(sub_steps):
        s, s2 = t_n + (t_m - t_n) * (k / sub_steps), t_n + (t_m - t_n) * ((k + 1) / sub_steps)
        noise = None if noise_sampler is None else noise_sampler(s, s2)
        eps = eps_fn(z, s.to(z.device, torch.float32))
        z = _step(solver, z, eps, s, s2, alphas_cumprod, noise, knobs)
    return z


def check_solver(solver, sub_steps, **knobs):
    """Validate a solver name, sub-step count and knobs, naming the allowed values; returns the knobs it runs with."""
    knobs = solver_knobs(solver, **knobs)
    if isinstance(sub_steps, bool) or int(sub_steps) != sub_steps or sub_steps < 1:
        raise ValueError(f"sub_steps must be an integer >= 1, got {sub_steps!r}")
    return knobs
