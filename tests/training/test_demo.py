"""`--teacher demo`: the shipped shapes-world teacher with CPU-sized defaults that explicit flags override."""

import pytest

from scott_core import lora_format
from training import config
from training.cli import parse_config
from training.config import DEMO_DEFAULTS
from training.distill import main
from training.errors import UserError


@pytest.fixture
def shipped_demo(tmp_path, monkeypatch):
    """A stand-in demo folder (only its index and UNet config matter to config resolution)."""
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text("{}")  # an SD1.5-family UNet config, as far as detection reads
    monkeypatch.setattr(config, "DEMO_TEACHER", folder)
    return folder


def test_demo_takes_its_defaults_and_explicit_flags_win(shipped_demo):
    cfg = parse_config(["--teacher", "demo"])
    assert cfg.teacher == str(shipped_demo) and cfg.name == "demo_scott_lora"
    assert (cfg.resolution, cfg.batch_size, cfg.max_steps, cfg.data) == (64, 16, 300, DEMO_DEFAULTS["data"])
    cfg = parse_config(["--teacher", "demo", "--resolution", "32", "--data", "mine/", "--mode", "lcm", "--no-buckets"])
    assert (cfg.resolution, cfg.batch_size, cfg.data, cfg.name) == (32, 16, "mine/", "demo_lcm_lora")
    other = parse_config(["--teacher", "model.safetensors", "--data", "d"])
    assert (other.resolution, other.batch_size, other.max_steps) == (512, 4, 1000)


def test_missing_demo_teacher_says_how_to_rebuild_it(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEMO_TEACHER", tmp_path / "nothing")
    with pytest.raises(UserError, match="python -m experiments.world.teacher --out"):
        parse_config(["--teacher", "demo"])


@pytest.mark.parametrize("data", ["world:", "world:x", "world:0"])
def test_bad_world_count_is_one_line(tiny_teacher, tmp_path, tiny_args, capsys, data):
    assert main(tiny_args(tiny_teacher, data, tmp_path / "out")) == 2
    assert "give world:N with N >= 1" in capsys.readouterr().err


def test_world_data_renders_once_and_trains(tiny_teacher, tmp_path, tiny_args):
    out = tmp_path / "out"
    assert main(tiny_args(tiny_teacher, "world:6", out, resolution=16, mode="lcm")) == 0
    texts = sorted((out / "world").glob("*.txt"))
    assert len(texts) == 6 and len(list((out / "world").glob("*.png"))) == 6
    assert (out / "tiny-sd-v1_lcm_lora.safetensors").is_file()


@pytest.mark.parametrize("demo", ["demo", "demo-xl"])
def test_shipped_demo_teacher_runs_end_to_end(tmp_path, demo):
    if not (config.demo_folder(demo) / "model_index.json").is_file():
        pytest.skip(f"the {demo} teacher is not in this checkout (python -m experiments.world.teacher builds it)")
    out = tmp_path / demo
    argv = ["--teacher", demo, "--output", str(out), "--data", "world:8", "--batch-size", "4", "--max-steps", "2",
            "--checkpoint-every", "0", "--validate-every", "2"]
    assert main(argv) == 0
    meta = lora_format.read_safetensors(out / f"{demo}_scott_lora.safetensors")[1]
    assert meta["ss_base_model_version"] == {"demo": "sd_v1", "demo-xl": "sdxl_base_v1-0"}[demo]
    assert (out / "validation" / "step_0000002.png").is_file()


def test_demo_xl_takes_the_demo_defaults_and_its_own_prompts(tmp_path, monkeypatch):
    folder = tmp_path / "demo_xl"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text('{"addition_embed_type": "text_time", "cross_attention_dim": 80}')
    monkeypatch.setattr(config, "DEMO_XL_TEACHER", folder)
    cfg = parse_config(["--teacher", "demo-xl"])
    assert cfg.teacher == str(folder) and cfg.name == "demo-xl_scott_lora" and cfg.output == "runs/demo-xl"
    assert (cfg.resolution, cfg.batch_size, cfg.max_steps, cfg.data) == (64, 16, 300, DEMO_DEFAULTS["data"])
    assert cfg.validation_prompts == str(folder / "prompts.txt")
    monkeypatch.setattr(config, "DEMO_XL_TEACHER", tmp_path / "nothing")
    with pytest.raises(UserError, match="python -m experiments.world.teacher --out .* --family sdxl"):
        parse_config(["--teacher", "demo-xl"])
