"""The model families SCott supports, as data (one frozen entry each, in the manner of ComfyUI's supported_models
classes), and a one-line refusal for every other model a host may hand over.

Both supported families share the discrete eps schedule of METHOD.md section 1 (1000 steps, scaled-linear betas
0.00085..0.012), so the consistency boundary condition and the samplers are the same for both; what differs is
listed here. Sources: ComfyUI comfy/supported_models.py (config classes, latent scale factors), comfy/lora.py and
kohya sd-scripts networks/lora.py (kohya prefixes), diffusers' pipeline component names (diffusers prefixes), kohya
sd-scripts train_util.py (buckets 256..1024 at 512 px; SDXL: the same rule at 1024 px, as training/buckets.py).
"""

from dataclasses import dataclass

SUPPORTED = "SCott's nodes and sampler support eps-prediction SD1.5- and SDXL-family models"


@dataclass(frozen=True)
class Family:
    """One supported model family: what the nodes, the LoRA formats and the trainer need to know about it."""

    name: str
    display_name: str
    comfy_configs: tuple  # ComfyUI model-config class names (comfy/supported_models.py) of this family
    prediction: str
    cross_attention_dim: int
    kohya_prefixes: tuple  # (part, kohya key prefix) per model part
    diffusers_prefixes: tuple  # (part, diffusers/peft key prefix) per model part
    latent_scale: float
    beta_range: tuple  # scaled-linear betas (start, end) of the 1000-step schedule
    default_resolution: int
    bucket_range: tuple  # (min, max) bucket side in pixels


SD15 = Family(
    name="sd15",
    display_name="SD1.5",
    comfy_configs=("SD15",),
    prediction="eps",
    cross_attention_dim=768,
    kohya_prefixes=(("unet", "lora_unet_"), ("text_encoder", "lora_te_")),
    diffusers_prefixes=(("unet", "unet."), ("text_encoder", "text_encoder.")),
    latent_scale=0.18215,
    beta_range=(0.00085, 0.012),
    default_resolution=512,
    bucket_range=(256, 1024),
)
SDXL = Family(
    name="sdxl",
    display_name="SDXL",
    comfy_configs=("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"),
    prediction="eps",
    cross_attention_dim=2048,
    kohya_prefixes=(("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")),
    diffusers_prefixes=(("unet", "unet."), ("text_encoder", "text_encoder."), ("text_encoder_2", "text_encoder_2.")),
    latent_scale=0.13025,
    beta_range=(0.00085, 0.012),
    default_resolution=1024,
    bucket_range=(512, 2048),
)
FAMILIES = {family.name: family for family in (SD15, SDXL)}

# ComfyUI config class -> (short name, what it is) for the families SCott refuses outright.
REFUSED_CONFIGS = {
    **dict.fromkeys(("SD20", "SD21UnclipL", "SD21UnclipH", "LotusD"), ("sd2", "SD2.x")),
    "SDXLRefiner": ("sdxl_refiner", "the SDXL refiner, a second-stage model"),
    "SD15_instructpix2pix": ("sd15_instructpix2pix", "an SD1.5 InstructPix2Pix model, 8 input channels"),
    "SDXL_instructpix2pix": ("sdxl_instructpix2pix", "an SDXL InstructPix2Pix model, 8 input channels"),
    "SD3": ("sd3", "SD3, rectified flow"),
    **dict.fromkeys(("Flux", "FluxSchnell", "FluxInpaint"), ("flux", "Flux, rectified flow")),
}
# ComfyUI ModelType name of an SDXL-family model -> (short name, what it is) where it is not eps.
REFUSED_PREDICTIONS = {
    "EDM": ("playground_v2.5", "Playground v2.5, EDM"),
    "V_PREDICTION_EDM": ("sdxl_vpred_edm", "a v-prediction EDM SDXL model such as CosXL"),
    "V_PREDICTION": ("sdxl_vpred", "a v-prediction SDXL fine-tune such as NoobAI's v-pred line"),
}


class UnsupportedModel(ValueError):
    """A model SCott refuses; `name` is its short family name, `what` says what it is; the message names both and
    what is supported, after an optional prefix (the node that refused it)."""

    def __init__(self, name, what, prefix=""):
        super().__init__(f"{prefix}the model is {name} ({what}): {SUPPORTED}")
        self.name, self.what = name, what


def family_of(config_name, model_type="EPS", in_channels=4, zero_terminal_snr=False):
    """The Family of a model from what ComfyUI detected (config class name, ModelType name, UNet input channels,
    zero-terminal-SNR flag); UnsupportedModel naming it for anything else."""
    if config_name in REFUSED_CONFIGS:
        raise UnsupportedModel(*REFUSED_CONFIGS[config_name])
    family = next((f for f in FAMILIES.values() if config_name in f.comfy_configs), None)
    if family is None:
        raise UnsupportedModel(config_name, "not an SD1.5- or SDXL-family model")
    if in_channels != 4:
        what = f"an {family.display_name} inpainting model, {in_channels} input channels"
        raise UnsupportedModel(f"{family.name}_inpaint", what)
    if model_type in REFUSED_PREDICTIONS:
        name, what = REFUSED_PREDICTIONS[model_type]
        raise UnsupportedModel(name, what + (", zero terminal SNR" if zero_terminal_snr else ""))
    if model_type != "EPS" or zero_terminal_snr:
        what = f"{family.display_name} with {model_type} prediction" + (", zero terminal SNR" * zero_terminal_snr)
        raise UnsupportedModel(f"{family.name}_{model_type.lower()}", what)
    return family
