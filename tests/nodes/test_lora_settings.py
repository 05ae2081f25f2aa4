"""SCott KSampler's steps, cfg and gamma left on "from the LoRA" (0, 0, -1, the defaults) take the scott.steps /
scott.cfg / scott.gamma metadata SCott LoRA Loader attached to the model, else 2 steps, cfg 1.0, gamma 1.0; the
values used go to ComfyUI's log. SCott Scheduler's steps do the same. Same tensors in every fixture LoRA here, only
the metadata differs."""

import logging

import pytest
import torch
from graphs import base, empty_latent, ksampler, sampler_custom
from safetensors.torch import load_file

SEED = 4321
FROM_LORA = {"steps": 0, "cfg": 0.0, "gamma": -1.0}
BRANCHES = {  # name: (fixture LoRA, KSampler settings)
    "meta_auto": ("lora_meta4", FROM_LORA),
    "meta_set": ("lora_meta4", {"steps": 4, "cfg": 1.5, "gamma": 0.3}),
    "bare_auto": ("lora_bare", FROM_LORA),
    "bare_set": ("lora_bare", {"steps": 2, "cfg": 1.0, "gamma": 1.0}),
    "stock_auto": ("stock", FROM_LORA),
}


def add_loader(prompt, name, class_type, lora_name):
    """A LoRA loader node `name` on the checkpoint; returns its MODEL output."""
    prompt[name] = {
        "class_type": class_type,
        "inputs": {
            "model": ["ckpt", 0],
            "clip": ["ckpt", 1],
            "lora_name": lora_name,
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    }
    return [name, 0]


@pytest.fixture(scope="module")
def prompt_run(comfy, fixture_paths):
    """One prompt: each branch's KSampler on its LoRA's model (the stock LoraLoader attaches no settings), the
    records logged while it ran, and {branch: latent}."""
    prompt, _, _ = base(fixture_paths["checkpoint"].name, fixture_paths["lora_kohya"].name)
    models = {
        "lora_meta4": add_loader(prompt, "meta4", "ScottLoraLoader", fixture_paths["lora_meta4"].name),
        "lora_bare": add_loader(prompt, "bare", "ScottLoraLoader", fixture_paths["lora_bare"].name),
        "stock": add_loader(prompt, "stock", "LoraLoader", fixture_paths["lora_bare"].name),
    }
    latent = empty_latent(prompt)
    for name, (lora, settings) in BRANCHES.items():
        ksampler(prompt, name, models[lora], latent, SEED, **settings)
    return run_logged(comfy, prompt, BRANCHES)


def run_logged(comfy, prompt, branches):
    """Run the prompt; (the log records emitted while it ran, {branch: its saved latent})."""
    handler = ListHandler()
    logging.getLogger().addHandler(handler)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        result = comfy.run(prompt)
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    assert result["ok"], result["error"]
    latents = {
        name: load_file(str(comfy.output_files(result, "latents", f"{name}_")[-1]))["latent_tensor"]
        for name in branches
    }
    return handler.messages, latents


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_lora_metadata_gives_the_same_latents_as_the_same_values_set_by_hand(prompt_run):
    _, latents = prompt_run
    assert torch.equal(latents["meta_auto"], latents["meta_set"])  # scott.steps=4, scott.cfg=1.5, gamma 0.3
    assert (latents["meta_auto"] - latents["bare_auto"]).abs().max() > 1e-3  # the metadata changed the result


def test_a_lora_without_metadata_gets_two_steps_cfg_one_gamma_one(prompt_run):
    _, latents = prompt_run
    assert torch.equal(latents["bare_auto"], latents["bare_set"])
    assert torch.equal(latents["stock_auto"], latents["bare_set"])  # stock loader: no settings, same fallbacks


def test_the_values_used_are_logged_with_their_origin(prompt_run):
    messages, _ = prompt_run
    lines = [m for m in messages if m.startswith("SCott KSampler: ")]
    assert (
        "SCott KSampler: steps 4 (from the LoRA), cfg 1.5 (from the LoRA), gamma 0.3 (from the LoRA)" in lines
    )
    assert "SCott KSampler: steps 4 (as set), cfg 1.5 (as set), gamma 0.3 (as set)" in lines
    fallback = (
        "SCott KSampler: steps 2 (fallback: no scott.steps metadata), cfg 1 (fallback: no scott.cfg metadata), "
        "gamma 1 (fallback: no scott.gamma metadata)"
    )
    assert lines.count(fallback) == 2  # the bare LoRA through SCott LoRA Loader and through the stock loader
    assert len(lines) == len(BRANCHES)


def test_out_of_range_metadata_names_the_key_and_the_fix(comfy, fixture_paths):
    prompt, _, _ = base(fixture_paths["checkpoint"].name, fixture_paths["lora_kohya"].name)
    model = add_loader(prompt, "bad", "ScottLoraLoader", fixture_paths["lora_badsteps"].name)
    ksampler(prompt, "badsteps", model, empty_latent(prompt), SEED + 1, **FROM_LORA)
    result = comfy.run(prompt)
    assert not result["ok"]
    message = result["error"]["exception_message"]
    assert "the LoRA's scott.steps=40 is not an integer in 1..16: set steps on the sampler instead" in message


SCHEDULER_BRANCHES = {  # name: (fixture LoRA, SCott Scheduler steps)
    "sched_meta_auto": ("lora_meta4", 0),
    "sched_meta_set": ("lora_meta4", 4),
    "sched_bare_auto": ("lora_bare", 0),
    "sched_bare_set": ("lora_bare", 2),
}


@pytest.fixture(scope="module")
def scheduler_run(comfy, fixture_paths):
    """SamplerCustom + SCott Sampler (gamma 1) + SCott Scheduler, steps from the LoRA or set by hand."""
    prompt, _, _ = base(fixture_paths["checkpoint"].name, fixture_paths["lora_kohya"].name)
    models = {
        "lora_meta4": add_loader(prompt, "meta4", "ScottLoraLoader", fixture_paths["lora_meta4"].name),
        "lora_bare": add_loader(prompt, "bare", "ScottLoraLoader", fixture_paths["lora_bare"].name),
    }
    latent = empty_latent(prompt)
    for name, (lora, steps) in SCHEDULER_BRANCHES.items():
        sampler_custom(prompt, name, models[lora], latent, SEED, steps=steps, cfg=1.0, gamma=1.0)
    return run_logged(comfy, prompt, SCHEDULER_BRANCHES)


def test_scheduler_steps_zero_take_the_loras_steps_else_two(scheduler_run):
    messages, latents = scheduler_run
    assert torch.equal(latents["sched_meta_auto"], latents["sched_meta_set"])  # scott.steps = 4
    assert torch.equal(latents["sched_bare_auto"], latents["sched_bare_set"])  # no metadata: 2 steps
    assert (latents["sched_meta_auto"] - latents["sched_bare_auto"]).abs().max() > 1e-3
    lines = sorted(m for m in messages if m.startswith("SCott Scheduler: "))
    assert lines == [
        "SCott Scheduler: steps 2 (as set)",
        "SCott Scheduler: steps 2 (fallback: no scott.steps metadata)",
        "SCott Scheduler: steps 4 (as set)",
        "SCott Scheduler: steps 4 (from the LoRA)",
    ]


def test_scheduler_with_out_of_range_metadata_names_the_key_and_the_fix(comfy, fixture_paths):
    prompt, _, _ = base(fixture_paths["checkpoint"].name, fixture_paths["lora_kohya"].name)
    model = add_loader(prompt, "bad", "ScottLoraLoader", fixture_paths["lora_badsteps"].name)
    sampler_custom(prompt, "sched_bad", model, empty_latent(prompt), SEED + 2, steps=0)
    result = comfy.run(prompt)
    assert not result["ok"]
    message = result["error"]["exception_message"]
    assert "the LoRA's scott.steps=40 is not an integer in 1..16: set steps on the sampler instead" in message
