"""Every numeric option has a declared range, and a value outside it stops the run at start with one line
naming the flag (walked over all options, so a new option cannot skip it)."""

import dataclasses
import math

import pytest

from training.cli import parse_config
from training.config import DistillConfig, Range
from training.distill import main
from training.errors import UserError
from training.runfile import field_types

KINDS = field_types()
NUMERIC = [f for f in dataclasses.fields(DistillConfig) if KINDS[f.name] in (int, float)]


def out_of_range(r: Range, kind):
    """Values just outside r (and, for floats, NaN and infinity)."""
    bad = []
    if r.low is not None:
        bad.append(r.low if r.low_open else r.low - 1)
    if r.high is not None:
        bad.append(r.high if r.high_open else r.high + 1)
    if r.multiple is not None:
        bad.append((r.low or 0) + r.multiple + 1)
    return [kind(v) for v in bad] + ([math.nan, math.inf] if kind is float else [])


def test_every_numeric_option_declares_a_range_its_default_meets():
    assert len(NUMERIC) >= 30
    for f in NUMERIC:
        assert isinstance(f.metadata.get("range"), Range), f"{f.name} has no range"
        assert f.default is None or f.metadata["range"].contains(f.default), f.name
        assert out_of_range(f.metadata["range"], KINDS[f.name]), f.name


@pytest.mark.parametrize("name", [f.name for f in NUMERIC])
def test_out_of_range_value_is_one_line_naming_the_flag(name):
    f = next(f for f in NUMERIC if f.name == name)
    flag = "--" + name.replace("_", "-")
    for bad in out_of_range(f.metadata["range"], KINDS[name]):
        with pytest.raises(UserError) as error:
            parse_config(["--teacher", "t.safetensors", "--data", "d", flag, str(bad)])
        message = str(error.value)
        assert message.startswith(flag + " must be") and "\n" not in message, (bad, message)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1"], "--lr must be > 0, got -1.0"),
        (["--resolution", "63"], "--resolution must be a multiple of 8, >= 8, got 63"),
        (["--caption-dropout", "1.5"], "--caption-dropout must be in [0, 1], got 1.5"),
        (["--w-min", "5", "--w-max", "1"], "need 0 <= --w-min <= --w-max, got 5.0 and 1.0"),
        (
            ["--resolution", "96"],
            "--resolution must be a multiple of 64 with --buckets, got 96: give --resolution 128, or --no-buckets "
            "for square crops",
        ),
    ],
)
def test_the_cli_refuses_a_new_users_mistakes(tmp_path, tiny_teacher, tiny_data, capsys, flags, message):
    argv = ["--teacher", str(tiny_teacher), "--data", str(tiny_data), "--output", str(tmp_path / "o"), *flags]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "o").exists()  # stopped before the run made anything


def test_edges_inside_the_ranges_are_accepted():
    cfg = parse_config(["--teacher", "t", "--data", "d", "--no-buckets", "--resolution", "8", "--caption-dropout", "1",
                        "--ema-decay", "0", "--checkpoint-every", "0", "--span", "999", "--adv-weight", "0"])
    assert (cfg.resolution, cfg.caption_dropout, cfg.span, cfg.adv_weight) == (8, 1.0, 999, 0.0)


def test_buckets_need_a_multiple_of_64_only_on_the_users_images():
    assert parse_config(["--teacher", "t", "--data", "d", "--resolution", "192"]).buckets
    assert parse_config(["--teacher", "t", "--data", "world:4", "--resolution", "32"]).resolution == 32  # square
    assert parse_config(["--teacher", "t", "--resolution", "40"]).resolution == 40  # data-free: square
