"""Faults a long run meets: a full disk during a checkpoint save (injected as safetensors raises it) or the export, and
a real write failure (a file-size limit in a subprocess) during a save: one line, the previous checkpoint kept, the run
resumable to the uninterrupted run's LoRA; a real kill (SIGKILL of a subprocess) during the latent cache and during a
save, then --resume: the uninterrupted run's LoRA; a damaged <output>/config.toml on resume: one line naming it and
the fix."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from training import checkpoint, loop
from training.distill import main
from training.loop import train

REPO = Path(__file__).resolve().parents[2]
RUN = dict(mode="lcm", max_steps=4, checkpoint_every=2)  # the cache on (the default), checkpoints at steps 2 and 4
LORA = "tiny-sd-v1_lcm_lora.safetensors"
FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' text for ENOSPC


@pytest.fixture(scope="module")
def reference(tiny_teacher, tmp_path_factory):
    """The uninterrupted run's exported LoRA (on the images of the tiny_data fixture)."""
    from tests.training.conftest import make_tiny_config, write_images

    folder = tmp_path_factory.mktemp("reference")
    data = write_images(folder / "data", 8)
    return load_file(str(train(make_tiny_config(tiny_teacher, data, folder / "out", **RUN))))


def assert_same(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k or "lora_up" in k)  # training moved it


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def not_written(ckpts, why):
    """The one line of a checkpoint save at step 4 that failed (its free-space figure as a pattern)."""
    head = re.escape(f"error: checkpoint {ckpts / 'step_0000004'} not written: {why}; ")
    tail = re.escape(
        f"the last finished checkpoint is kept ({ckpts / 'step_0000002'}): free space (or fix the disk) and rerun "
        "with --resume latest"
    )
    return head + r"\d+ MiB free on its disk; " + tail


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_the_run_resumes(
    tiny_teacher, tiny_data, tmp_path, tiny_args, monkeypatch, capsys, reference
):
    out, real_save = tmp_path / "out", safetensors.torch.save_file
    ckpts = out / "checkpoints"

    def disk_fills_at_step_4(tensors, path, *args, **kwargs):
        if "step_0000004.tmp" in str(path):
            Path(path).write_bytes(b"\0" * 100)  # part of the file was written when the disk filled
            raise SafetensorError(FULL)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_at_step_4)  # the LoRA weights' write
    assert main(tiny_args(tiny_teacher, tiny_data, out, **RUN)) == 2
    (line,) = error_lines(capsys)
    assert re.fullmatch(not_written(ckpts, FULL), line), line
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]  # no half-written folder left
    monkeypatch.undo()
    assert main(tiny_args(tiny_teacher, tiny_data, out, resume="latest", **RUN)) == 0
    assert_same(load_file(str(out / LORA)), reference)


def test_a_real_write_failure_during_a_checkpoint_save_is_one_line_and_the_run_resumes(
    tiny_teacher, tiny_data, tmp_path, tiny_args, reference
):
    out = tmp_path / "out"
    argv = tiny_args(tiny_teacher, tiny_data, out, resume="latest", **RUN)
    result = faulted("fsize", "training.checkpoint:save", 2, argv)  # every write of the step 4 save fails (EFBIG)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    why = "Error while serializing: I/O error: File too large (os error 27)"  # the weights, written first
    assert result.returncode == 2 and len(lines) == 1 and re.fullmatch(not_written(out / "checkpoints", why), lines[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert main(argv) == 0
    assert_same(load_file(str(out / LORA)), reference)


def test_a_full_disk_during_the_export_is_one_line(tiny_teacher, tiny_data, tmp_path, tiny_args, monkeypatch, capsys):
    out = tmp_path / "out"

    def full(unet, cfg, family, name, sha, path, step=None, extra=None):
        raise SafetensorError(FULL)

    monkeypatch.setattr(loop, "export_lora", full)
    assert main(tiny_args(tiny_teacher, tiny_data, out, mode="lcm", max_steps=1)) == 2
    assert error_lines(capsys) == [
        f"error: the disk is full ({FULL}): free space and rerun with --resume latest (finished checkpoints and cache "
        "entries are kept)"
    ]
    assert checkpoint.checkpoints(out / "checkpoints")[-1].name == "step_0000001"  # saved before the export


def faulted(fault, target, count, argv):
    """Run the CLI in a subprocess with a real fault at the count-th call of target ('module:function')."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    worker = Path(__file__).parent / "fault_worker.py"
    return subprocess.run(
        [sys.executable, str(worker), fault, target, str(count), *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def killed(target, count, argv):
    """Run the CLI in a subprocess that SIGKILLs itself on the count-th call of target ('module:function')."""
    result = faulted("kill", target, count, argv)
    assert result.returncode == -9, result.stderr[-3000:]


def test_a_kill_during_the_latent_cache_then_resume_gives_the_uninterrupted_lora(
    tiny_teacher, tiny_data, tmp_path, tiny_args, reference
):
    out = tmp_path / "out"
    argv = tiny_args(tiny_teacher, tiny_data, out, resume="latest", **RUN)
    killed("training.data.cache:save_entry", 4, argv)  # 3 of the 8 image entries written, none of the captions
    assert len(list((out / "cache").rglob("*.safetensors"))) == 3 and not (out / "checkpoints").exists()
    assert main(argv) == 0
    assert_same(load_file(str(out / LORA)), reference)


def test_a_kill_during_a_checkpoint_save_then_resume_gives_the_uninterrupted_lora(
    tiny_teacher, tiny_data, tmp_path, tiny_args, reference
):
    out = tmp_path / "out"
    argv = tiny_args(tiny_teacher, tiny_data, out, resume="latest", **RUN)
    killed("training.checkpoint:trainable_state", 2, argv)  # inside the save of step 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004.tmp"]
    assert checkpoint.resolve("latest", out / "checkpoints").name == "step_0000002"
    assert main(argv) == 0
    assert_same(load_file(str(out / LORA)), reference)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_a_damaged_run_file_on_resume_is_one_line_naming_it_and_the_fix(
    tiny_teacher, tiny_data, tmp_path, tiny_args, capsys
):
    out = tmp_path / "out"
    argv = tiny_args(tiny_teacher, tiny_data, out, mode="lcm", max_steps=2, checkpoint_every=2)
    assert main(argv) == 0
    run_file, copy = out / "config.toml", out / "checkpoints" / "step_0000002" / "config.toml"
    assert copy.read_text() == run_file.read_text()
    run_file.write_text(run_file.read_text()[:200] + '"\n')  # cut mid-line: an unterminated string
    capsys.readouterr()
    assert main([*argv, "--resume", "latest"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"error: --resume: the run file {run_file} is damaged (")
    assert lines[0].endswith(f"): copy {copy} over it (the run file that checkpoint was written with)")
    assert main(["--config", str(run_file), "--resume", "latest"]) == 2  # read as --config: one line too
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: run file {run_file} is not valid TOML: ")
    assert line.endswith("; fix that line (a run's own config.toml has a copy in each of its checkpoints/step_N/)")
    shutil.copyfile(copy, run_file)
    assert main(["--config", str(run_file), "--resume", "latest"]) == 0
