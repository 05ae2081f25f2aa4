"""Data-free distillation: the prompt list, prompt files, the image plan, sharding, the resumable cache and the
teacher's sampler."""

import dataclasses
import json

import pytest
from PIL import Image

from training.data import synth
from training.data.synth_prompts import builtin_prompts, read_prompt_file
from training.models.family import SD15
from training.models.teacher import load_teacher


def test_builtin_prompts_are_many_distinct_and_stable():
    prompts = builtin_prompts()
    assert len(prompts) >= 2000 and len(set(prompts)) == len(prompts)
    assert builtin_prompts() == prompts


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_neither_overlap_nor_gap(world_size):
    items = synth.plan(["a", "b", "c"], n_images=10, seed=5)
    shards = [synth.shard(items, rank, world_size) for rank in range(world_size)]
    indices = sorted(item.index for part in shards for item in part)
    assert indices == list(range(10))
    assert len({item.seed for item in items}) == 10


@pytest.mark.parametrize(
    "content, message",
    [(b"", "has no prompts"), (b"\n  \n", "has no prompts"), (b"\xff\xfe\x00bad", "cannot be read as UTF-8")],
)
def test_bad_prompt_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_prompt_file(path)


def test_missing_prompt_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_prompt_file(tmp_path / "nope.txt")


class CountingGenerator:
    """Stands in for the teacher pipeline's call: counts images asked for; fails after `fail_after` batches."""

    def __init__(self, fail_after=None):
        self.calls, self.images, self.fail_after = 0, 0, fail_after

    def __call__(self, prompts, seeds):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.images += len(prompts)
        return [Image.new("RGB", (8, 8), (seed % 256, 0, 0)) for seed in seeds]


def test_killed_run_keeps_finished_images_and_the_rerun_fills_only_the_gap(tmp_path):
    items = synth.plan(["a cat", "a dog"], n_images=7)
    killed = CountingGenerator(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        synth.synthesize(killed, items, tmp_path, batch_size=2, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"00000{i}.{ext}" for i in range(4) for ext in ("png", "txt")]
    rerun = CountingGenerator()
    assert synth.synthesize(rerun, items, tmp_path, batch_size=2, show_progress=False) == 3
    assert rerun.images == 3
    again = CountingGenerator()
    assert synth.synthesize(again, items, tmp_path, batch_size=2, show_progress=False) == 0
    assert again.calls == 0
    assert (tmp_path / "000005.txt").read_text() == "a dog\n"
    assert Image.open(tmp_path / "000006.png").getpixel((0, 0)) == (6, 0, 0)


def test_teacher_pipeline_samples_on_the_teachers_own_schedule(tiny_teacher, tmp_path):
    teacher = load_teacher(tiny_teacher)
    assert teacher.scheduler_config == tiny_teacher / "scheduler"
    shipped = json.loads((SD15.assets / "scheduler" / "scheduler_config.json").read_text())
    # 25 DPM-Solver++ steps over 1000: 'leading' starts at 1000 // 26 * 25 + steps_offset 1, 'linspace' at 999.
    for spacing, first in (("leading", 951), ("linspace", 999)):
        folder = tmp_path / spacing
        folder.mkdir()
        (folder / "scheduler_config.json").write_text(json.dumps({**shipped, "timestep_spacing": spacing}))
        pipe = synth.teacher_pipeline(dataclasses.replace(teacher, scheduler_config=folder))
        pipe.scheduler.set_timesteps(25)
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and pipe.scheduler.config.solver_order == 2
        assert pipe.scheduler.timesteps[0].item() == first
