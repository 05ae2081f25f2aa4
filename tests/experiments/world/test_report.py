"""The shapes-world grid: arm and world selection, paired differences with hand-computed standard errors, the
results JSON, resumability (a rerun neither trains nor scores), the old format's import, and one tiny real run."""

import json
import math

import pytest
import torch

from experiments.world import evaluate, report
from training.cli import parse_config
from training.config import DEMO_TEACHER
from training.data import scenes


def test_paired_difference_and_its_standard_error_by_hand():
    diff = report.paired({"0": 10.0, "1": 12.0, "2": 15.0, "3": 99.0}, {"0": 11.0, "1": 11.0, "2": 11.0})
    # differences -1, 1, 4 (seed 3 has no partner): mean 4/3, sample variance ((7/3)^2 + (1/3)^2 + (8/3)^2) / 2 = 19/3
    assert diff["seeds"] == [0, 1, 2] and diff["diffs"] == [-1.0, 1.0, 4.0] and diff["n"] == 3
    assert diff["mean"] == pytest.approx(4 / 3) and diff["se"] == pytest.approx(math.sqrt(19 / 3) / math.sqrt(3))
    assert not report.is_real(diff)  # 1.33 < 2 x 1.45
    tight = report.paired({"0": 2.0, "1": 2.2, "2": 1.8}, {"0": 1.0, "1": 1.0, "2": 1.0})
    assert tight["se"] == pytest.approx(0.2 / math.sqrt(3)) and report.is_real(tight)
    one = report.paired({"0": 2.0}, {"0": 1.0})
    assert one["se"] is None and not report.is_real(one) and report.paired({"1": 2.0}, {"0": 1.0}) is None


def test_summary_rows_are_mean_and_sample_std_and_diffs_pair_with_lcm_and_scott():
    raw = {"lcm": {"1": {"fd": {"0": 1.0, "1": 2.0, "2": 3.0}}}, "scott": {"1": {"fd": {"0": 0.0, "1": 2.0}}},
           "teacher": {"25": {"fd": {"0": 5.0}}}, "ode_adv": {"1": {"fd": {"0": 4.0, "1": 1.0, "2": 2.0}}}}
    rows, diffs = report.summarize(raw)
    assert rows["lcm"]["1"]["fd"] == pytest.approx([2.0, 1.0]) and rows["teacher"]["25"]["fd"] == [5.0, 0.0]
    assert list(diffs["lcm"]) == ["scott", "ode_adv"] and diffs["lcm"]["scott"]["1"]["fd"]["diffs"] == [-1.0, 0.0]
    assert list(diffs["scott"]) == ["ode_adv"] and diffs["scott"]["ode_adv"]["1"]["fd"]["diffs"] == [4.0, -1.0]
    table = report.markdown(rows, diffs, raw)
    assert "| scott 1 step | 2 | 1.000 +- 1.414 |" in table and "| scott 1 step | -0.500 +- 0.500 (2) |" in table
    assert "Paired difference to scott" in table and "| ode_adv 1 step | +1.500 +- 2.500 (2) |" in table


def test_arm_and_world_selection():
    assert report.distill_argv("diverse", "ode_h3", 3, "f", [300, 100], 4000) == [
        "--teacher", "demo", "--output", "f", "--name", "ode_h3", "--seed", "3", "--data", "diverse:4000",
        "--max-steps", "300", "--save-steps", "100,300", "--validate-every", "0", "--checkpoint-every", "200",
        "--keep-checkpoints", "1", "--resume", "latest", "--mode", "scott", "--solver", "ode", "--adv-weight", "0"]
    assert "world:4000" in report.distill_argv("shapes", "lcm", 0, "f", [300], 4000)
    configs = {arm: vars(parse_config(["--teacher", "demo", *argv])) for arm, argv in report.ARMS.items()}
    changed = {arm: {k for k, v in cfg.items() if v != configs["scott"][k]} for arm, cfg in configs.items()}
    assert changed == {  # against --mode scott's defaults; the no-adversary arms drop adv_weight too
        "lcm": {"mode", "name", "solver", "sub_steps", "span", "grid_spacing", "adv_weight"}, "scott": set(),
        "scott_no_adv": {"adv_weight"}, "ode_h3": {"solver", "adv_weight"},
        "ns01": {"solver", "noise_strength", "adv_weight"}, "ns03": {"solver", "noise_strength", "adv_weight"},
        "grid20": {"grid_spacing"}, "adv_lr": {"disc_lr"}, "ode_adv": {"solver"}, "adv_frozen": {"disc_lr"},
        "below500": {"solver", "noise_below", "adv_weight"}, "h1": {"sub_steps"}, "down_mid": {"disc_features"},
        "lcm_adv": {"mode", "name", "solver", "sub_steps", "span", "grid_spacing"},
        "scott_lite": {"solver", "sub_steps", "adv_decay_steps"}}
    with pytest.raises(ValueError, match="unknown arm.*bogus: choose from lcm, scott"):
        report.run_grid("o", "d", ["lcm", "bogus"])
    with pytest.raises(ValueError, match="world must be one of shapes, diverse"):
        report.run_grid("o", "d", ["lcm"], world="vague")
    with pytest.raises(SystemExit):
        report.main(["--arms", "lcm", "--world", "vague"])


def fake_metrics(folder, real, model=None):
    """Metrics that depend on the folder's name, so each set gets its own numbers."""
    value = sum(map(ord, str(folder.name))) % 97
    return {m: float(value + i) for i, m in enumerate(report.METRICS)}


@pytest.fixture
def fake_grid(monkeypatch):
    """The grid with training, sampling and scoring replaced by fakes that count their calls."""
    calls = {"distill": 0, "score": 0}

    def distill(loras, argv):  # as report.distill: trains only when a LoRA is not there, and saves all of them
        if not all(lora.is_file() for lora in loras):
            calls["distill"] += 1
            for lora in loras:
                lora.parent.mkdir(parents=True, exist_ok=True)
                lora.write_bytes(b"lora")
        return loras

    def scorer(folder, real, model=None):
        calls["score"] += 1
        return fake_metrics(folder, real)

    def images(*args, **kwargs):
        return torch.zeros(len(args[1]), scenes.SIZE, scenes.SIZE, 3, dtype=torch.uint8)

    monkeypatch.setattr(report, "distill", distill)
    monkeypatch.setattr(report, "load_student", lambda lora=None, teacher="demo": None)
    monkeypatch.setattr(report, "student_images", images)
    monkeypatch.setattr(report, "teacher_images", images)
    monkeypatch.setattr(evaluate, "evaluate_folder", scorer)
    monkeypatch.setattr("experiments.world.classifier.load_classifier", lambda *a: "model")
    return calls


def test_a_rerun_trains_and_scores_nothing_and_writes_the_same_json(tmp_path, fake_grid, monkeypatch):
    arms = ["lcm", "scott", "ode_h3", "real", "teacher"]
    first = report.run_grid(tmp_path / "out", tmp_path / "docs", arms, "diverse", [0, 1], max_steps=5, n_eval=6,
                            train_images=9)
    assert fake_grid == {"distill": 6, "score": 2 * (3 * 3 + 1 + 1)}
    assert (tmp_path / "docs" / "world" / "diverse_ode_h3_2step.png").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("a rerun must not train or score")

    monkeypatch.setattr(report, "distill", fail)
    monkeypatch.setattr(report, "student_images", fail)
    monkeypatch.setattr(evaluate, "evaluate_folder", fail)
    again = report.run_grid(tmp_path / "out", tmp_path / "docs", arms, "diverse", [0, 1], max_steps=5, n_eval=6,
                            train_images=9)
    assert again == json.loads(json.dumps(first))
    written = json.loads((tmp_path / "docs" / "world_diverse_results.json").read_text())
    assert written == again and written["world"] == "diverse" and written["missing"] == []
    assert set(written["rows"]) == set(arms) and set(written["rows"]["lcm"]) == {"1", "2", "4"}
    assert set(written["rows"]["teacher"]) == {"25"} and set(written["rows"]["real"]) == {"0"}
    for per in written["rows"].values():
        for metrics in per.values():
            assert set(metrics) == set(report.METRICS) and all(len(v) == 2 for v in metrics.values())
    raw = written["raw"]["scott"]["1"]["fd"]
    assert set(raw) == {"0", "1"} and written["rows"]["scott"]["1"]["fd"][0] == pytest.approx(sum(raw.values()) / 2)
    diff = written["paired_to_lcm"]["scott"]["1"]["fd"]
    assert diff["diffs"] == [raw[s] - written["raw"]["lcm"]["1"]["fd"][s] for s in ("0", "1")]
    assert set(written["paired_to_lcm"]) == {"scott", "ode_h3"} and set(written["paired_to_scott"]) == {"ode_h3"}


def test_another_teacher_gets_its_own_loras_scores_and_results(tmp_path, fake_grid, monkeypatch):
    teacher = str(tmp_path / "teachers" / "diverse_teacher")
    argv = report.distill_argv("diverse", "scott", 0, "f", [5], 9, teacher)
    assert argv[:2] == ["--teacher", teacher]
    demo = vars(parse_config(report.distill_argv("diverse", "scott", 0, "f", [5], 9)))
    other = vars(parse_config(argv))  # the same sizes as --teacher demo's defaults: every world's LoRAs train alike
    assert {k for k in demo if demo[k] != other[k]} == {"teacher", "validation_prompts"}
    argvs = []
    monkeypatch.setattr(report, "distill_argv", lambda *args: argvs.append(args) or [])
    out = report.run_grid(tmp_path / "out", tmp_path / "docs", ["lcm", "teacher"], "diverse", [0], max_steps=5,
                          n_eval=6, train_images=9, teacher=teacher)
    assert argvs[0][-1] == teacher and out["teacher"] == teacher
    assert report.lora_path(tmp_path / "out", "diverse", "lcm", 0, 5, 9, teacher).is_file()
    assert not report.lora_path(tmp_path / "out", "diverse", "lcm", 0, 5, 9).is_file()  # the demo teacher's own
    assert (tmp_path / "docs" / "world_diverse_diverse_teacher_results.json").is_file()
    assert (tmp_path / "docs" / "world" / "diverse_diverse_teacher_lcm_1step.png").is_file()
    assert report.import_results(tmp_path / "docs" / "world_diverse_diverse_teacher_results.json",
                                 tmp_path / "again") == 4
    assert report.score_path(tmp_path / "again", "diverse", "teacher", 0, 25, 0, 9, 6, teacher).is_file()  # refs: 0


def test_no_train_scores_only_existing_loras_and_lists_the_rest(tmp_path, fake_grid):
    lora = report.lora_path(tmp_path, "shapes", "lcm", 1, 5, 9)
    lora.parent.mkdir(parents=True)
    lora.write_bytes(b"lora")
    out = report.run_grid(tmp_path, tmp_path / "docs", ["lcm", "scott"], seeds=[1], max_steps=5, n_eval=6,
                          train_images=9, train=False)
    assert fake_grid["distill"] == 0 and out["missing"] == ["scott_seed1"] and list(out["rows"]) == ["lcm"]
    assert (tmp_path / "docs" / "world_results.json").is_file() and fake_grid["score"] == 3
    summary = report.run_grid(tmp_path, tmp_path / "docs", ["teacher", "lcm"], seeds=[1, 2], max_steps=5, n_eval=6,
                              train_images=9, train=False, score=False)
    assert fake_grid == {"distill": 0, "score": 3} and summary["rows"] == {"lcm": out["rows"]["lcm"]}
    assert summary["missing"] == ["teacher_seed1", "teacher_seed2", "lcm_seed2"]


def test_old_results_import_into_the_cache(tmp_path, fake_grid):
    old = {"seeds": [0, 1], "max_steps": 5, "n_eval": 6, "raw": {
        "lcm 1 step": {m: [1.0, 2.0] for m in report.METRICS},
        "teacher 25 steps cfg 7.5": {m: [3.0, 4.0] for m in report.METRICS},
        "real images (another draw: the floor)": {m: [0.5, 0.6] for m in report.METRICS}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert report.import_results(tmp_path / "old.json", tmp_path / "out", train_images=9) == 6
    grid = report.Grid(tmp_path / "out", tmp_path / "docs", "shapes", 9, 6)
    raw = grid.raw(["lcm", "teacher", "real"], [0, 1], 5)
    assert raw["lcm"]["1"]["fd"] == {"0": 1.0, "1": 2.0} and raw["teacher"]["25"]["coverage"] == {"0": 3.0, "1": 4.0}
    assert raw["real"]["0"]["fd"] == {"0": 0.5, "1": 0.6}
    new = report.run_grid(tmp_path / "out", tmp_path / "docs", ["lcm", "teacher", "real"], seeds=[0, 1], max_steps=5,
                          n_eval=6, train_images=9, train=False, score=False)
    assert report.import_results(tmp_path / "docs" / "world_results.json", tmp_path / "again") == 6  # the new format
    assert report.Grid(tmp_path / "again", tmp_path / "d2", "shapes", 9, 6).raw(["lcm", "teacher", "real"],
                                                                              [0, 1], 5) == new["raw"]


@pytest.mark.skipif(not (DEMO_TEACHER / "model_index.json").is_file(), reason="the demo teacher is not shipped here")
def test_tiny_real_grid_trains_samples_and_scores(tmp_path):
    docs = tmp_path / "docs"
    out = report.run_grid(tmp_path / "work", docs, ["lcm", "scott_no_adv", "teacher", "nolora"], "shapes", [0],
                          max_steps=1, n_eval=8, train_images=16)
    assert list(out["rows"]) == ["lcm", "scott_no_adv", "teacher", "nolora"]
    assert all(set(m) == set(report.METRICS) for per in out["rows"].values() for m in per.values())
    assert all(math.isfinite(v[0]) for per in out["rows"].values() for m in per.values() for v in m.values())
    assert len(list((docs / "world").glob("*.png"))) == 1 + 3 + 6
    assert "| scott_no_adv 4 steps | 1 |" in (docs / "world_results.md").read_text()
    assert report.lora_path(tmp_path / "work", "shapes", "lcm", 0, 1, 16).is_file()
