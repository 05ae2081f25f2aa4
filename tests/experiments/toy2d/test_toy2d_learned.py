"""The learned-teacher toy: its teachers have the error they should, its pieces match references, --quick runs."""

import json
import math

import pytest
import torch

from experiments.toy2d import experiment as toy2d
from experiments.toy2d import learned
from scott_core.consistency import consistency_function


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run shared by the tests that read its output."""
    threads = torch.get_num_threads()
    folder = tmp_path_factory.mktemp("quick")
    out = learned.main(["--quick", "--output", str(folder)])
    torch.set_num_threads(threads)
    return out, folder


def test_fast_sliced_w2_equals_toy2d_sliced_w2():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(999, 2, generator=g, dtype=torch.float64), torch.rand(999, 2, generator=g, dtype=torch.float64)
    assert learned.sliced_w2(a, b) == pytest.approx(toy2d.sliced_w2(a, b), rel=1e-12)


def test_hop_chain_is_the_training_grid_hops():
    assert learned.hop_times(120) == [999, 879, 759, 639, 519, 399, 279, 159, 39, 0]
    chain = learned.hop_times(24)
    assert chain[0] == 999 and chain[-1] == 0 and all(a - b == 24 for a, b in zip(chain[:-2], chain[1:-1]))


def test_arms_pass_noise_strength_only_to_the_solver_that_reads_it():
    kwargs = {a.name: a.solve_kwargs() for a in learned.ARMS}
    assert kwargs["ER-SDE 5"] == {"solver": "er_sde_5", "sub_steps": 3}
    assert kwargs["noise_strength 0.1"] == {"solver": "noise_strength", "sub_steps": 3, "noise_strength": 0.1}
    assert kwargs["ODE, span 120, h=1"] == {"solver": "ode", "sub_steps": 1}
    refs = {a.name: a.reference() for a in learned.ARMS}
    assert refs["ER-SDE 5, span 120, h=1"] == "ODE, span 120, h=1"
    assert refs["ER-SDE 5 + adv"] == "ODE + adv" and refs["ODE, span 120"] == "ODE"


def test_controlled_error_teacher_samples_the_perturbed_mixture():
    """Its 1000-step ODE samples sit at radius 1.1 with per-mode std 1.5 x 0.05, the error that was set (the final
    x0 = E[x0 | z_0] shrinks a mode's std s to alpha_0 s^2 / sqrt(alpha_0^2 s^2 + sigma_0^2))."""
    mixture = toy2d.DATASETS["ring8"]()
    eps_fn = learned.exact_eps_fn(learned.perturbed(mixture, 1.1, 1.5))
    x = learned.sample_teacher(eps_fn, 4000, 0, None, 1000, {"solver": "ode"})
    radius = x.norm(dim=1)
    assert radius.mean() == pytest.approx(1.1, abs=0.01)
    nearest = mixture.means[(x[:, None] - 1.1 * mixture.means[None]).norm(dim=-1).argmin(1)] * 1.1
    alpha0, sigma0 = (float(v) for v in learned.schedule.alpha_sigma(0, learned.AB))
    expected = alpha0 * 0.075**2 / math.sqrt(alpha0**2 * 0.075**2 + sigma0**2)
    assert (x - nearest).std(0).mean() == pytest.approx(expected, rel=0.05)
    assert learned.metrics(x, mixture, 0)["sw2"] > 0.05  # the error reaches the samples, far above the floor


def test_student_input_is_the_learned_teacher_x0_not_the_exact_posterior_mean():
    """An untrained student (zero residual) returns the boundary condition applied to the teacher's x0."""
    mixture = toy2d.DATASETS["ring8"]()
    biased = learned.exact_eps_fn(learned.perturbed(mixture, 1.3, 1.0))
    student = learned.LearnedStudent(biased, [0])
    z, t = torch.randn(1, 64, 2, generator=torch.Generator().manual_seed(1)), torch.full((1, 64), 999)
    alpha, sigma = (v.float() for v in learned.schedule.alpha_sigma(t[0], learned.AB))
    x0 = learned.perturbed(mixture, 1.3, 1.0).denoise(z[0], alpha, sigma).float()
    expected = consistency_function(z[0], x0, t[0])
    assert torch.allclose(student(z, t)[0], expected, atol=1e-4)
    assert sum(p.numel() for p in student.parameters()) == sum(
        p.numel() for p in toy2d.Student(mixture, [0]).parameters())


def test_learned_teacher_error_shrinks_with_training():
    mixture = toy2d.DATASETS["ring8"]()
    short, long = learned.train_teacher(mixture, 30), learned.train_teacher(mixture, 600)
    e_short, e_long = learned.eps_rmse(short, mixture), learned.eps_rmse(long, mixture)
    for band in ("100-399", "400-699", "700-999"):
        assert e_long[band] < 0.8 * e_short[band], (band, e_short, e_long)


def test_hinge_loss_matches_its_definition():
    real, fake = torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([[-2.0, 0.0, 0.5]])
    assert learned.hinge(real, fake).item() == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 1.5) / 3)


def test_paired_difference_and_its_standard_error():
    rows = [{"sw2": v} for v in (1.0, 2.0, 4.0)]
    ref = [{"sw2": v} for v in (0.5, 1.0, 1.5)]
    mean, se = learned.paired(rows, ref, "sw2")
    assert mean == pytest.approx(4 / 3) and se == pytest.approx(math.sqrt(((0.5 - 4 / 3) ** 2 + (1 - 4 / 3) ** 2 + (
        2.5 - 4 / 3) ** 2) / 2 / 3))
    assert learned.real([mean, se]) == "*" and learned.real([0.1, 0.1]) == ""


def test_quick_run_teachers_rank_by_training_and_results_have_their_structure(quick):
    out, folder = quick
    step0 = out["step0"]["ring8"]
    under, well, controlled = step0
    ode = "1000 steps | ODE"
    assert step0[well][ode]["sw2"][0] < step0[under][ode]["sw2"][0], (step0[well][ode], step0[under][ode])
    assert set(step0[well]) == {f"{h} | {s}" for h in ("span 24, h=3", "1000 steps") for s in ("ODE", "ER-SDE 5")}
    table = out["step1"]["ring8"][well]
    assert set(table) == {"ODE", "ER-SDE 5"} and set(table["ODE"]) == {"1", "2", "4"}
    assert table["ER-SDE 5"]["2"]["ref"] == "ODE" and len(table["ER-SDE 5"]["2"]["d_sw2"]) == 2
    saved = json.loads((folder / "toy2d_learned_quick.json").read_text())
    assert saved["step1"]["ring8"][well]["ODE"]["1"]["sw2"] == table["ODE"]["1"]["sw2"]
    assert (folder / "toy2d_learned_quick_tables.md").read_text().startswith("### ring8: teachers")
    assert (folder / "toy2d_learned_quick.png").stat().st_size > 10_000


def test_quick_run_students_learn_from_the_well_trained_teacher(quick):
    """Distillation moves the 1-step student from the teacher's one-shot x0 (a point near the origin) toward the
    data: its SW2 ends well below that of the mixture's centre mass."""
    out, _ = quick
    well = list(out["step1"]["ring8"])[1]
    centre = learned.metrics(torch.zeros(2000, 2, dtype=torch.float64), toy2d.DATASETS["ring8"](), 0)["sw2"]
    for arm, by_steps in out["step1"]["ring8"][well].items():
        assert by_steps["4"]["sw2"][0] < 0.6 * centre, (arm, by_steps["4"]["sw2"], centre)
