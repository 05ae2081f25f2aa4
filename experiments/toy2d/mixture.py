"""A 2-D isotropic Gaussian mixture with its exact VP marginals, posterior mean and score."""

import math

import torch


class GaussianMixture:
    """Mixture of isotropic Gaussians N(means[k], stds[k]^2 I) with weights[k]."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        w = torch.ones(k) if weights is None else torch.as_tensor(weights)
        w = w.to(torch.float64)
        self.weights = w / w.sum()

    @classmethod
    def ring(cls, modes=8, radius=1.0, std=0.08):
        """`modes` equal modes evenly spaced on a circle."""
        angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
        return cls(radius * torch.stack([angle.cos(), angle.sin()], 1), std)

    @classmethod
    def grid(cls, side=5, extent=1.0, std=0.05):
        """side x side equal modes on a square grid spanning [-extent, extent]^2."""
        axis = torch.linspace(-extent, extent, side, dtype=torch.float64)
        return cls(torch.cartesian_prod(axis, axis), std)

    def marginal(self, alpha, sigma):
        """The law of alpha * x + sigma * noise: again a Gaussian mixture."""
        stds = (alpha**2 * self.stds**2 + sigma**2).sqrt()
        return GaussianMixture(alpha * self.means, stds, self.weights)

    def sample(self, n, generator=None):
        """n exact samples, float64 [n, 2]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k, None] * noise

    def _posterior(self, z, alpha, sigma):
        """p(k | z) and the per-component gain, for z = alpha * x0 + sigma * noise."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        var = alpha**2 * self.stds**2 + sigma**2
        centre = alpha[..., None] * self.means
        d2 = ((z[:, None, :] - centre) ** 2).sum(-1)
        r = torch.softmax(self.weights.log() - d2 / (2 * var) - var.log(), dim=1)
        return r, alpha * self.stds**2 / var, centre

    def mean(self):
        """Mixture mean."""
        return self.weights @ self.means

    def covariance(self):
        """Mixture covariance: within-component plus between-component spread."""
        centred = self.means - self.mean()
        between = (self.weights[:, None] * centred).T @ centred
        return between + (self.weights * self.stds**2).sum() * torch.eye(2, dtype=torch.float64)

    def denoise(self, z, alpha, sigma):
        """Exact posterior mean E[x0 | z] for z = alpha * x0 + sigma * noise; alpha, sigma scalar or [n]."""
        z = z.to(torch.float64)
        r, gain, centre = self._posterior(z, alpha, sigma)
        post = self.means + gain[..., None] * (z[:, None, :] - centre)
        return (r[..., None] * post).sum(1)

    def eps(self, z, alpha, sigma):
        """Exact noise prediction E[noise | z] = (z - alpha * E[x0 | z]) / sigma."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        return (z.to(torch.float64) - alpha * self.denoise(z, alpha, sigma)) / sigma
