"""Memory: the fake-tensor estimator, the hardware defaults written to the config, lean synthesis, and the
one-line out-of-memory message."""

import math

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.memory import BLOCK, LiveBytes, estimate, norms_in_fp32, tiny_components, tokenizer
from training import loop
from training.cli import parse_config
from training.data import synth
from training.distill import main
from training.models.teacher import load_teacher
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


@pytest.fixture(scope="module")
def estimates():
    """Tiny model, 32 px, batch 2, bf16: scott and lcm without and with checkpointing."""
    return {
        (config, ckpt): estimate(config, "tiny", 32, 2, "bf16", ckpt)
        for config in ("scott", "lcm")
        for ckpt in (False, True)
    }


def test_estimator_sees_weights_phases_and_checkpointing(estimates):
    scott, lcm = estimates[("scott", False)], estimates[("lcm", False)]
    phases = scott["phase_bytes"]
    assert scott["peak_bytes"] == max(phases.values()) > phases["weights"] > 0
    # Phased: in the student's phase the disc's graph is gone, so scott's student phase exceeds lcm's (same
    # student, no disc) by less than the disc's own graph.
    disc_graph = phases["discriminator_loss"] - phases["weights"]
    assert phases["student_loss"] - lcm["phase_bytes"]["student_loss"] < disc_graph
    for config in ("scott", "lcm"):
        assert estimates[(config, True)]["peak_bytes"] < estimates[(config, False)]["peak_bytes"]
        # Recompute costs FLOPs: checkpointing trades them for memory.
        assert estimates[(config, True)]["flop"] > estimates[(config, False)]["flop"]
    assert lcm["flop"] < scott["flop"] and "discriminator_loss" not in lcm["phases"]


def test_cached_step_has_no_encode_and_no_encoder_weights(estimates):
    """--cache-latents (the default): z0 from the cached mean / std, captions from the cache; the step without it
    costs exactly one VAE encode and one text-encoder pass more, counted independently on the real tiny modules."""
    cached, uncached = estimates[("scott", False)], estimate("scott", "tiny", 32, 2, "bf16", False, cache_latents=False)
    assert (cached["cache_latents"], uncached["cache_latents"]) == (True, False)
    _, vae, text, _, _ = tiny_components()
    vae, text = vae.to(torch.bfloat16), text.to(torch.bfloat16)
    ids = tokenizer()(["a caption"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        vae.encode(torch.rand(2, 3, 32, 32, dtype=torch.bfloat16))
        text(ids)
    encode = flops.get_total_flops()
    assert encode > 0 and cached["phase_flop"].get("latents", 0) == 0
    assert uncached["flop"] - cached["flop"] == encode
    assert {k: v for k, v in uncached["phase_flop"].items() if k != "latents"} == cached["phase_flop"]
    # The VAE and text encoder left the GPU: the resident bytes drop by exactly their (bf16) weights.
    encoders = sum(math.ceil(p.numel() * 2 / BLOCK) * BLOCK for p in [*vae.parameters(), *text.parameters()])
    assert uncached["phase_bytes"]["weights"] - cached["phase_bytes"]["weights"] == encoders
    assert cached["peak_bytes"] <= uncached["peak_bytes"] - encoders


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


def test_out_of_memory_ends_with_one_line(tiny_teacher, tiny_data, tmp_path, tiny_args, monkeypatch, capsys):
    real, calls = loop.scott_backward, []

    def runs_out_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "scott_backward", runs_out_on_third_step)
    out = tmp_path / "out"
    argv = tiny_args(tiny_teacher, tiny_data, out, max_steps=4, checkpoint_every=2, mode="lcm")
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    line = lines[0]
    assert line.startswith("error: out of GPU memory at step 3: this run needs about ")
    assert "--gradient-checkpointing" in line and "--mixed-precision bf16" in line and "--batch-size 1" in line
    assert line.endswith(str(out / "checkpoints" / "step_0000002"))
