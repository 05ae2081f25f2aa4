"""The toy 2-D distillation experiment: its exact references are right, and distillation learns something."""

import json

import torch

from experiments.toy2d import experiment as toy2d
from experiments.toy2d.mixture import GaussianMixture


def test_exact_samples_match_the_mixture():
    mixture = GaussianMixture.ring(8, radius=1.0, std=0.05)
    x = mixture.sample(20_000, torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), mixture.mean(), atol=0.02)
    assert torch.allclose(torch.cov(x.T), mixture.covariance(), atol=0.02)
    assert toy2d.mode_coverage(x, mixture) == 1.0
    assert toy2d.metrics(x, mixture, seed=1)["sw2"] < 0.05


def test_teacher_ode_samples_match_the_mixture():
    mixture = toy2d.DATASETS["grid25"]()
    m = toy2d.metrics(toy2d.sample_teacher(mixture, 4096, seed=0), mixture, seed=0)
    assert m["coverage"] == 1.0 and m["sw2"] < 0.1


def test_sliced_w2_of_a_shift_is_its_rms_projection():
    x = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert toy2d.sliced_w2(x, x) == 0.0
    assert abs(toy2d.sliced_w2(x + torch.tensor([0.3, 0.0], dtype=torch.float64), x) - 0.3 / 2**0.5) < 0.02


def test_quick_run_trained_student_beats_untrained(tmp_path, capsys):
    results = toy2d.main(["--quick", "--output", str(tmp_path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ring = json.loads(last)["ring8"]
    assert set(ring["ODE (DDIM eta 0)"]) == {"1", "2", "4"}
    untrained = ring["untrained student (teacher x0)"]["2"]
    for arm in toy2d.QUICK_ARMS:
        assert ring[arm.name]["2"] < 0.6 * untrained, (arm.name, ring[arm.name]["2"], untrained)
    assert results[("ring8", "untrained student (teacher x0)", 2, 1.0)]
    assert (tmp_path / "toy2d_quick.md").read_text().startswith("| data |")
    assert (tmp_path / "toy2d_quick.png").stat().st_size > 10_000
