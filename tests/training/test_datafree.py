"""Data-free distillation end to end on the tiny model: teacher images cached, reused, sharded; bad prompt files."""

import re

import pytest

from training import loop
from training.data import synth
from training.data.synth_prompts import builtin_prompts
from training.distill import main

from .test_distributed import torchrun

SYNTH = dict(synth_images=3, synth_steps=2, synth_cfg=3.0)


def counting_generator(monkeypatch):
    """Count the prompts the teacher pipeline is asked to draw."""
    calls = []
    real = synth.pipeline_generator

    def spy(*args, **kwargs):
        generate = real(*args, **kwargs)

        def counted(prompts, seeds):
            calls.extend(prompts)
            return generate(prompts, seeds)

        return counted

    monkeypatch.setattr(synth, "pipeline_generator", spy)
    return calls


def datafree_argv(tiny_args, teacher, output, data=None, **overrides):
    argv = tiny_args(teacher, "unused", output, **{**SYNTH, **overrides})
    at = argv.index("--data")
    del argv[at : at + 2]
    return argv + (["--data", data] if data else [])


def captions(folder):
    return [p.read_text().strip() for p in sorted(folder.glob("*.txt"))]


def test_no_data_draws_teacher_images_then_trains_on_them(family_teacher, tmp_path, tiny_args, monkeypatch):
    calls = counting_generator(monkeypatch)
    trained_on = []
    real_build = loop.build
    monkeypatch.setattr(loop, "build", lambda cfg: trained_on.append(real_build(cfg)) or trained_on[-1])
    out = tmp_path / "out"
    assert main(datafree_argv(tiny_args, family_teacher, out)) == 0
    folder = out / "synth"
    assert captions(folder) == builtin_prompts()[:3] and len(calls) == 3
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert not list(folder.glob("*.tmp"))
    assert {pair.source for pair in trained_on[0].dataset.pairs} == {str(p) for p in folder.glob("*.png")}
    assert (out / f"{family_teacher.name}_scott_lora.safetensors").is_file()


def test_rerun_and_resume_draw_nothing_new(tiny_teacher, tmp_path, tiny_args, monkeypatch):
    out = tmp_path / "out"
    assert main(datafree_argv(tiny_args, tiny_teacher, out, mode="lcm")) == 0
    before = {p: p.stat().st_mtime_ns for p in (out / "synth").iterdir()}
    calls = counting_generator(monkeypatch)
    assert main(datafree_argv(tiny_args, tiny_teacher, out, mode="lcm", max_steps=3, resume="latest")) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in (out / "synth").iterdir()} == before


def test_prompt_file_prompts_are_cycled(tiny_teacher, tmp_path, tiny_args):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\na green pear\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(datafree_argv(tiny_args, tiny_teacher, out, data=f"prompts:{prompts}", mode="lcm")) == 0
    assert captions(out / "synth") == ["a red apple", "a green pear", "a red apple"]


@pytest.mark.parametrize(
    "content, message",
    [(b"", "has no prompts"), (b"\xff\xfe\x00bad", "cannot be read as UTF-8"), (None, "does not exist")],
)
def test_bad_prompt_file_fails_before_any_model_loads(tiny_teacher, tmp_path, tiny_args, monkeypatch, capsys,
                                                      content, message):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)

    def no_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the prompt file was checked")

    monkeypatch.setattr(loop, "load_teacher", no_load)
    assert main(datafree_argv(tiny_args, tiny_teacher, tmp_path / "out", data=f"prompts:{path}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(path) in err[0]


def test_two_processes_draw_disjoint_shards_that_cover_the_run(tiny_teacher, tmp_path, tiny_args):
    out = tmp_path / "out"
    argv = datafree_argv(tiny_args, tiny_teacher, out, mode="lcm", synth_images=5)
    result = torchrun("-m", "training.distill", *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = {int(r): int(n) for r, n in re.findall(r"rank (\d) drew (\d+) new teacher images", result.stderr)}
    assert drawn == {0: 3, 1: 2}
    assert captions(out / "synth") == builtin_prompts()[:5]
