"""Checkpoints: exact resume, keep-last-N, NaN stop (a killed or failed write: test_faults.py)."""

import torch
from safetensors.torch import load_file

from training import checkpoint
from training.distill import main
from training.loop import train


def lora_tensors(output, step):
    return load_file(str(output / "checkpoints" / f"step_{step:07d}" / checkpoint.WEIGHTS))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_continues_exactly(family_teacher, tiny_data, tmp_path, tiny_config):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_config(family_teacher, tiny_data, straight, max_steps=4, checkpoint_every=2))
    train(tiny_config(family_teacher, tiny_data, split, max_steps=2, checkpoint_every=2))
    train(tiny_config(family_teacher, tiny_data, split, max_steps=4, checkpoint_every=2, resume="latest"))
    final = lora_tensors(straight, 4)
    assert_same_tensors(final, lora_tensors(split, 4))
    # Training really moved the student (so the equality above is not trivial), and the EMA target follows it.
    assert any(v.abs().max() > 0 for k, v in final.items() if ".lora_B.student." in k)
    assert not torch.equal(
        *(
            final[k]
            for k in sorted(final)
            if ".lora_B." in k
            and "down_blocks.0.resnets.0.conv1" in k
            and (".student." in k or ".target." in k)
        )
    )


def test_keeps_only_the_last_n_checkpoints(tiny_teacher, tiny_data, tmp_path, tiny_config):
    out = tmp_path / "out"
    train(
        tiny_config(
            tiny_teacher, tiny_data, out, mode="lcm", max_steps=4, checkpoint_every=1, keep_checkpoints=2
        )
    )
    assert [p.name for p in checkpoint.checkpoints(out / "checkpoints")] == ["step_0000003", "step_0000004"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_teacher, tiny_data, tmp_path, tiny_args, monkeypatch, capsys
):
    from training.step import SCottStep

    real_loss, calls = SCottStep.student_loss, []

    def nan_on_third_call(self, *args):
        objective, losses = real_loss(self, *args)
        calls.append(1)
        if len(calls) == 3:
            losses["cd"] = losses["cd"] * float("nan")
        return objective, losses

    monkeypatch.setattr(SCottStep, "student_loss", nan_on_third_call)
    out = tmp_path / "out"
    assert main(tiny_args(tiny_teacher, tiny_data, out, max_steps=4, checkpoint_every=2, mode="lcm")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: loss is nan at step 3") and errors[0].endswith("step_0000002")
    good = lora_tensors(out, 2)
    assert all(torch.isfinite(v).all() for v in good.values())
    assert [p.name for p in checkpoint.checkpoints(out / "checkpoints")] == ["step_0000002"]
