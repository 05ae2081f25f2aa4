"""SCott Sampler (SAMPLER), SCott Scheduler (SIGMAS) and SCott KSampler (the one-node path)."""

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..scott_core import sampling, schedule
from .model_sampling import CATEGORY, check_sd15, is_patched, patch_model_sampling

GAMMA_TOOLTIP = (
    "Re-noise strength between steps, 0..1: 1 = full re-noise (the SCott paper's and LCM's sampler), 0 = "
    "deterministic, between = TCD's gamma. -1 = the LoRA's recommended value (its metadata), else 1.0."
)
MAX_STEPS = 16


def sample_scott(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=-1.0):
    """KSAMPLER function: scott_core.sampling.sample_scott_k, gamma -1 resolved from the LoRA's metadata,
    Cancel checked after every step."""
    if gamma < 0:  # the patched model sampling carries the LoRA's metadata defaults
        defaults = getattr(model.inner_model.inner_model.model_sampling, "scott_defaults", {})
        gamma = defaults.get("gamma", 1.0)

    def step_callback(info):
        if callback is not None:
            callback(info)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return sampling.sample_scott_k(model, x, sigmas, extra_args, step_callback, disable, gamma=gamma)


def scott_sigmas(steps, denoise, timesteps=""):
    """SIGMAS on LCM's origin grid (steps, denoise), or at an explicit comma-separated timestep list."""
    if timesteps.strip():
        chosen = schedule.parse_timesteps(timesteps)
    else:
        chosen = schedule.lcm_timesteps(steps, denoise)
    return schedule.sigmas_for_timesteps(chosen, schedule.alphas_cumprod())


def gamma_input():
    return io.Float.Input("gamma", default=-1.0, min=-1.0, max=1.0, step=0.01, tooltip=GAMMA_TOOLTIP)


def steps_input():
    return io.Int.Input(
        "steps",
        default=2,
        min=1,
        max=MAX_STEPS,
        tooltip="Consistency steps, 1..16; 2-4 is what consistency LoRAs are for (the paper: 1, 2, 4).",
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
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_scott, extra_options={"gamma": gamma}))


class ScottScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ScottScheduler",
            display_name="SCott Scheduler",
            category=CATEGORY,
            description="Sigmas at LCM's timesteps (e.g. 2 steps: 999, 499), or at your own timestep list.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5-family model being sampled (checks its family)."),
                steps_input(),
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
        check_sd15(model, "SCott Scheduler")
        return io.NodeOutput(scott_sigmas(steps, denoise, timesteps or ""))


class ScottKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ScottKSampler",
            display_name="SCott KSampler",
            category=CATEGORY,
            description="One node: SCott sampler + LCM timestep schedule at consistency-model defaults "
            "(2 steps, "
            "cfg 1). Applies the consistency boundary condition if the model does not have it yet.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="A model from SCott LoRA Loader (or any SD1.5 consistency model)."
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seed of the start noise and of every re-noise.",
                ),
                steps_input(),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance; consistency LoRAs want 1.0 (negative prompt unused, "
                    "fastest) to 2.0. Higher burns the image.",
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
        check_sd15(model, "SCott KSampler")
        sigmas = scott_sigmas(steps, denoise)
        if not is_patched(model):
            model = patch_model_sampling(model)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        samples = comfy.sample.sample_custom(
            model,
            noise,
            cfg,
            comfy.samplers.KSAMPLER(sample_scott, extra_options={"gamma": gamma}),
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
