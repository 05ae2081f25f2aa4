"""The shapes-world report: its summary arithmetic, and one tiny end-to-end run over every row."""

import json

import pytest

from experiments.world import report
from training.config import DEMO_TEACHER


def test_summary_is_mean_and_sample_std_over_seeds():
    table = report.summarize({"row": {"fd": [1.0, 2.0, 3.0], "prompt_acc": [0.5]}})
    assert table["row"]["fd"] == pytest.approx((2.0, 1.0))
    assert table["row"]["prompt_acc"] == (0.5, 0.0)


@pytest.mark.skipif(not (DEMO_TEACHER / "model_index.json").is_file(), reason="the demo teacher is not shipped here")
def test_tiny_report_scores_every_row_and_writes_strips(tmp_path):
    docs = tmp_path / "docs"
    table = report.run_report(tmp_path / "work", seeds=[0], max_steps=1, n_eval=8, docs=docs,
                               train_images=16)
    arms = [f"{arm} {report.plural(k)}" for arm in report.ARMS for k in report.STUDENT_STEPS]
    nolora = [f"teacher, no LoRA, {report.plural(k)}" for k in report.STUDENT_STEPS]
    assert list(table) == ["real images (another draw: the floor)", "teacher 25 steps cfg 7.5", *nolora, *arms]
    assert table["real images (another draw: the floor)"]["prompt_acc"] == (1.0, 0.0)
    assert all(set(row) == set(report.METRICS) for row in table.values())
    assert len(list((docs / "world").glob("*.png"))) == 1 + 3 + 9
    raw = json.loads((docs / "world_results.json").read_text())
    assert raw["max_steps"] == 1 and raw["raw"]["lcm 2 steps"]["fd"][0] == pytest.approx(table["lcm 2 steps"]["fd"][0])
    assert "| scott 4 steps |" in (docs / "world_table.md").read_text()
