"""SCott LoRA Loader: an SD1.5 or SDXL consistency LoRA (kohya, diffusers or peft keys) + the boundary condition."""

import logging

import comfy.lora
import folder_paths
from comfy_api.latest import io

from ..scott_core import families, lora_format
from .model_sampling import CATEGORY, attach_lora_settings, model_family, patch_model_sampling


class ScottLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ScottLoraLoader",
            display_name="SCott LoRA Loader",
            category=CATEGORY,
            description=(
                "Loads a consistency LoRA (SCott, LCM-LoRA, TCD, Hyper-SD, DMD2, Lightning, PCM; kohya, diffusers "
                "or peft keys) onto an SD1.5- or SDXL-family model (SDXL's two text encoders included) and switches "
                "the model to the consistency boundary condition. "
                "Its scott.steps / scott.cfg / scott.gamma metadata become the samplers' \"from the LoRA\" "
                "values. Fails loudly on keys that match nothing instead of dropping them."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="An SD1.5- or SDXL-family (eps-prediction) checkpoint's MODEL."
                ),
                io.Clip.Input("clip", tooltip="The same checkpoint's CLIP (text-encoder LoRA keys go here)."),
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="A .safetensors LoRA from ComfyUI's loras folder (no pickles).",
                ),
                io.Float.Input(
                    "strength_model",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="LoRA scale on the UNet; 1.0 is what consistency LoRAs are trained for.",
                ),
                io.Float.Input(
                    "strength_clip",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="LoRA scale on the text encoder(s) (only used if the LoRA has text-encoder keys).",
                ),
            ],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model, strength_clip) -> io.NodeOutput:
        state_dict, metadata = lora_format.read_safetensors(
            folder_paths.get_full_path_or_raise("loras", lora_name)
        )
        family = check_families(lora_name, lora_format.detect_family(state_dict), model)
        kohya = lora_format.to_kohya(state_dict, metadata, family)
        key_map = comfy.lora.model_lora_keys_clip(
            clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {})
        )
        check_all_keys_match(lora_name, kohya, key_map)
        patches = comfy.lora.load_lora(kohya, key_map, log_missing=False)
        new_model, new_clip = model.clone(), clip.clone()
        applied = set(new_model.add_patches(patches, strength_model)) | set(
            new_clip.add_patches(patches, strength_clip)
        )
        if len(applied) != len(patches):
            missing = sorted(set(patches) - applied)
            raise lora_format.LoraFormatError(
                f"{len(missing)} LoRA patches were not applied, e.g. {missing[:3]}"
            )
        settings = lora_format.sampling_defaults(metadata)
        logging.info(
            f"SCott LoRA Loader: {lora_name}: {len(patches)} layers patched; metadata settings {settings or 'none'}"
        )
        return io.NodeOutput(attach_lora_settings(patch_model_sampling(new_model), settings), new_clip)


def check_families(lora_name, lora_family, model):
    """The model's family when the LoRA is of that family (or of none detected), else an error naming both."""
    try:
        family = model_family(model)
    except families.UnsupportedModel as error:
        raise lora_format.LoraFormatError(f"LoRA {lora_name!r} is for {lora_family}, {error}") from None
    if lora_family not in (family.name, "unknown"):
        raise lora_format.LoraFormatError(
            f"LoRA {lora_name!r} is for {lora_family}, the model is {family.name}: SCott needs a LoRA of the "
            "model's family (an SD1.5 LoRA on an SD1.5-family model, an SDXL LoRA on an SDXL-family model)"
        )
    return family


def check_all_keys_match(lora_name, kohya, key_map):
    """Every LoRA module names a layer of this model or its CLIP, or an error with the count and examples."""
    names = sorted(k[: -len(".alpha")] for k in kohya if k.endswith(".alpha"))
    unmatched = [n for n in names if n not in key_map]
    if unmatched:
        raise lora_format.LoraFormatError(
            f"{len(unmatched)} of {len(names)} LoRA modules in {lora_name!r} match no layer of this model "
            f"or CLIP, e.g. {unmatched[:3]}: the LoRA is for another architecture"
        )
