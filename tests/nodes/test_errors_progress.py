"""Bad inputs give the message a user can act on, ComfyUI goes on to run the next prompt; the progress bar
advances once per step with previews; Cancel stops within one step.

Every bad prompt also carries the good prompt's loader nodes (unexecuted), so ComfyUI's cache keeps them and
the next good prompt only re-samples: that keeps this file fast on a CPU."""

import itertools

import pytest
from graphs import base, empty_latent, ksampler, sampler_custom

_seeds = itertools.count(1000)


def good_base(fixture_paths):
    return base(fixture_paths["checkpoint"].name, fixture_paths["lora_kohya"].name)


def with_bad_lora(fixture_paths, lora_name):
    """The good prompt's nodes plus a SCott LoRA Loader ("badlora") of lora_name feeding a sampler branch."""
    prompt, _, _ = good_base(fixture_paths)
    prompt["badlora"] = {
        "class_type": "ScottLoraLoader",
        "inputs": {
            "model": ["ckpt", 0],
            "clip": ["ckpt", 1],
            "lora_name": lora_name,
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    }
    return prompt


def assert_next_prompt_succeeds(comfy, fixture_paths):
    prompt, model, _ = good_base(fixture_paths)
    name = f"next_{next(_seeds)}"
    ksampler(prompt, name, model, empty_latent(prompt), seed=next(_seeds))
    result = comfy.run(prompt)
    assert result["ok"], result["error"]
    assert comfy.output_files(result, "latents", name)


def execution_error(result):
    assert not result["ok"] and result["stage"] == "execution"
    return result["error"]["exception_message"]


@pytest.mark.parametrize(
    "lora, expected",
    [
        ("lora_sdxl", ["is for sdxl", "the model is sd15"]),
        ("lora_nomatch", ["5 of 7 LoRA modules", "lora_unet_down_blocks_7_attentions_0_proj_in"]),
        ("lora_empty", ["is empty"]),
        ("lora_pickle", ["not a safetensors file"]),
        ("lora_truncated", ["corrupt or truncated"]),
    ],
)
def test_bad_lora_files_fail_loudly_in_one_line(comfy, fixture_paths, lora, expected):
    prompt = with_bad_lora(fixture_paths, fixture_paths[lora].name)
    ksampler(prompt, "bad", ["badlora", 0], empty_latent(prompt), seed=next(_seeds))
    message = execution_error(comfy.run(prompt))
    assert all(text in message for text in expected), message
    assert "\n" not in message.strip()
    assert_next_prompt_succeeds(comfy, fixture_paths)


def test_sd2_model_is_refused_naming_both_families(comfy, fixture_paths):
    prompt = with_bad_lora(fixture_paths, fixture_paths["lora_kohya"].name)
    prompt["unet"] = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": fixture_paths["sd2_unet"].name, "weight_dtype": "default"},
    }
    prompt["badlora"]["inputs"]["model"] = ["unet", 0]
    ksampler(prompt, "sd2", ["badlora", 0], empty_latent(prompt), seed=next(_seeds))
    message = execution_error(comfy.run(prompt))
    assert "is for sd15" in message and "the model is sd2" in message, message
    # the scheduler checks the family too
    prompt.update(
        {
            "s": {
                "class_type": "ScottScheduler",
                "inputs": {"model": ["unet", 0], "steps": 2, "denoise": 1.0, "timesteps": ""},
            },
            "p": {"class_type": "PreviewAny", "inputs": {"source": ["s", 0]}},
        }
    )
    del prompt["sd2"], prompt["sd2_save"]
    assert "the model is sd2" in execution_error(comfy.run(prompt))
    assert_next_prompt_succeeds(comfy, fixture_paths)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"timesteps": "999, 1200"}, "outside the integers 0..999"),
        ({"timesteps": "499, 999"}, "strictly decreasing"),
        ({"timesteps": "nine"}, "comma-separated list"),
        ({"denoise": 0.0}, "denoise must be in (0.0, 1.0]"),
        ({"steps": 16, "denoise": 0.2}, "steps=16 is more than the 10 timesteps left"),
    ],
)
def test_bad_schedules_are_explained(comfy, fixture_paths, change, expected):
    prompt, model, _ = good_base(fixture_paths)
    sampler_custom(prompt, "sched", model, empty_latent(prompt), seed=next(_seeds))
    prompt["sched_sigmas"]["inputs"].update(change)
    assert expected in execution_error(comfy.run(prompt))
    assert_next_prompt_succeeds(comfy, fixture_paths)


@pytest.mark.parametrize("field, value", [("steps", -1), ("steps", 17), ("gamma", 1.5), ("cfg", -1.0), ("cfg", 31.0)])
def test_out_of_range_widgets_fail_validation_naming_the_input(comfy, fixture_paths, field, value):
    prompt, model, _ = good_base(fixture_paths)
    ksampler(prompt, "range", model, empty_latent(prompt), seed=next(_seeds))
    prompt["range"]["inputs"][field] = value
    result = comfy.run(prompt)
    assert not result["ok"] and result["stage"] == "validation"
    errors = result["node_errors"]["range"]["errors"]
    assert any(e["extra_info"]["input_name"] == field for e in errors), errors
    assert_next_prompt_succeeds(comfy, fixture_paths)


@pytest.mark.parametrize("path", ["ksampler", "custom"])
def test_progress_advances_every_step_with_a_preview(comfy, fixture_paths, path):
    prompt, model, _ = good_base(fixture_paths)
    add = ksampler if path == "ksampler" else sampler_custom
    add(prompt, "prog", model, empty_latent(prompt), seed=next(_seeds), steps=4)
    result = comfy.run(prompt)
    assert result["ok"], result["error"]
    sampler_updates = [(v, t, p) for node, v, t, p in comfy.progress if node == "prog"]
    assert [(v, t) for v, t, _ in sampler_updates] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(p for _, _, p in sampler_updates)  # a preview image with every step


@pytest.mark.parametrize("path", ["ksampler", "custom"])
def test_cancel_stops_within_one_step(comfy, fixture_paths, path):
    prompt, model, _ = good_base(fixture_paths)
    add = ksampler if path == "ksampler" else sampler_custom
    add(prompt, "cancel", model, empty_latent(prompt), seed=next(_seeds), steps=8)
    comfy.interrupt_at_step = 2
    try:
        result = comfy.run(prompt)
    finally:
        comfy.interrupt_at_step = None
    assert not result["ok"]
    assert any(event == "execution_interrupted" for event, _ in result["messages"])
    assert max(v for node, v, _, _ in comfy.progress if node == "cancel") <= 3
    assert not comfy.output_files(result, "latents", "cancel")
    assert_next_prompt_succeeds(comfy, fixture_paths)
