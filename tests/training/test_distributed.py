"""Two CPU processes (torchrun + gloo): gradients averaged, both ranks end with identical LoRAs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def torchrun(*args, cwd=REPO):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("family, accum", [("sd15", 1), ("sd15", 2), ("sdxl", 1)])
def test_two_ranks_end_with_identical_lora_weights(family, accum, tiny_data, tmp_path, request):
    # accum 2: the first micro-batch's two backwards (disc, student) run under no_sync, the second's sync both.
    # sdxl: the tiny SDXL teacher's conditioning (a dataclass of tensors) through DDP's forward.
    teacher = request.getfixturevalue({"sd15": "tiny_teacher", "sdxl": "tiny_xl_teacher"}[family])
    out = tmp_path / "out"
    out.mkdir()
    result = torchrun(
        str(Path(__file__).parent / "ddp_worker.py"), str(teacher), str(tiny_data), str(out), str(accum)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in info] == [2, 2]
    # Each rank trained on its own half of the data in the first epoch (4 of the 8 images, 2 batches).
    assert not set(info[0]["seen"][:4]) & set(info[1]["seen"][:4])
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=1e-7, msg=key)
    moved = [k for k in ranks[0] if ".lora_B.student." in k and ranks[0][k].abs().max() > 0]
    assert moved  # the student was updated, so equality is not trivial


def test_two_ranks_take_the_step_one_process_takes_on_both_ranks_batches(tiny_xl_teacher, tiny_data, tmp_path,
                                                                         tiny_config):
    """The tiny SDXL teacher: a 2-process optimiser step equals one process's step on the averaged gradients of the
    batches and draws each rank had (DDP's mean), clipped, then AdamW, the schedule and the EMA, as train_step does."""
    from training.checkpoint import trainable_state
    from training.data.images import make_loader
    from training.encode import batch_latents
    from training.loop import build, step_generator
    from training.models.adapters import ema_update
    from training.step import draw, scott_backward

    out = tmp_path / "out"
    out.mkdir()
    result = torchrun(str(Path(__file__).parent / "ddp_worker.py"), str(tiny_xl_teacher), str(tiny_data), str(out),
                      "1", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    run = build(tiny_config(tiny_xl_teacher, tiny_data, tmp_path / "one", mode="scott", lr=1e-3))
    cfg, model = run.cfg, run.accelerator.unwrap_model(run.model)
    for rank in (0, 1):  # each rank's first batch and draws, one after the other: their gradients add up
        batch = next(iter(make_loader(run.dataset, cfg.batch_size, rank, 2, cfg.seed)))
        generator = step_generator(cfg.seed, rank, 0, 0)
        z0, cond = batch_latents(run, batch, generator)
        scott_backward(model, z0, cond, run.uncond, draw(z0, run.grid, cfg, generator))
    for param in model.parameters():
        if param.grad is not None:
            param.grad /= 2
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    run.optimizer.step()
    ema_update(run.unet, cfg.ema_decay)
    expected, got = trainable_state(model), load_file(str(out / "rank0.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(got[k].abs().max() > 0 for k in got if ".lora_B.student." in k)


def test_two_ranks_withhold_the_same_images_and_never_train_on_them(tiny_teacher, images, tmp_path):
    data, out = images(tmp_path / "data", 10), tmp_path / "out"
    out.mkdir()
    worker = str(Path(__file__).parent / "ddp_worker.py")
    result = torchrun(worker, str(tiny_teacher), str(data), str(out), "1", "split")
    assert result.returncode == 0, result.stderr[-3000:]
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    withheld = info[0]["withheld"]
    assert len(withheld) == 2 and info[1]["withheld"] == withheld
    kept = {f"a picture number {i}" for i in range(10)} - set(withheld)
    # 8 pairs left, 4 per rank, 2 batches of 2 an epoch: the first epoch's 4 images of each rank are its own half.
    assert set(info[0]["seen"][:4]) | set(info[1]["seen"][:4]) == kept
    assert not (set(info[0]["seen"]) | set(info[1]["seen"])) & set(withheld)


def test_cli_runs_under_torchrun(tiny_teacher, tiny_data, tmp_path, tiny_args):
    out = tmp_path / "out"
    result = torchrun(
        "-m",
        "training.distill",
        *tiny_args(tiny_teacher, tiny_data, out, max_steps=2, mode="lcm", checkpoint_every=1),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "tiny-sd-v1_lcm_lora.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    assert {p.name for p in (out / "checkpoints" / "step_0000002").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }


def test_two_ranks_list_the_images_each_met_unreadable(tiny_teacher, images, tmp_path, tiny_args):
    """One truncated image in each rank's first batch (found only when drawn, no cache): skipped.txt and the last
    checkpoint's copy, both written by rank 0, list rank 1's too."""
    from training.data.images import batch_indices

    from .test_skips import truncate

    data, out = images(tmp_path / "data", 8), tmp_path / "out"  # img000 ... img007, the dataset's order
    firsts = [next(batch_indices(8, 2, rank, 2, seed=0))[0] for rank in (0, 1)]
    bad = sorted(data / f"img{i:03d}.png" for i in firsts)
    for path in bad:
        truncate(path)
    result = torchrun("-m", "training.distill", *tiny_args(tiny_teacher, data, out, max_steps=2, mode="lcm",
                                                           cache_latents=False, checkpoint_every=1))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [f"{path}\tunreadable: image file is truncated" for path in bad]
    for listed in (out / "skipped.txt", out / "checkpoints" / "step_0000002" / "skipped.txt"):
        assert sorted(listed.read_text().splitlines()[1:]) == expected, listed
