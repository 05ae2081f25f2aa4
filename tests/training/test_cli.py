"""The CLI: --help explains every flag; each user mistake is one line on stderr and a non-zero exit."""

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training.cli import build_parser
from training.config import DistillConfig
from training.distill import main

REPO = Path(__file__).resolve().parents[2]


def test_help_names_every_flag_with_its_default():
    text = " ".join(build_parser().format_help().split())
    for f in dataclasses.fields(DistillConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert (
        "(default: 0.95)" in text
        and "(default: scott)" in text
        and "(default: by --mode: scott er_sde_5, lcm ode)" in text
    )


def test_modes_fill_only_what_is_left_unset():
    lcm = DistillConfig(teacher="t", data="d", mode="lcm").resolved()
    assert (lcm.solver, lcm.sub_steps, lcm.span, lcm.grid_spacing, lcm.adv_weight) == ("ode", 1, 20, 20, 0.0)
    scott = DistillConfig(teacher="t", data="d", sub_steps=5, adv_weight=0.0).resolved()
    assert (scott.solver, scott.sub_steps, scott.span, scott.adv_weight, scott.lora_alpha) == (
        "er_sde_5",
        5,
        24,
        0.0,
        64,
    )


def test_modes_set_no_knob_their_solver_ignores():
    """scott = er_sde_5 and lcm = ode take no knob, so both stay unset; a solver's own knob defaults to 0."""
    for mode in ("scott", "lcm"):
        cfg = DistillConfig(teacher="t", data="d", mode=mode).resolved()
        assert (cfg.eta, cfg.noise_strength) == (None, None)
    ddim = DistillConfig(teacher="t", data="d", solver="ddim").resolved()
    assert (ddim.eta, ddim.noise_strength) == (0.0, None)
    family = DistillConfig(teacher="t", data="d", solver="noise_strength", noise_strength=0.3).resolved()
    assert (family.eta, family.noise_strength) == (None, 0.3)
    below = DistillConfig(teacher="t", data="d", solver="er_sde_5_below").resolved()
    assert (below.eta, below.noise_strength, below.noise_below) == (None, None, 500.0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--noise-strength", "0.3"],
            "error: --solver er_sde_5 (the default of --mode scott) takes no --noise-strength (it takes no knob): "
            "drop --noise-strength, or use --solver noise_strength",
        ),
        (
            ["--solver", "er_sde_5", "--noise-strength", "0.3"],
            "error: --solver er_sde_5 (the default of --mode scott) takes no --noise-strength (it takes no knob): "
            "drop --noise-strength, or use --solver noise_strength",
        ),
        (
            ["--solver", "ddim", "--noise-strength", "0.3"],
            "error: --solver ddim takes no --noise-strength (it takes --eta): drop --noise-strength, "
            "or use --solver noise_strength",
        ),
        (
            ["--solver", "noise_strength", "--eta", "0.3"],
            "error: --solver noise_strength takes no --eta (it takes --noise-strength): drop --eta, "
            "or use --solver ddim",
        ),
        (
            ["--mode", "lcm", "--eta", "0"],
            "error: --solver ode (the default of --mode lcm) takes no --eta (it takes no knob): drop --eta, "
            "or use --solver ddim",
        ),
        (
            ["--noise-below", "300"],
            "error: --solver er_sde_5 (the default of --mode scott) takes no --noise-below (it takes no knob): "
            "drop --noise-below, or use --solver er_sde_5_below",
        ),
        (
            ["--solver", "er_sde_5_below", "--noise-below", "1001"],
            "error: --noise-below must be in [0, 1000], got 1001",
        ),
        (["--solver", "ddim", "--eta", "-0.1"], "error: --eta must be >= 0, got -0.1"),
        (["--solver", "noise_strength", "--noise-strength", "inf"], "error: --noise-strength must be a finite"),
    ],
)
def test_a_knob_the_solver_ignores_is_one_line_at_start(flags, message, capsys, monkeypatch):
    monkeypatch.setattr("training.loop.train", lambda cfg: pytest.fail("started training"))
    assert main(["--teacher", "t", "--data", "d", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


class Exploit:
    """Unpickling this would create a marker file."""

    marker = None

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def sd_keys(channels=(320, 4), xl=False, **extra):
    """The keys a single file is detected from: the UNet's first conv (out, in channels) and SDXL's text encoders."""
    unet = "model.diffusion_model."
    xl_keys = {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)} if xl else {}
    return {f"{unet}input_blocks.0.0.weight": torch.zeros(*channels, 1, 1), **xl_keys, **extra}


SUPPORTED = "this trainer distills eps-prediction SD1.5- and SDXL-family models"
MARKER = torch.zeros(0)
BAD_TEACHERS = {  # file -> (its tensors, what the one line says it is): the family table's refusals
    "sd2.safetensors": (sd_keys(**{"cond_stage_model.model.ln_final.weight": torch.zeros(2)}), "is SD2.x (sd2)"),
    "inpaint.safetensors": (sd_keys((320, 9)), "is an SD1.5 inpainting model, 9 input channels (sd15_inpaint)"),
    "xl_inpaint.safetensors": (
        sd_keys((320, 9), xl=True), "is an SDXL inpainting model, 9 input channels (sdxl_inpaint)"
    ),
    "refiner.safetensors": (
        sd_keys((384, 4), xl=True), "is the SDXL refiner, a second-stage model (sdxl_refiner)"
    ),
    "ip2p.safetensors": (
        sd_keys((320, 8), xl=True), "is an SDXL InstructPix2Pix model, 8 input channels (sdxl_instructpix2pix)"
    ),
    "vpred.safetensors": (
        sd_keys(xl=True, v_pred=MARKER, ztsnr=MARKER),
        "is a v-prediction SDXL fine-tune such as NoobAI's v-pred line, zero terminal SNR (sdxl_vpred)",
    ),
    "edm.safetensors": (sd_keys(xl=True, edm_mean=MARKER, edm_std=MARKER), "is Playground v2.5, EDM (playground_v2.5)"),
    "cosxl.safetensors": (
        sd_keys(xl=True, **{"edm_vpred.sigma_max": MARKER}),
        "is a v-prediction EDM SDXL model such as CosXL (sdxl_vpred_edm)",
    ),
    "vae.safetensors": ({"encoder.conv_in.weight": torch.zeros(2)}, "is not a Stable Diffusion checkpoint"),
    "lora.safetensors": (
        {"lora_unet_x.lora_down.weight": torch.zeros(2)},
        "is a LoRA, not a full checkpoint",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_TEACHERS))
def test_wrong_kind_of_teacher_is_named(tmp_path, tiny_data, capsys, name):
    tensors, message = BAD_TEACHERS[name]
    save_file(tensors, str(tmp_path / name))
    assert (
        main(["--teacher", str(tmp_path / name), "--data", str(tiny_data), "--output", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: teacher {tmp_path / name} {message}") and len(err.splitlines()) == 1
    assert name in ("vae.safetensors", "lora.safetensors") or err.endswith(f"; {SUPPORTED}")


def test_pickle_checkpoint_is_refused_and_never_opened(tmp_path, tiny_data, capsys):
    Exploit.marker = str(tmp_path / "pwned")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": Exploit()}))
    assert main(["--teacher", str(ckpt), "--data", str(tiny_data)]) == 2
    assert "--trust-ckpt" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "content, message", [(b"", "not a readable .safetensors"), (b"garbage" * 10, "not a readable")]
)
def test_corrupt_or_missing_teacher(tmp_path, tiny_data, capsys, content, message):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    assert main(["--teacher", str(path), "--data", str(tiny_data)]) == 2
    assert message in capsys.readouterr().err
    assert main(["--teacher", str(tmp_path / "nope.safetensors"), "--data", str(tiny_data)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_data_and_flag_mistakes(tmp_path, tiny_teacher, tiny_args, capsys):
    (tmp_path / "empty").mkdir()
    assert main(tiny_args(tiny_teacher, tmp_path / "empty", tmp_path / "o")) == 2
    assert "has no usable image + caption pairs" in capsys.readouterr().err
    assert main(tiny_args(tiny_teacher, tmp_path / "nothing-{0..1}.tar", tmp_path / "o")) == 2
    assert "shards not found" in capsys.readouterr().err
    assert (
        main(["--teacher", str(tiny_teacher), "--data", str(tmp_path), "--w-min", "5", "--w-max", "1"]) == 2
    )
    assert "--w-min" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--teacher", "x", "--data", "y", "--mode", "bogus"])
    assert exc.value.code == 2


def test_module_entry_point_exits_non_zero_with_one_line(tmp_path, tiny_data):
    save_file(*BAD_TEACHERS["refiner.safetensors"][:1], str(tmp_path / "xl.safetensors"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.distill",
            "--teacher",
            str(tmp_path / "xl.safetensors"),
            "--data",
            str(tiny_data),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: teacher {tmp_path / 'xl.safetensors'} is the SDXL refiner, a second-stage model (sdxl_refiner); "
        + SUPPORTED
    ]


def test_validation_grid_is_prompts_by_step_counts(tmp_path, tiny_teacher, tiny_data, tiny_args):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\na bird\n")
    out = tmp_path / "o"
    argv = tiny_args(
        tiny_teacher, tiny_data, out, max_steps=2, validate_every=1, validation_steps="1,2,4", mode="lcm"
    ) + ["--validation-prompts", str(prompts)]
    assert main(argv) == 0
    from PIL import Image

    grids = sorted((out / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000001.png", "step_0000002.png"]
    assert Image.open(grids[0]).size == (3 * 16, 3 * 16)  # 3 step counts x 3 prompts of 16 px


def test_a_run_names_its_lora_once(tmp_path, tiny_teacher, tiny_data, tiny_args, capsys, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "o"
    assert main(tiny_args(tiny_teacher, tiny_data, out, max_steps=1, mode="lcm")) == 0
    said = capsys.readouterr().out + caplog.text
    assert said.count("LoRA written to") == 1 and f"LoRA written to {out}" in said
