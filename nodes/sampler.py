"""SCott Sampler (SAMPLER), SCott Scheduler (SIGMAS) and SCott KSampler (the one-node path)."""

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..scott_core import sampling, schedule
from ..scott_core.lora_format import LoraFormatError
from .model_sampling import CATEGORY, check_supported, is_patched, lora_settings, patch_model_sampling

MAX_STEPS = 16
MAX_CFG = 30.0
# What a setting left on "from the LoRA" becomes when the LoRA's metadata lacks it (LCM-LoRA, TCD, Hyper-SD, a LoRA
# loaded by another loader): the consistency-model defaults.
FALLBACK = {"steps": 2, "cfg": 1.0, "gamma": 1.0}
VALID = {
    "steps": (lambda v: v == int(v) and 1 <= v <= MAX_STEPS, f"an integer in 1..{MAX_STEPS}"),
    "cfg": (lambda v: 0 < v <= MAX_CFG, f"in (0, {MAX_CFG:g}]"),
    "gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}
GAMMA_TOOLTIP = (
    "Re-noise strength between steps, 0..1: 1 = full re-noise (the SCott paper's and LCM's sampler), 0 = "
    "deterministic, between = TCD's gamma. -1 = from the LoRA: its scott.gamma metadata, else 1.0."
)


def from_lora(name, value):
    """Whether a widget value means "from the LoRA": gamma below 0, steps or cfg 0."""
    return value < 0 if name == "gamma" else value <= 0


def resolve_settings(settings, model_options):
    """({name: value to sample with}, {name: where it came from}): a setting left on "from the LoRA" takes the
    LoRA's metadata (attached to the model by SCott LoRA Loader), else FALLBACK; others stay as set."""
    lora = lora_settings(model_options)
    values, sources = {}, {}
    for name, value in settings.items():
        if not from_lora(name, value):
            values[name], sources[name] = value, "as set"
        elif name in lora:
            check, valid = VALID[name]
            if not check(lora[name]):
                raise LoraFormatError(
                    f"the LoRA's scott.{name}={lora[name]} is not {valid}: set {name} on the sampler instead"
                )
            values[name], sources[name] = type(FALLBACK[name])(lora[name]), "from the LoRA"
        else:
            values[name], sources[name] = FALLBACK[name], f"fallback: no scott.{name} metadata"
    return values, sources


def log_settings(node, values, sources):
    """One line in ComfyUI's log with the settings a sampling actually uses and where each came from."""
    used = ", ".join(f"{name} {values[name]:g} ({sources[name]})" for name in values)
    logging.info(f"{node}: {used}")


def sample_scott(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=-1.0):
    """KSAMPLER function: scott_core.sampling.sample_scott_k, gamma -1 resolved from the LoRA's settings (a
    model option, in extra_args["model_options"]), Cancel checked after every step."""
    if from_lora("gamma", gamma):
        values, sources = resolve_settings({"gamma": gamma}, (extra_args or {}).get("model_options"))
        log_settings("SCott Sampler", values, sources)
        gamma = values["gamma"]

    def step_callback(info):
        if callback is not None:
            callback(info)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return sampling.sample_scott_k(model, x, sigmas, extra_args, step_callback, disable, gamma=gamma)


def scott_sampler(gamma):
    """The SAMPLER both nodes hand to ComfyUI: sample_scott with this gamma (-1 = from the LoRA)."""
    return comfy.samplers.KSAMPLER(sample_scott, extra_options={"gamma": gamma})


def scott_sigmas(steps, denoise, timesteps=""):
    """SIGMAS on LCM's origin grid (steps, denoise), or at an explicit comma-separated timestep list."""
    if timesteps.strip():
        chosen = schedule.parse_timesteps(timesteps)
    else:
        chosen = schedule.lcm_timesteps(steps, denoise)
    return schedule.sigmas_for_timesteps(chosen, schedule.alphas_cumprod())


def gamma_input():
    return io.Float.Input("gamma", default=-1.0, min=-1.0, max=1.0, step=0.01, tooltip=GAMMA_TOOLTIP)


def steps_input(from_lora_allowed=False):
    tooltip = "Consistency steps, 1..16; 2-4 is what consistency LoRAs are for (the paper: 1, 2, 4)."
    if from_lora_allowed:
        tooltip += " 0 = from the LoRA: its scott.steps metadata, else 2."
    return io.Int.Input(
        "steps",
        default=0 if from_lora_allowed else 2,
        min=0 if from_lora_allowed else 1,
        max=MAX_STEPS,
        tooltip=tooltip,
    )


def denoise_input():
    return io.Float.Input(
        "denoise",
        default=1.0,
        min=0.0,
        max=1.0,
        step=0.01,
        tooltip="1.0 = text-to-image; below 1 = img2img strength (the first 50*denoise LCM timesteps).",
    )


class ScottSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ScottSampler",
            display_name="SCott Sampler",
            category=CATEGORY,
            description="SCott multi-step consistency sampler for SamplerCustom / SamplerCustomAdvanced. "
            "Use a "
            "model from SCott LoRA Loader, SCott Scheduler sigmas and cfg 1-2.",
            inputs=[gamma_input()],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, gamma) -> io.NodeOutput:
        return io.NodeOutput(scott_sampler(gamma))


class ScottScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ScottScheduler",
            display_name="SCott Scheduler",
            category=CATEGORY,
            description="Sigmas at LCM's timesteps (e.g. 2 steps: 999, 499), or at your own timestep list. Steps "
            "0 (the default) = from the LoRA: the scott.steps metadata SCott LoRA Loader read, else 2; the value "
            "used is logged.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="The SD1.5- or SDXL-family model being sampled (checks its family; carries "
                    "the LoRA's settings from SCott LoRA Loader)."
                ),
                steps_input(from_lora_allowed=True),
                denoise_input(),
                io.String.Input(
                    "timesteps",
                    default="",
                    optional=True,
                    tooltip="Optional explicit timesteps, e.g. '999, 759, 499, 259' (integers 0..999, "
                    "decreasing); "
                    "overrides steps and denoise.",
                ),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps, denoise, timesteps="") -> io.NodeOutput:
        check_supported(model, "SCott Scheduler")
        if not (timesteps or "").strip():  # an explicit timestep list overrides steps: nothing to resolve
            used, sources = resolve_settings({"steps": steps}, model.model_options)
            log_settings("SCott Scheduler", used, sources)
            steps = used["steps"]
        return io.NodeOutput(scott_sigmas(steps, denoise, timesteps or ""))


class ScottKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ScottKSampler",
            display_name="SCott KSampler",
            category=CATEGORY,
            description="One node: SCott sampler + LCM timestep schedule. Steps, cfg and gamma default to "
            "\"from the LoRA\" (0, 0, -1): the scott.steps / scott.cfg / scott.gamma metadata SCott LoRA Loader "
            "read, else 2 steps, cfg 1.0, gamma 1.0; the values used are logged. Applies the consistency "
            "boundary condition if the model does not have it yet.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="A model from SCott LoRA Loader (or any SD1.5/SDXL consistency model)."
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seed of the start noise and of every re-noise.",
                ),
                steps_input(from_lora_allowed=True),
                io.Float.Input(
                    "cfg",
                    default=0.0,
                    min=0.0,
                    max=MAX_CFG,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance; consistency LoRAs want 1.0 (negative prompt unused, "
                    "fastest) to 2.0. Higher burns the image. 0 = from the LoRA: its scott.cfg metadata, else 1.0.",
                ),
                gamma_input(),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                denoise_input(),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(
        cls, model, seed, steps, cfg, gamma, positive, negative, latent_image, denoise
    ) -> io.NodeOutput:
        check_supported(model, "SCott KSampler")
        used, sources = resolve_settings({"steps": steps, "cfg": cfg, "gamma": gamma}, model.model_options)
        sigmas = scott_sigmas(used["steps"], denoise)
        log_settings("SCott KSampler", used, sources)
        if not is_patched(model):
            model = patch_model_sampling(model)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        samples = comfy.sample.sample_custom(
            model,
            noise,
            used["cfg"],
            scott_sampler(used["gamma"]),
            sigmas,
            positive,
            negative,
            latent,
            noise_mask=latent_image.get("noise_mask"),
            callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=seed,
        )
        return io.NodeOutput({**latent_image, "samples": samples})
