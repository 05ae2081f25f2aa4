"""Set metrics over classifier features and predictions: Frechet distance, PRDC, prompt accuracy.

Plain functions over tensors. `frechet_distance` is the FID formula on any features; `prdc` is Naeem et al. 2020,
"Reliable Fidelity and Diversity Metrics for Generative Models" (precision, recall, density, coverage from k-NN
radii); `prompt_accuracy` compares predicted attributes with the ones a caption names (a CLIP-score analog).
"""

import torch

from training.world import scenes

from .classifier import HEADS, allowed_mask


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


def frechet_gaussians(mu1, cov1, mu2, cov2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); tr (S1 S2)^1/2 = sum sqrt eig(S1^1/2 S2 S1^1/2)."""
    mu1, cov1, mu2, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, cov1, mu2, cov2))
    root = sqrtm_psd(cov1)
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


def as_predictions(logits_or_predictions):
    """(N, heads) class indices from a {head: (N, C) logits} dict or an (N, heads) index tensor."""
    if isinstance(logits_or_predictions, dict):
        return torch.stack([logits_or_predictions[name].argmax(-1) for name in HEADS], dim=1)
    return torch.as_tensor(logits_or_predictions, dtype=torch.long)


def prompt_accuracy(logits_or_predictions, captions):
    """{prompt_acc: mean accuracy over the attributes the captions name, exact_match: rate of every named one right,
    acc_<head>: per head, over the captions that name it}. A full world caption names all 8 heads; a diverse one
    fewer (scenes.parse_partial; classifier.allowed): a head is checked where the caption rules out some class."""
    preds = as_predictions(logits_or_predictions)
    mask = allowed_mask([scenes.parse_partial(caption) for caption in captions])
    if preds.shape != mask.shape[:2]:
        raise ValueError(f"predictions of shape {tuple(preds.shape)} for {len(captions)} captions "
                         f"(expected {tuple(mask.shape[:2])})")
    right = mask.gather(2, preds.clamp(0, mask.shape[2] - 1)[..., None])[..., 0]
    checked = mask.sum(2) < torch.tensor(list(HEADS.values()))
    per_head = {f"acc_{name}": right[checked[:, i], i].double().mean().item()
                for i, name in enumerate(HEADS) if checked[:, i].any()}
    return {"prompt_acc": right[checked].double().mean().item(),
            "exact_match": (right | ~checked).all(1).double().mean().item(), **per_head}
