"""--config run.toml: every flag as a key, the command line over the file, one line for a bad file, and the
resolved config.toml a run writes reads back to the same run."""

import dataclasses
from pathlib import Path

import pytest

from training import config, loop
from training.cli import parse_config
from training.config import DistillConfig
from training.distill import main
from training.errors import UserError
from training.loop import train
from training.runfile import write_run_file


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_keys_take_dashes_or_underscores_and_flags_win(tmp_path):
    run = write(
        tmp_path / "run.toml",
        'teacher = "model.safetensors"\ndata = "images/"\nmax-steps = 50\nlr = 3e-4\nlora_alpha = 8\n'
        'mode = "lcm"\ndisc-renoise = true\nvalidation_steps = "1,2"\n',
    )
    cfg = parse_config(["--config", run])
    assert (cfg.teacher, cfg.data, cfg.max_steps, cfg.lr, cfg.lora_alpha, cfg.mode, cfg.disc_renoise) == (
        "model.safetensors", "images/", 50, 3e-4, 8.0, "lcm", True,
    )
    assert isinstance(cfg.lora_alpha, float) and cfg.solver == "ode"  # the mode still fills what is unset
    cfg = parse_config(["--config", run, "--max-steps", "7", "--no-disc-renoise", "--mode", "scott"])
    assert (cfg.max_steps, cfg.disc_renoise, cfg.mode, cfg.lr, cfg.solver) == (7, False, "scott", 3e-4, "er_sde_5")


@pytest.mark.parametrize(
    "text, message",
    [
        ('lora_rnak = 4\n', "unknown key 'lora_rnak'; the closest valid key is 'lora_rank'"),
        ('max-step = 4\n', "unknown key 'max-step'; the closest valid key is 'max_steps'"),
        ('lr = "fast"\n', "lr must be a number, got 'fast'"),
        ('max_steps = 1.5\n', "max_steps must be an integer, got 1.5"),
        ('max_steps = true\n', "max_steps must be an integer, got True"),
        ('trust-ckpt = 1\n', "trust-ckpt must be true or false, got 1"),
        ('data = 3\n', "data must be a string, got 3"),
        ('mode = "bogus"\n', "mode must be one of scott, lcm, got 'bogus'"),
        ('max_steps = 2\nmax-steps = 3\n', "key 'max-steps' is given twice"),
        ('lr = \n', "is not valid TOML"),
        ('lr = 0.0\n', "--lr must be > 0, got 0.0"),
    ],
)
def test_a_bad_run_file_stops_before_any_model_loads_with_one_line(tmp_path, tiny_teacher, tiny_data, monkeypatch,
                                                                   capsys, text, message):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the run file was checked")

    monkeypatch.setattr(loop, "load_teacher", no_load)
    run = write(tmp_path / "run.toml", text)
    argv = ["--config", run, "--teacher", str(tiny_teacher), "--data", str(tiny_data), "--output", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_run_file_and_missing_teacher(tmp_path, capsys):
    with pytest.raises(UserError, match="run file .*nope.toml does not exist"):
        parse_config(["--config", str(tmp_path / "nope.toml")])
    with pytest.raises(SystemExit) as exc:
        parse_config(["--config", write(tmp_path / "run.toml", 'data = "d"\n')])
    assert exc.value.code == 2 and "--teacher" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--teacher", "model.safetensors"],  # data-free: data stays unset
        ["--teacher", "m.safetensors", "--data", 'shards/{000..009}.tar', "--mode", "lcm", "--lr", "1.5e-05",
         "--w-min", "3", "--name", 'quote " and \\ back\\slash é', "--resume", "latest", "--disc-renoise",
         "--validation-steps", "1,3", "--mixed-precision", "bf16", "--solver", "noise_strength",
         "--noise-strength", "0.1"],
    ],
)
def test_the_written_config_reads_back_to_the_same_config(tmp_path, argv):
    cfg = parse_config(argv)
    write_run_file(cfg, tmp_path / "config.toml")
    again = parse_config(["--config", str(tmp_path / "config.toml")])
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg) and again == cfg
    assert [type(getattr(again, f.name)) for f in dataclasses.fields(cfg)] == [
        type(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
    ]


def test_a_run_writes_the_config_that_reproduces_it(tmp_path, tiny_teacher, tiny_data, tiny_config):
    out = tmp_path / "out"
    cfg = tiny_config(tiny_teacher, tiny_data, out, max_steps=1, mode="lcm")
    train(cfg)
    assert not (out / "config.json").exists()
    assert parse_config(["--config", str(out / "config.toml")]) == cfg
    assert isinstance(cfg, DistillConfig)


def test_the_readme_example_run_file_is_valid(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    example = readme.split("```toml\n# run.toml", 1)[1].split("```", 1)[0]
    cfg = parse_config(["--config", write(tmp_path / "run.toml", "# run.toml" + example)])
    assert (cfg.teacher, cfg.data, cfg.batch_size, cfg.max_steps, cfg.mixed_precision) == (
        "dreamshaper_8.safetensors", "my_images/", 8, 4000, "bf16",
    )


def test_the_file_beats_the_demo_defaults_and_flags_beat_both(tmp_path, monkeypatch):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "model_index.json").write_text("{}")
    (demo / "unet").mkdir()
    (demo / "unet" / "config.json").write_text("{}")
    monkeypatch.setattr(config, "DEMO_TEACHER", demo)
    run = write(tmp_path / "run.toml", 'teacher = "demo"\nresolution = 32\nmax_steps = 9\n')
    cfg = parse_config(["--config", run, "--max-steps", "5"])
    assert (cfg.teacher, cfg.resolution, cfg.max_steps, cfg.batch_size) == (str(demo), 32, 5, 16)
