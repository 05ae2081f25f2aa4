"""What SCott LoRA Loader leaves on a model for the samplers: the consistency boundary condition as a ComfyUI
model-sampling object (patched onto a clone) and the LoRA's recommended settings as a model option."""

import comfy.model_sampling

from ..scott_core.consistency import consistency_function
from ..scott_core.lora_format import LoraFormatError

CATEGORY = "sampling/scott"
# model_options key (ModelPatcher.model_options, copied to every clone and handed to sampler functions in
# extra_args["model_options"]): the LoRA's metadata settings {"steps", "gamma", "cfg"}, those present.
LORA_SETTINGS = "scott_lora_settings"


class ScottModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """SD1.5 discrete eps sampling whose denoised output is f(z, t) = c_skip z + c_out x0 (as core "lcm"),
    with t the nearest integer timestep and z = x / sqrt(1 + sigma^2) the VP latent."""

    def calculate_denoised(self, sigma, model_output, model_input):
        x0 = super().calculate_denoised(sigma, model_output, model_input)
        timestep = self.timestep(sigma.reshape(-1)).reshape(-1)
        sigma = comfy.model_sampling.reshape_sigma(sigma.reshape(-1), model_input.ndim)
        z = model_input / (1 + sigma**2).sqrt()
        return consistency_function(z, x0, timestep)


def model_family(model):
    """sd15, sd2, sdxl or the ComfyUI model config's class name, from the UNet config ComfyUI detected."""
    config = model.model.model_config
    unet = config.unet_config
    if unet.get("adm_in_channels") or unet.get("context_dim") == 2048:
        return "sdxl"
    if unet.get("context_dim") == 1024 and unet.get("model_channels") == 320:
        return "sd2"
    if unet.get("context_dim") == 768 and unet.get("model_channels") == 320:
        return "sd15"
    return type(config).__name__


def check_sd15(model, what="this node"):
    """Raise a message naming the model's family unless it is SD1.5-family (the schedule SCott uses)."""
    family = model_family(model)
    if family != "sd15":
        raise LoraFormatError(f"{what} needs an SD1.5-family model, but the model is {family}")


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
