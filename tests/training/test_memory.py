"""Memory: the estimate is the loop's own step on fake tensors (equal, byte for byte and FLOP for FLOP, to the same
step on real tensors), sees the run's settings, and is what the one-line out-of-memory message says; the hardware
defaults written to the config; lean synthesis."""

import math
import re

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
import torch
from torch.utils.flop_counter import FlopCounterMode

from training import loop, memory
from training.cli import parse_config
from training.data import synth
from training.distill import main
from training.loop import make_accelerator
from training.memory import BLOCK, LiveBytes, estimate, norms_in_fp32
from training.models.teacher import encode_captions, load_teacher
from training.runfile import write_run_file


def test_live_bytes_rounds_to_512_and_frees():
    counter = LiveBytes()
    with counter:
        a = torch.empty(1000)  # 4000 B -> 4096
        b = torch.empty(10, dtype=torch.uint8)  # 10 B -> 512
        view = a[:10]
        del a
        assert counter.current == 4096 + 512  # the view keeps a's storage alive
        del view, b
    assert counter.current == 0 and counter.peak == 4096 + 512


def test_norms_run_in_fp32_under_autocast_as_on_cuda():
    x, norm = torch.randn(2, 8, 4, 4), torch.nn.GroupNorm(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), norms_in_fp32():
        out = norm(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, norm(x.bfloat16().float()))


SETTINGS = {  # tiny model, 32 px, batch 2, bf16
    "cached": dict(),
    "uncached": dict(cache_latents=False),
    "checkpointing": dict(gradient_checkpointing=True),
    "schedule": dict(disc_head_warmup=1, disc_every=2),  # step 0: no generator term, no disc update
}


@pytest.fixture(scope="module")
def configs(tiny_teacher, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    base = dict(resolution=32, mixed_precision="bf16", gradient_checkpointing=False)
    return {name: tiny_config(tiny_teacher, out, out, **{**base, **extra}) for name, extra in SETTINGS.items()}


@pytest.fixture(scope="module")
def estimates(configs):
    from accelerate.state import AcceleratorState

    found = {}
    for name, cfg in configs.items():
        found[name] = estimate(cfg)
        AcceleratorState._reset_state(reset_partial_state=True)
    return found


def real_step_counts(cfg):
    """LiveBytes and per-step FLOPs of the loop's step on real tensors (random weights on the CPU), counted as the
    estimate counts its fake one."""
    accelerator = make_accelerator(cfg)
    run = memory.step_run(cfg, accelerator, memory.random_teacher(cfg, accelerator.device))
    counter = LiveBytes()
    with norms_in_fp32():
        hooks = memory.mark_phases(run, counter)
        with counter:
            for tensor in memory.resident(run):
                counter.track(tensor)
            counter.begin("weights")
            memory.run_steps(run, counter, steps=1)
            first, resident = dict(counter.flops), counter.current
            memory.run_steps(run, counter, steps=1)
        for hook in hooks:
            hook.remove()
    return counter, resident, {k: v - first.get(k, 0) for k, v in counter.flops.items() if v - first.get(k, 0)}


def assert_estimate_is_the_real_step(found, cfg):
    """The estimate `found` of cfg has every storage and every FLOP of the same step on real tensors."""
    counter, resident, flops = real_step_counts(cfg)
    assert (found.peak_bytes, found.resident_bytes) == (counter.peak, resident)
    assert found.phase_bytes == counter.phases and found.phase_flops == flops
    assert set(found.phase_bytes) == {"weights", "latents", "estimate", "discriminator_loss", "student_loss",
                                      "optimizer"}


def test_the_estimate_equals_the_loops_step_on_real_tensors(configs, estimates):
    """No weights are loaded and no value is computed, yet every storage and every FLOP is the real step's."""
    assert_estimate_is_the_real_step(estimates["uncached"], configs["uncached"])


@pytest.mark.parametrize("cache", [True, False])
def test_the_sdxl_estimate_equals_the_loops_step_on_real_tensors(cache, tiny_xl_teacher, tiny_config, tmp_path):
    """The family flows through the estimate: both text encoders, the pooled embedding and the time ids, cached or
    encoded in the step."""
    from accelerate.state import AcceleratorState

    cfg = tiny_config(tiny_xl_teacher, tmp_path, tmp_path, resolution=32, mixed_precision="bf16", cache_latents=cache)
    found = estimate(cfg)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert_estimate_is_the_real_step(found, cfg)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_estimate_runs_the_heaviest_step_of_the_adversarial_schedule(estimates):
    """The first step of a run with a disc head warm-up and the disc every 2nd step runs neither the generator term
    nor the disc update; the estimate runs step 1, which runs both, as every step of the default schedule does."""
    scheduled, full = estimates["schedule"], estimates["cached"]
    assert (scheduled.peak_bytes, scheduled.phase_bytes, scheduled.phase_flops) == (
        full.peak_bytes, full.phase_bytes, full.phase_flops)


def test_the_estimate_sees_checkpointing_and_the_cache(tiny_teacher, estimates):
    cached, uncached, checkpointed = (estimates[k] for k in ("cached", "uncached", "checkpointing"))
    assert checkpointed.peak_bytes < cached.peak_bytes  # recompute trades FLOPs for memory
    assert sum(checkpointed.phase_flops.values()) > sum(cached.phase_flops.values())
    # Without the cache the step encodes the batch: exactly one VAE encode and one text-encoder pass more, counted on
    # the real tiny modules, and their (bf16) weights stay on the GPU.
    teacher = load_teacher(tiny_teacher, dtype=torch.bfloat16)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        teacher.vae.encode(torch.rand(2, 3, 32, 32, dtype=torch.bfloat16))
        encode_captions(teacher, ["a photograph"] * 2)
    encode = flops.get_total_flops()
    assert encode > 0 and "latents" not in cached.phase_flops
    assert uncached.phase_flops["latents"] == encode
    assert {k: v for k, v in uncached.phase_flops.items() if k != "latents"} == cached.phase_flops
    tensors = [t for m in (teacher.vae, *teacher.text_encoders) for t in (*m.parameters(), *m.buffers())]
    encoders = sum(math.ceil(t.numel() * t.element_size() / BLOCK) * BLOCK for t in tensors)
    assert uncached.phase_bytes["weights"] - cached.phase_bytes["weights"] == encoders


def test_config_resolves_auto_for_this_machine(tiny_teacher, tiny_data, tmp_path, tiny_args, monkeypatch):
    argv = tiny_args(tiny_teacher, tiny_data, tmp_path)
    cfg = parse_config(argv)
    assert (cfg.mixed_precision, cfg.gradient_checkpointing) == ("no", False)  # this machine: a CPU
    write_run_file(cfg, tmp_path / "config.toml")
    written = tomllib.loads((tmp_path / "config.toml").read_text())
    assert (written["mixed_precision"], written["gradient_checkpointing"]) == ("no", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    for bf16, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        cfg = parse_config(argv)
        assert (cfg.mixed_precision, cfg.gradient_checkpointing) == (expected, True)
    explicit = parse_config([*argv, "--no-gradient-checkpointing", "--mixed-precision", "no"])
    assert (explicit.mixed_precision, explicit.gradient_checkpointing) == ("no", False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert parse_config(argv).mixed_precision == "no"


def test_synthesis_decodes_one_image_at_a_time(tiny_teacher, tmp_path, tiny_config):
    cfg = tiny_config(tiny_teacher, None, tmp_path, synth_images=3, synth_steps=2, batch_size=3)
    teacher = load_teacher(tiny_teacher)
    decoded, real_decode = [], teacher.vae._decode
    teacher.vae._decode = lambda z, *a, **k: decoded.append(z.shape[0]) or real_decode(z, *a, **k)
    folder, made = synth.synthesize_run(cfg, teacher, ["a", "b", "c"], "cpu")
    assert made == 3 and len(list(folder.glob("*.png"))) == 3
    assert decoded == [1, 1, 1]  # one batch of 3, decoded image by image
    assert not teacher.vae.use_slicing  # training's VAE encode is left as it was


def oom_on_third_step(monkeypatch):
    real, calls = loop.scott_backward, []

    def runs_out_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "scott_backward", runs_out_on_third_step)


def test_out_of_memory_is_one_line_with_the_runs_own_estimate(tiny_teacher, tiny_data, tmp_path, tiny_args,
                                                               monkeypatch, capsys):
    oom_on_third_step(monkeypatch)
    out = tmp_path / "out"
    argv = tiny_args(tiny_teacher, tiny_data, out, max_steps=4, checkpoint_every=2, mode="lcm")
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    line = lines[0]
    run_file = out / "out_of_memory.toml"
    found = re.fullmatch(
        r"error: out of GPU memory at step 3: this run needs about [0-9.]+ GiB \(([0-9]+) bytes; estimate: "
        rf"python -m training.distill --config {re.escape(str(run_file))} --estimate-memory\); lower it with "
        r"(.*); last checkpoint: (.*)", line)
    assert found, line
    assert found[2] == "--gradient-checkpointing, --mixed-precision bf16, --batch-size 1 --grad-accum 2"
    assert found[3] == str(out / "checkpoints" / "step_0000002")
    assert main(["--config", str(run_file), "--estimate-memory"]) == 0
    printed = capsys.readouterr().out
    assert memory.PEAK_LINE.search(printed)[1] == found[1]  # the message's number is --estimate-memory's


def error_line(capsys):
    """The one 'error:' line on stderr."""
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return line


def test_out_of_memory_names_what_the_run_was_doing(tiny_teacher, tiny_data, tmp_path, tiny_args, monkeypatch,
                                                    capsys):
    monkeypatch.setattr(memory, "estimate_in_child", lambda run_file: 12345)

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(loop, "load_teacher", no_room)
    assert main(tiny_args(tiny_teacher, tiny_data, tmp_path / "a")) == 2
    assert error_line(capsys).startswith(
        "error: out of GPU memory while loading the teacher, drawing data-free images or caching latents: this run "
        "needs about 0.00 GiB (12345 bytes; estimate: ")
    monkeypatch.undo()
    monkeypatch.setattr(memory, "estimate_in_child", lambda run_file: None)
    monkeypatch.setattr(loop, "keep_best", no_room)
    assert main(tiny_args(tiny_teacher, tiny_data, tmp_path / "b", validate_every=2, max_steps=2, mode="lcm")) == 2
    run_file = tmp_path / "b" / "out_of_memory.toml"
    assert error_line(capsys).startswith(
        f"error: out of GPU memory while validating at step 2: its estimate: python -m training.distill --config "
        f"{run_file} --estimate-memory; lower it with ")
