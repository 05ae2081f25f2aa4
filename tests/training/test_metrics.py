"""training.eval.metrics: the Frechet distance against closed forms and pytorch-fid's scipy formula; PRDC by hand."""

import numpy as np
import pytest
import torch

from training.eval import metrics


def test_frechet_of_commuting_gaussians_is_the_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = (mu1 - mu2).square().sum() + (var1.sqrt() - var2.sqrt()).square().sum()  # 5 + (4 + 1 + 0)
    got = metrics.frechet_gaussians(mu1, torch.diag(var1), mu2, torch.diag(var2))
    assert got == pytest.approx(expected.item(), abs=1e-10) and got == pytest.approx(10.0)


def test_frechet_of_rotated_gaussians_is_the_closed_form():
    # S2 = R S1 R^T is not diagonal and does not commute with S1; in 2-D with eigenvalues a, b:
    # tr (S1 S2)^1/2 = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))) (a 2x2 identity).
    s1 = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    angle = torch.tensor(0.7, dtype=torch.float64)
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    s2 = rot @ s1 @ rot.T
    prod = s1 @ s2
    trace_sqrt = (prod.trace() + 2 * torch.linalg.det(prod).sqrt()).sqrt()
    expected = s1.trace() + s2.trace() - 2 * trace_sqrt
    assert metrics.frechet_gaussians(torch.zeros(2), s1, torch.zeros(2), s2) == pytest.approx(expected.item())


def test_frechet_distance_of_samples_approaches_the_population_value():
    generator = torch.Generator().manual_seed(0)
    d, n = 4, 200_000
    a = torch.randn(n, d, generator=generator, dtype=torch.float64)
    b = 2 * torch.randn(n, d, generator=generator, dtype=torch.float64) + 0.5
    expected = d * 0.25 + d * (2 - 1) ** 2  # |mu|^2 + tr(I + 4I - 2 * 2I)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def reference_frechet_distances(a, b):
    """The Frechet distance of two numpy feature sets by pytorch-fid's and clean-fid's scipy formula (sqrtm of S1 S2)
    and by torchmetrics' (eigenvalues of S1 S2)."""
    from cleanfid.fid import frechet_distance as clean_fid
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torchmetrics.image.fid import _compute_fid

    stats = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    return {
        "pytorch-fid": calculate_frechet_distance(*stats),
        "clean-fid": clean_fid(*stats),
        "torchmetrics": _compute_fid(*(torch.from_numpy(x) for x in stats)).item(),
    }


# (n_a, n_b, feature size): full rank, and fewer samples than features (singular covariances, where the clamp of
# the eigenvalues rounding leaves below 0 keeps the square root real).
@pytest.mark.parametrize("n_a, n_b, dim", [(300, 250, 24), (40, 30, 128), (20, 15, 64), (6, 8, 512)])
def test_frechet_distance_matches_pytorch_fid_clean_fid_and_torchmetrics(n_a, n_b, dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(n_a, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim)
    b = rng.normal(size=(n_b, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim) + 0.3
    ours = metrics.frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    for name, reference in reference_frechet_distances(a, b).items():
        assert ours == pytest.approx(reference, rel=1e-6), name


def test_a_known_square_root_gives_the_same_distance():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(100, 12, generator=generator), torch.randn(80, 12, generator=generator) * 1.5
    mu, cov = metrics.mean_cov(a)
    got = metrics.frechet_gaussians(mu, cov, *metrics.mean_cov(b), root1=metrics.sqrtm_psd(cov))
    assert got == pytest.approx(metrics.frechet_distance(b, a), rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)


def test_prdc_on_points_counted_by_hand():
    # k = 1 on a line. Real radii (1-NN): 0 -> 1, 1 -> 1, 2 -> 1, 10 -> 8; fake radii: .5 -> 1.1, 1.6 -> 1.1, 50 -> 1,
    # 51 -> 1. Precision: .5 and 1.6 fall in real balls, 50 and 51 do not -> 1/2. Recall: 0, 1, 2 fall in fake balls,
    # 10 does not -> 3/4. Density: .5 in the balls of 0 and 1, 1.6 in those of 1 and 2 -> (2 + 2) / 4 = 1.
    # Coverage: 0, 1, 2 have a fake inside their ball, 10 (nearest fake 1.6 at 8.4 > 8) not -> 3/4.
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    fake = torch.tensor([[0.5], [1.6], [50.0], [51.0]])
    got = metrics.prdc(real, fake, k=1)
    assert got == pytest.approx({"precision": 0.5, "recall": 0.75, "density": 1.0, "coverage": 0.75})


def test_prdc_balls_are_strict_and_density_divides_by_k():
    # k = 2, real radii (2nd-NN): 0 -> 2, 1 -> 1, 2 -> 2. Fake 4 lies exactly on the sphere of real 2 (distance 2, not
    # < 2) and outside the others: in no ball. Fakes 1 and 1.5 lie in all three balls: density = (0 + 3 + 3) / 3 / 2.
    real = torch.tensor([[0.0], [1.0], [2.0]])
    fake = torch.tensor([[4.0], [1.0], [1.5]])
    got = metrics.prdc(real, fake, k=2)
    assert got == pytest.approx({"precision": 2 / 3, "recall": 1.0, "density": 1.0, "coverage": 1.0})


def test_prdc_needs_more_points_than_k():
    with pytest.raises(ValueError, match="needs more than 5 points"):
        metrics.prdc(torch.randn(5, 2), torch.randn(10, 2), k=5)
