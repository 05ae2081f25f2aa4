"""The SD1.5 discrete VP schedule: alphas_cumprod, alpha/sigma per timestep, timestep <-> sigma, grids."""

import functools

import torch

NUM_TRAIN_TIMESTEPS = 1000


@functools.lru_cache(maxsize=8)
def _alphas_cumprod(num_train_timesteps, beta_start, beta_end):
    # on the CPU whatever the default device (a cached schedule built under torch.device("meta") would have no values)
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64, device="cpu") ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012):
    """ab[t] = prod_{i<=t} (1 - beta_i), betas "scaled_linear" (linear in sqrt(beta)); float64 [T]."""
    return _alphas_cumprod(num_train_timesteps, beta_start, beta_end).clone()


def append_dims(x, ndim):
    """Append trailing singleton dims to x until it has ndim dims (for per-sample broadcasting)."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def _log_sigmas(ab):
    return 0.5 * ((1 - ab) / ab).log()


def timestep_to_sigma(timestep, alphas_cumprod):
    """k-diffusion sigma = sqrt((1 - ab) / ab) at a timestep; fractional timesteps interpolate log-sigma."""
    log_sigmas = _log_sigmas(alphas_cumprod)
    t = torch.as_tensor(timestep).to(log_sigmas.device, torch.float64).clamp(0, len(log_sigmas) - 1)
    low, frac = t.floor().long(), t.frac()
    high = t.ceil().long()
    return ((1 - frac) * log_sigmas[low] + frac * log_sigmas[high]).exp()


def sigma_to_timestep(sigma, alphas_cumprod):
    """Inverse of timestep_to_sigma: the fractional timestep whose interpolated log-sigma is log(sigma)."""
    log_sigmas = _log_sigmas(alphas_cumprod)
    log_sigma = torch.as_tensor(sigma).to(log_sigmas.device, torch.float64).log()
    high = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, len(log_sigmas) - 1)
    low = high - 1
    frac = (log_sigma.reshape(-1) - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
    return (low + frac.clamp(0, 1)).reshape(log_sigma.shape)


def alpha_sigma(timestep, alphas_cumprod):
    """(alpha_t, sigma_t) = (sqrt(ab[t]), sqrt(1 - ab[t])), with ab = 1 / (1 + k_sigma^2) at fractional t."""
    ab = 1.0 / (1.0 + timestep_to_sigma(timestep, alphas_cumprod) ** 2)
    return ab.sqrt(), (1.0 - ab).sqrt()


def sigmas_for_timesteps(timesteps, alphas_cumprod):
    """k-diffusion sigmas at the given timesteps, with the trailing 0 a SIGMAS schedule ends on; float32."""
    sigmas = timestep_to_sigma(torch.as_tensor(timesteps, dtype=torch.float64), alphas_cumprod)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def lcm_origin_timesteps(origin_steps=50, denoise=1.0, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """LCM's origin grid [c - 1, 2c - 1, ..., int(origin_steps * denoise) * c - 1], c = T // origin_steps."""
    c = num_train_timesteps // origin_steps
    return [k * c - 1 for k in range(1, int(origin_steps * denoise) + 1)]


def lcm_timesteps(steps, denoise=1.0, origin_steps=50, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """The `steps` timesteps LCMScheduler.set_timesteps(steps, strength=denoise) picks, decreasing."""
    _check_int_range("steps", steps, 1, origin_steps)
    _check_float_range("denoise", denoise, 0.0, 1.0, low_open=True)
    origin = lcm_origin_timesteps(origin_steps, denoise, num_train_timesteps)[::-1]
    if steps > len(origin):
        raise ValueError(
            f"steps={steps} is more than the {len(origin)} timesteps left at denoise={denoise}; "
            f"use steps <= {len(origin)} or a higher denoise"
        )
    indices = torch.linspace(0, len(origin), steps + 1, dtype=torch.float64)[:-1].floor().long()
    return [origin[i] for i in indices.tolist()]


def training_grid(spacing=8, *, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """t_n on the grid T-1, T-1-spacing, ..., down to the smallest >= 0; increasing, long."""
    _check_int_range("spacing", spacing, 1, num_train_timesteps - 1)
    return torch.arange(num_train_timesteps - 1, -1, -spacing).flip(0)


def skip_timestep(t_n, span):
    """t_m = max(t_n - span, 0): as LCM, the lowest t_n reach t = 0, where f(z, 0) = z anchors the model."""
    _check_int_range("span", span, 1, NUM_TRAIN_TIMESTEPS - 1)
    return (torch.as_tensor(t_n) - span).clamp(min=0)


def check_timesteps(timesteps, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """Validate a sampling timestep list: non-empty, integers in 0..T-1, strictly decreasing."""
    timesteps = [float(t) for t in timesteps]
    if not timesteps:
        raise ValueError(f"timesteps is empty; give at least one timestep in 0..{num_train_timesteps - 1}")
    bad = [t for t in timesteps if not (0 <= t <= num_train_timesteps - 1) or t != int(t)]
    if bad:
        raise ValueError(f"timesteps {bad} are outside the integers 0..{num_train_timesteps - 1}")
    if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {[int(t) for t in timesteps]}")
    return [int(t) for t in timesteps]


def parse_timesteps(text, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """'999, 499' -> [999, 499], validated by check_timesteps."""
    try:
        values = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"timesteps {text!r} is not a comma-separated list of integers like '999, 499'") from None
    return check_timesteps(values, num_train_timesteps)


def _check_int_range(name, value, low, high):
    if isinstance(value, bool) or int(value) != value or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")


def _check_float_range(name, value, low, high, low_open=False):
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
