"""The consistency boundary condition as a ComfyUI model-sampling object, patched onto a model clone."""

import comfy.model_sampling

from ..scott_core.consistency import consistency_function
from ..scott_core.lora_format import LoraFormatError

CATEGORY = "sampling/scott"


class ScottModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """SD1.5 discrete eps sampling whose denoised output is f(z, t) = c_skip z + c_out x0 (as core "lcm"),
    with t the nearest integer timestep and z = x / sqrt(1 + sigma^2) the VP latent; carries the LoRA's
    recommended sampling settings (metadata) in `scott_defaults`."""

    scott_defaults = {}

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


def patch_model_sampling(model, defaults=None):
    """A clone of `model` whose model_sampling applies the consistency boundary condition."""
    clone = model.clone()
    sampling = ScottModelSampling(model.model.model_config)
    sampling.scott_defaults = dict(defaults or {})
    clone.add_object_patch("model_sampling", sampling)
    return clone


def lora_defaults(model):
    """The LoRA's recommended {"steps", "gamma", "cfg"} a SCott LoRA Loader recorded on this model, or {}."""
    return dict(getattr(model.get_model_object("model_sampling"), "scott_defaults", {}))
