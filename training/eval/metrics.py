"""Set metrics over feature vectors: mean/covariance, the Frechet distance (FID's formula), PRDC.

Plain functions over (N, D) tensors, whatever network made the features. `frechet_distance` is the FID formula;
`prdc` is Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models" (precision, recall,
density, coverage from k-nearest-neighbour radii).
"""

import torch


def mean_cov(feats):
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    x = torch.as_tensor(feats, dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N, D) features with N >= 2, got shape {tuple(x.shape)}")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def sqrtm_psd(m):
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_gaussians(mu1, cov1, mu2, cov2, root1=None):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); tr (S1 S2)^1/2 = sum sqrt eig(S1^1/2 S2 S1^1/2).
    root1: sqrtm_psd(cov1) if already known (one reference set scored against many)."""
    mu1, cov1, mu2, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, cov1, mu2, cov2))
    root = sqrtm_psd(cov1) if root1 is None else torch.as_tensor(root1, dtype=torch.float64)
    middle = root @ cov2 @ root
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt).item()


def frechet_distance(feats_a, feats_b):
    """Frechet distance between Gaussians fit to two (N, D) feature sets (the FID formula)."""
    return frechet_gaussians(*mean_cov(feats_a), *mean_cov(feats_b))


def knn_radii(feats, k):
    """Distance from each point to its k-th nearest other point in the same set."""
    if feats.shape[0] <= k:
        raise ValueError(f"prdc with k={k} needs more than {k} points per set, got {feats.shape[0]}")
    return torch.cdist(feats, feats).kthvalue(k + 1, dim=1).values


def prdc(real_feats, fake_feats, k=5):
    """{precision, recall, density, coverage} of fake vs real features (Naeem et al. 2020, strict `<` balls)."""
    real, fake = (torch.as_tensor(f, dtype=torch.float64) for f in (real_feats, fake_feats))
    real_r, fake_r = knn_radii(real, k), knn_radii(fake, k)
    dist = torch.cdist(real, fake)  # (n_real, n_fake)
    inside_real = dist < real_r[:, None]
    return {
        "precision": inside_real.any(0).double().mean().item(),
        "recall": (dist < fake_r[None, :]).any(1).double().mean().item(),
        "density": inside_real.sum(0).double().mean().item() / k,
        "coverage": (dist.min(1).values < real_r).double().mean().item(),
    }
