"""Validation prompts with kohya-style per-line options (--n --s --l --d --w --h --g) and the validation grids
(keep-best: test_keep_best.py)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import training.loop
from scott_core.sampling import consistency_denoiser, sample_scott
from scott_core.schedule import alphas_cumprod, lcm_timesteps
from training.distill import main
from training.errors import UserError
from training.models.conditioning import Conditioning
from training.validation import (
    PromptLine,
    guided_sample,
    parse_prompt_line,
    read_prompts,
    validation_grid,
)

# --- the prompt-line parser ---


def test_a_line_takes_kohyas_options_and_gamma():
    line = "a red apple, studio light --n blurry, low quality --s 2 --l 1.5 --d 42 --w 512 --h 768 --g 0.5"
    assert parse_prompt_line(line) == PromptLine(
        "a red apple, studio light", "blurry, low quality", steps=2, cfg=1.5, seed=42, width=512, height=768, gamma=0.5
    )


def test_a_plain_line_keeps_the_defaults_and_options_are_case_insensitive_last_wins():
    assert parse_prompt_line("  a cat on a mat  ") == PromptLine("a cat on a mat")
    assert parse_prompt_line("a cat --S 3 --s 4 --N dark") == PromptLine("a cat", "dark", steps=4)
    assert parse_prompt_line("a cat --l 2") == PromptLine("a cat", cfg=2.0)


def test_the_file_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\na cat --s 2\n   \na dog --d 7\n", encoding="utf-8")
    assert read_prompts(path) == [PromptLine("a cat", steps=2), PromptLine("a dog", seed=7)]
    assert [line.prompt for line in read_prompts(None)][0] == "a photograph of an astronaut riding a horse"


@pytest.mark.parametrize(
    "line, problem",
    [
        ("a cat --x 3", "unknown option --x (the options are --n, --s, --l, --d, --w, --h, --g)"),
        ("a cat --s two", "--s must be an integer in 1..50, got 'two'"),
        ("a cat --s 2.5", "--s must be an integer in 1..50, got '2.5'"),
        ("a cat --s 0", "--s must be an integer in 1..50, got '0'"),
        ("a cat --s", "--s must be an integer in 1..50, got ''"),
        ("a cat --w 500", "--w must be a positive multiple of 8, got '500'"),
        ("a cat --h 0", "--h must be a positive multiple of 8, got '0'"),
        ("a cat --l 0", "--l must be a number > 0, got '0'"),
        ("a cat --l inf", "--l must be a number > 0, got 'inf'"),
        ("a cat --g 1.5", "--g must be a number in [0, 1], got '1.5'"),
        ("a cat --d -1", "--d must be an integer >= 0, got '-1'"),
        ("--n blurry", "no prompt before the options"),
    ],
)
def test_a_malformed_line_is_one_error_naming_file_and_line(tmp_path, line, problem):
    path = tmp_path / "prompts.txt"
    path.write_text(f"a good line --s 2\n\n{line}\n", encoding="utf-8")
    with pytest.raises(UserError) as error:
        read_prompts(path)
    assert str(error.value) == f"--validation-prompts {path} line 3: {problem}"


def test_a_bad_prompt_file_stops_the_run_before_any_model_loads(
    tmp_path, tiny_teacher, tiny_data, tiny_args, monkeypatch, capsys
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(training.loop, "load_teacher", no_loading)
    path = tmp_path / "prompts.txt"
    path.write_text("a cat --w 100\n", encoding="utf-8")
    argv = tiny_args(tiny_teacher, tiny_data, tmp_path / "o", validate_every=1) + ["--validation-prompts", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --validation-prompts {path} line 1: --w must be a positive multiple of 8, got '100'"]


# --- guidance and the grid ---


class StubUNet:
    """eps(x, t, c) = 0.1 x + mean(c) (per sample): cond and uncond give different, known eps."""

    config = SimpleNamespace(in_channels=4)

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, encoder_hidden_states):
        self.calls += 1
        bias = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=0.1 * x + bias)


@pytest.mark.parametrize("cfg", [1.0, 2.5, 0.5])
def test_guided_sampling_is_uncond_plus_cfg_times_the_difference(cfg):
    ab = alphas_cumprod()
    cond, uncond = Conditioning(torch.full((1, 77, 8), 0.3)), Conditioning(torch.full((1, 77, 8), -0.2))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def reference_eps(x, t):
        e_cond, e_uncond = 0.1 * x + 0.3, 0.1 * x - 0.2
        return e_uncond + cfg * (e_cond - e_uncond)

    expected = sample_scott(
        consistency_denoiser(reference_eps, ab), z, lcm_timesteps(2), ab, gamma=0.5,
        generator=torch.Generator().manual_seed(1),
    )
    stub = StubUNet()
    got = guided_sample(stub, cond, uncond, cfg, z, 2, ab, 0.5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert stub.calls == 2  # one UNet call a step: [cond, uncond] batched, or cond alone at cfg 1


@pytest.fixture(scope="module")
def tiny_parts(tiny_teacher):
    """The tiny teacher's UNet (with adapters), VAE and family, and a text encoder call."""
    from training.models.adapters import add_adapters
    from training.models.teacher import encode_captions, load_teacher

    teacher = load_teacher(tiny_teacher)
    add_adapters(teacher.unet, 4, 4.0)
    return teacher.unet, teacher.vae, teacher.family, lambda captions: encode_captions(teacher, captions).float()


def grid_of(parts, lines, step_counts, path, seed):
    unet, vae, family, encode = parts
    cond, uncond = encode([x.prompt for x in lines]), encode([x.negative for x in lines])
    image = validation_grid(unet, vae, family, cond, uncond, lines, step_counts, alphas_cumprod(), 16, path,
                            seed=seed)
    return np.asarray(image)


def test_the_grid_uses_each_lines_steps_size_and_seed(tiny_parts, tmp_path):
    lines = [PromptLine("a cat", steps=3), PromptLine("a dog"), PromptLine("a bird", width=24, height=16, seed=5)]
    image = grid_of(tiny_parts, lines, [1, 2], tmp_path / "grid.png", seed=10)
    assert Image.open(tmp_path / "grid.png").size == (2 * 24, 3 * 16)  # 2 columns of the widest cell, 3 rows
    # Row 0 (--s 3): one image, 3 steps at the row's default seed 10 + 0; the second cell stays black.
    alone = grid_of(tiny_parts, [PromptLine("a cat")], [3], tmp_path / "cat.png", seed=10)
    assert np.array_equal(image[0:16, 0:16], alone) and not image[0:16, 24:48].any()
    # Row 1: 16 px images at both step counts, seed 10 + 1.
    dog = grid_of(tiny_parts, [PromptLine("a dog")], [1, 2], tmp_path / "dog.png", seed=11)
    assert np.array_equal(image[16:32, 0:16], dog[:, 0:16]) and np.array_equal(image[16:32, 24:40], dog[:, 16:32])
    # Row 2 (--w 24 --h 16 --d 5): 24 x 16 images from seed 5, whatever the run's seed and the row.
    bird = grid_of(tiny_parts, [PromptLine("a bird", width=24, height=16)], [1, 2], tmp_path / "bird.png", seed=5)
    assert np.array_equal(image[32:48], bird)


def test_cfg_and_negative_prompt_change_the_row_only_above_cfg_1(tiny_parts, tmp_path):
    plain = grid_of(tiny_parts, [PromptLine("a cat")], [2], tmp_path / "a.png", seed=3)
    unused = grid_of(tiny_parts, [PromptLine("a cat", negative="a dog")], [2], tmp_path / "b.png", seed=3)
    guided = grid_of(tiny_parts, [PromptLine("a cat", negative="a dog", cfg=4.0)], [2], tmp_path / "c.png", seed=3)
    assert np.array_equal(plain, unused)
    assert np.abs(plain.astype(int) - guided.astype(int)).max() > 0
