"""The curves at equal training FLOPs: each arm's checkpoint steps from its per-kind step FLOPs (by hand), one run
per (arm, seed) saving every checkpoint, every point and the per-budget pairing in the JSON, the defaults rule, the
plot; resumable, and importable back into the score cache. Training, sampling, scoring and FLOP counting are fakes
here; the FLOP counter itself runs on the tiny teacher."""

import json

import pytest

from experiments.world import compute, curves, evaluate, report
from training.cli import parse_config
from training.config import DistillConfig

from ...training.conftest import tiny_teacher  # noqa: F401 - the fixture: the trainer tests' tiny pipeline
from .test_report import fake_grid  # noqa: F401 - the fixture


def config(**flags):
    return parse_config(["--teacher", "t", "--data", "d", *[str(a) for kv in flags.items() for a in kv]])


def test_spent_flops_and_budget_steps_by_hand():
    cfg = config(**{"--adv-decay-steps": 4, "--disc-every": 2})
    assert compute.kinds(cfg, 6) == ["cd+gen", "cd+gen+disc", "cd+gen", "cd+gen+disc", "cd", "cd"]
    spent = compute.cumulative(cfg, 6, {"cd+gen": 3, "cd+gen+disc": 5, "cd": 1})
    assert spent == [0, 3, 8, 11, 16, 17, 18]
    assert compute.steps_at(spent, [8, 9.5, 17.4, 1]) == [2, 2, 5, 1]  # nearest; the earlier on a tie; at least 1
    steps, at = compute.budget_steps(cfg, [2, 4], 4, {"cd+gen": 3, "cd+gen+disc": 5, "cd": 1})
    assert (steps, at) == ([2, 4], [8, 16])  # budgets of 2 and 4 LCM steps of 4 FLOPs: 8 and 16 FLOPs
    with pytest.raises(ValueError, match="cheaper than a tenth of an LCM step"):
        compute.budget_steps(config(**{"--mode": "lcm"}), [3], 100, {"cd": 1})


def test_kind_flops_counts_each_kind_of_step_on_the_teacher(tiny_teacher):  # noqa: F811 - the fixture
    tiny = dict(teacher=str(tiny_teacher), data="world:8", resolution=16, batch_size=2, lora_rank=4, disc_lora_rank=4)
    flops = compute.kind_flops(DistillConfig(**tiny, adv_decay_steps=3, disc_every=2).resolved(), 5)
    assert set(flops) == {"cd+gen", "cd+gen+disc", "cd"}  # steps 1 and 3, 2, 4 and 5 (counted from 1)
    assert 0 < flops["cd"] < flops["cd+gen"] < flops["cd+gen+disc"]


FAKE_FLOPS = {"lcm": {"cd": 10}, "scott": {"cd+gen+disc": 25}}


def by_path(folder, real, model=None):
    """Metrics that depend on the set's folder and its budget folder, so each checkpoint gets its own numbers."""
    value = sum(map(ord, f"{folder.parent.name}/{folder.name}")) % 89
    return {m: float(value + i) for i, m in enumerate(report.METRICS)}


@pytest.fixture
def fake_curves(fake_grid, monkeypatch):  # noqa: F811 - the fixture imported above
    """fake_grid, with FLOPs per step by arm (lcm 10, scott 25) and a scorer that tells checkpoints apart."""
    argvs = []
    real_argv = report.distill_argv
    monkeypatch.setattr(compute, "kind_flops", lambda cfg, steps: FAKE_FLOPS[cfg.name])
    monkeypatch.setattr(report, "distill_argv", lambda *args: argvs.append(real_argv(*args)) or argvs[-1])
    monkeypatch.setattr(evaluate, "evaluate_folder", lambda folder, real, model=None: by_path(folder, real))
    return argvs


def test_curves_train_once_per_arm_and_seed_and_pair_at_equal_flops(tmp_path, fake_curves, fake_grid):  # noqa: F811
    out = curves.run_curves(tmp_path / "out", tmp_path / "docs", ["lcm", "scott", "teacher"], seeds=[0, 1],
                            budgets=[2, 6], n_eval=6, train_images=9)
    # scott's step costs 2.5 LCM steps: budget 2 (20 FLOPs) is nearest step 1 (25), budget 6 (60) step 2 (50)
    assert out["checkpoints"]["scott"] == {"steps": [1, 2], "flops": [25, 50], "step_flops": {"cd+gen+disc": 25}}
    assert out["checkpoints"]["lcm"]["steps"] == [2, 6] and out["lcm_step_flops"] == 10
    runs = [a for a in fake_curves if "loras" in a[a.index("--output") + 1]]  # not the configs the FLOPs are of
    assert fake_grid["distill"] == 4 and len(runs) == 4
    scott_argv = next(a for a in runs if "scott" in a)
    assert scott_argv[scott_argv.index("--save-steps") + 1] == "1,2" and "--max-steps" in scott_argv
    assert len(list((tmp_path / "out" / "scores").rglob("*.json"))) == 2 * (2 * 3 + 2 * 3 + 1)
    block = out["at_budget"]["6"]
    assert block["steps"] == {"lcm": 6, "scott": 2} and block["flops"] == {"lcm": 60, "scott": 50}
    grid = report.Grid(tmp_path / "out", tmp_path / "docs", "shapes", 9, 6)
    scott = json.loads(grid.score_file("scott", 1, 2, 2).read_text())["fd"]
    lcm = json.loads(grid.score_file("lcm", 1, 2, 6).read_text())["fd"]
    assert block["raw"]["scott"]["2"]["fd"]["1"] == scott and block["raw"]["lcm"]["2"]["fd"]["1"] == lcm
    assert block["paired_to_lcm"]["scott"]["2"]["fd"]["diffs"][1] == scott - lcm
    assert out["at_budget"]["2"]["raw"]["scott"]["2"]["fd"]["1"] != scott  # the other checkpoint
    points = out["points"]["scott"]["1"]
    assert [(p["budget"], p["step"], p["flops"]) for p in points] == [(2, 1, 25), (6, 2, 50)]
    assert points[1]["metrics"]["2"]["fd"] == scott and set(points[1]["metrics"]) == {"1", "2", "4"}
    written = json.loads((tmp_path / "docs" / "world_curves.json").read_text())
    assert written == json.loads(json.dumps(out))
    assert (tmp_path / "docs" / "world_curves.png").stat().st_size > 1000
    table = (tmp_path / "docs" / "world_curves.md").read_text()
    assert "| scott | 1 (0.00) | 2 (0.00) |" in table and "**fd at 2 steps**" in table


def test_a_curves_rerun_trains_and_scores_nothing_and_the_json_imports_back(tmp_path, fake_curves, monkeypatch):
    args = (tmp_path / "out", tmp_path / "docs", ["lcm", "scott", "real"])
    first = curves.run_curves(*args, seeds=[0], budgets=[2, 6], n_eval=6, train_images=9)

    def fail(*a, **k):
        raise AssertionError("a rerun must not train or score")

    monkeypatch.setattr(report, "distill", fail)
    monkeypatch.setattr(evaluate, "evaluate_folder", fail)
    assert curves.run_curves(*args, seeds=[0], budgets=[2, 6], n_eval=6, train_images=9) == json.loads(
        json.dumps(first))
    assert report.import_results(tmp_path / "docs" / "world_curves.json", tmp_path / "again") == 2 * 2 * 3 + 1
    again = report.Grid(tmp_path / "again", tmp_path / "d2", "shapes", 9, 6)
    assert again.raw(["lcm", "scott", "real"], [0], {"lcm": 6, "scott": 2}) == first["at_budget"]["6"]["raw"]


def diff(mean, se, n=5):
    return {"mean": mean, "se": se, "n": n, "seeds": list(range(n)), "diffs": []}


def test_the_rule_needs_a_real_win_and_no_real_loss():
    at_budget = {
        "100": {"paired_to_lcm": {
            "good": {"1": {"fd": diff(-10.0, 2.0), "exact_match": diff(-0.01, 0.01)}},
            "mixed": {"1": {"fd": diff(-10.0, 2.0)}, "2": {"exact_match": diff(-0.05, 0.01)}},
            "noisy": {"1": {"fd": diff(-10.0, 6.0)}}}},
        "300": {"paired_to_lcm": {
            "good": {"4": {"fd": diff(+1.0, 1.0), "recall": diff(-0.1, 0.01)}},
            "mixed": {"1": {"fd": diff(+0.5, 1.0)}},
            "noisy": {"2": {"fd": diff(+3.0, 1.0)}}}},
    }
    verdict = curves.rule(at_budget)
    assert verdict["good"] == {"better": ["budget 100, 1 step: fd -10.000 +- 2.000 (5 seeds)"], "worse": [],
                               "passes": True}  # recall is not in the rule; +1.0 +- 1.0 is not real
    assert not verdict["mixed"]["passes"] and verdict["mixed"]["worse"] == [
        "budget 100, 2 step: exact_match -0.050 +- 0.010 (5 seeds)"]
    assert verdict["noisy"] == {"better": [], "worse": ["budget 300, 2 step: fd +3.000 +- 1.000 (5 seeds)"],
                                "passes": False}


def test_which_names_the_lowest_fd_and_the_runner_up_paired_to_it():
    raw = {"lcm": {"1": {"fd": {"0": 10.0, "1": 12.0, "2": 11.0}}},
           "scott": {"1": {"fd": {"0": 14.0, "1": 15.0, "2": 14.5}}},
           "lite": {"1": {"fd": {"0": 9.0, "1": 13.0, "2": 9.5}}},
           "teacher": {"25": {"fd": {"0": 1.0}}}}
    rows, _ = report.summarize(raw)
    # lite's mean 10.5 < lcm's 11.0; lcm - lite = +1, -1, +1.5: mean 0.5, SE of (1, -1, 1.5)
    assert curves.which({"rows": rows, "raw": raw}, "1").startswith("lite; lcm +0.500 +- 0.764 (3)")
    assert curves.which({"rows": rows, "raw": raw}, "2") == "-"
