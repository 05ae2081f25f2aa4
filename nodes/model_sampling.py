"""What SCott LoRA Loader leaves on a model for the samplers: the consistency boundary condition as a ComfyUI
model-sampling object (patched onto a clone) and the LoRA's recommended settings as a model option."""

import comfy.model_sampling

from ..scott_core import families
from ..scott_core.consistency import consistency_function

CATEGORY = "sampling/scott"
# model_options key (ModelPatcher.model_options, copied to every clone and handed to sampler functions in
# extra_args["model_options"]): the LoRA's metadata settings {"steps", "gamma", "cfg"}, those present.
LORA_SETTINGS = "scott_lora_settings"


class ScottModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """SD1.5/SDXL discrete eps sampling whose denoised output is f(z, t) = c_skip z + c_out x0 (as core "lcm"),
    with t the nearest integer timestep and z = x / sqrt(1 + sigma^2) the VP latent."""

    def calculate_denoised(self, sigma, model_output, model_input):
        x0 = super().calculate_denoised(sigma, model_output, model_input)
        timestep = self.timestep(sigma.reshape(-1)).reshape(-1)
        sigma = comfy.model_sampling.reshape_sigma(sigma.reshape(-1), model_input.ndim)
        z = model_input / (1 + sigma**2).sqrt()
        return consistency_function(z, x0, timestep)


def model_family(model):
    """The scott_core.families entry of a ComfyUI MODEL, from what ComfyUI detected (config class, model type, input
    channels, zero-terminal-SNR flag); families.UnsupportedModel naming the model for anything else."""
    config = model.model.model_config
    return families.family_of(
        type(config).__name__,
        model.model.model_type.name,
        config.unet_config.get("in_channels", 4),
        bool(config.sampling_settings.get("zsnr", False)),
    )


def check_supported(model, what="this node"):
    """The model's family, or UnsupportedModel whose message starts with the node's name."""
    try:
        return model_family(model)
    except families.UnsupportedModel as error:
        raise families.UnsupportedModel(error.name, error.what, prefix=f"{what}: ") from None


def is_patched(model):
    return isinstance(model.get_model_object("model_sampling"), ScottModelSampling)


def patch_model_sampling(model):
    """A clone of `model` whose model_sampling applies the consistency boundary condition."""
    clone = model.clone()
    clone.add_object_patch("model_sampling", ScottModelSampling(model.model.model_config))
    return clone


def attach_lora_settings(model, settings):
    """Record the LoRA's metadata settings on `model` (a clone the caller owns) for the samplers to read."""
    model.model_options[LORA_SETTINGS] = dict(settings)
    return model


def lora_settings(model_options):
    """The LoRA settings a SCott LoRA Loader attached ({} for any other model), from a model's model_options."""
    return dict((model_options or {}).get(LORA_SETTINGS, {}))
