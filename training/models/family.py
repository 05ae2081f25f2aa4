"""The trainer's side of a model family (scott_core.families holds what the nodes share): its shipped component
configs, its diffusers pipeline, how it encodes captions, its added conditioning and its LoRA's kohya metadata. One
entry per family; the loader, encoders, step, cache, synthesis, validation, export and evaluation read the entry
they are handed instead of asking which family it is."""

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from scott_core import families

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclass(frozen=True)
class ModelFamily:
    """How the trainer loads, conditions and exports one supported family."""

    core: families.Family  # the shared table's entry: name, prefixes, default resolution, bucket range
    assets: Path  # shipped component configs and tokenizers: what a single-file checkpoint is loaded against
    pipeline: str  # the diffusers text-to-image pipeline class
    pipeline_kwargs: dict = field(hash=False)  # what that pipeline is built with besides its components
    text_encoders: tuple = ("text_encoder",)  # pipeline components, in the order their states are concatenated
    tokenizers: tuple = ("tokenizer",)  # the tokenizer of each text encoder
    penultimate: bool = False  # hidden states of the penultimate layer (SDXL) or the last, final-normed (SD1.5)
    pooled_from: str | None = None  # the text encoder whose projected pooled output is SDXL's text_embeds
    time_ids: bool = False  # SDXL's size conditioning: original size, crop top-left, target size
    zero_uncond: bool = False  # the unconditional embedding is zeros (SDXL's force_zeros_for_empty_prompt)
    vae_fp32_under_fp16: bool = False  # the VAE overflows in fp16 (SDXL's): it stays fp32, as the LCM-SDXL script
    kohya_base_version: str = "sd_v1"  # kohya's ss_base_model_version of the exported LoRA
    modelspec_architecture: str = "stable-diffusion-v1/lora"

    @property
    def name(self):
        return self.core.name

    def conditioned(self, cond, sizes):
        """`cond` with the time ids of `sizes` [B, 6] (original h, w, crop top, left, target h, w) where the family
        takes size conditioning, else as it is."""
        return replace(cond, time_ids=sizes.to(cond.states.device).float()) if self.time_ids else cond

    def uncond(self, empty):
        """The unconditional embedding from the empty caption's: zeros where the family's is (SDXL), else itself."""
        return empty.map(torch.zeros_like) if self.zero_uncond else empty


def square_sizes(height, width, count=1):
    """The sizes [count, 6] of an image drawn at height x width: original = target, no crop (the pipeline's
    default time ids)."""
    return torch.tensor([[height, width, 0, 0, height, width]] * count)


SD15 = ModelFamily(
    core=families.SD15,
    assets=ASSETS / "sd15",
    pipeline="StableDiffusionPipeline",
    pipeline_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
)
SDXL = ModelFamily(
    core=families.SDXL,
    assets=ASSETS / "sdxl",
    pipeline="StableDiffusionXLPipeline",
    pipeline_kwargs={"add_watermarker": False},
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    penultimate=True,
    pooled_from="text_encoder_2",
    time_ids=True,
    zero_uncond=True,
    vae_fp32_under_fp16=True,
    kohya_base_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
)
FAMILIES = {family.name: family for family in (SD15, SDXL)}


def trainer_family(core):
    """The trainer's entry for a scott_core.families.Family."""
    return FAMILIES[core.name]
