"""The LCM consistency boundary condition and the eps <-> x0 conversions of a VP model."""

import torch

from .schedule import append_dims

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(timestep, sigma_data=SIGMA_DATA, timestep_scaling=TIMESTEP_SCALING):
    """c_skip = sd^2 / (tau^2 + sd^2), c_out = tau / sqrt(tau^2 + sd^2), tau = timestep_scaling * t."""
    tau = torch.as_tensor(timestep, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (tau**2 + sigma_data**2)
    c_out = tau / (tau**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def x0_from_eps(z, eps, alpha, sigma):
    """x0 = (z - sigma * eps) / alpha; alpha, sigma scalars or per-sample [B]."""
    alpha, sigma = (_per_sample(v, z) for v in (alpha, sigma))
    return (z - sigma * eps) / alpha


def eps_from_x0(z, x0, alpha, sigma):
    """eps = (z - alpha * x0) / sigma; alpha, sigma scalars or per-sample [B]."""
    alpha, sigma = (_per_sample(v, z) for v in (alpha, sigma))
    return (z - alpha * x0) / sigma


def consistency_function(z, x0, timestep, sigma_data=SIGMA_DATA, timestep_scaling=TIMESTEP_SCALING):
    """f(z, t) = c_skip(t) * z + c_out(t) * x0, z the VP latent at t, x0 the model's clean estimate."""
    c_skip, c_out = (_per_sample(c, z) for c in boundary_scalings(timestep, sigma_data, timestep_scaling))
    return c_skip * z + c_out * x0


def _per_sample(value, like):
    """A scalar or [B] value as a tensor broadcastable against `like` [B, ...], in like's dtype."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return append_dims(value, like.ndim) if value.ndim else value
