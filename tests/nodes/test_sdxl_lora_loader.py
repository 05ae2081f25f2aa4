"""SCott LoRA Loader on SDXL-family models in real ComfyUI: the fixture LoRA in kohya (diffusers paths), kohya
(original UNet paths), diffusers and peft keys patches every module of the UNet and of both text encoders (0 dropped)
to W + strength * alpha / rank * up @ down; the public few-step SDXL LoRAs' key layouts (public_sdxl_loras.py) map every
module to a layer of a full-size SDXL of the right shape; a LoRA of the other family and a v-prediction SDXL are
refused in one line naming both."""

import math

import pytest
import torch
from public_sdxl_loras import LAYOUTS, PUBLIC_LORAS, SDXL_UNET_CONFIG, sdxl_unet_modules, state_dict
from sdxl_fixtures import LORA_FORMATS, LORA_METADATA, diffusers_modules

from scott_core import families, lora_format

STRENGTH = 0.5


@pytest.fixture(scope="module")
def sdxl(comfy, fixture_paths):
    from comfy import sd as comfy_sd

    return comfy_sd.load_checkpoint_guess_config(str(fixture_paths["sdxl_checkpoint"]), output_vae=False)[:2]


def run_loader(comfy, model, clip, name, strength=STRENGTH):
    return comfy.nodes.NODE_CLASS_MAPPINGS["ScottLoraLoader"].execute(model, clip, name, strength, strength).result


def patched(patcher, keys):
    """The values of `keys` (those the patcher's model has) with the patcher's patches applied."""
    patcher.patch_model()
    try:
        state = patcher.model.state_dict()
        return {k: state[k].detach().clone() for k in keys if k in state}
    finally:
        patcher.unpatch_model()


def comfy_key(part, path, to_ldm):
    """Where ComfyUI keeps the weight of a diffusers-named module."""
    if part == "unet":
        return "diffusion_model." + to_ldm[f"{path}.weight"]
    return {"text_encoder": "clip_l.transformer.", "text_encoder_2": "clip_g.transformer."}[part] + f"{path}.weight"


def test_every_format_patches_every_module_of_unet_and_both_text_encoders(comfy, fixture_paths, sdxl):
    from comfy import utils as comfy_utils
    from sdxl_fixtures import SDXL_UNET

    model, clip = sdxl
    mods = diffusers_modules(fixture_paths["sdxl_lora_diffusers"])
    to_ldm = comfy_utils.unet_to_diffusers(SDXL_UNET)
    keys = [comfy_key(part, path, to_ldm) for part, path in mods]
    base = {**patched(model, keys), **patched(clip.patcher, keys)}
    n_unet = sum(part == "unet" for part, _ in mods)
    weights = {}
    for fmt in LORA_FORMATS:
        new_model, new_clip = run_loader(comfy, model, clip, fixture_paths[f"sdxl_lora_{fmt}"].name)
        assert len(new_model.patches) == n_unet
        assert len(new_clip.patcher.patches) == (0 if fmt == "peft" else len(mods) - n_unet)  # peft: UNet only
        assert comfy.pack("nodes.model_sampling").lora_settings(new_model.model_options) == {
            k.removeprefix("scott."): float(v) for k, v in LORA_METADATA.items()
        }
        weights[fmt] = {**patched(new_model, keys), **patched(new_clip.patcher, keys)}
    for (part, path), (down, up, scale) in mods.items():
        key = comfy_key(part, path, to_ldm)
        w = base[key]
        delta = (up.flatten(1).double() @ down.flatten(1).double()).reshape(w.shape)
        expected = w.double() + STRENGTH * scale * delta
        tolerance = 1e-5 if part == "unet" else 2e-3  # ComfyUI keeps CPU text encoders in fp16
        assert torch.allclose(weights["kohya"][key].double(), expected, atol=tolerance), (part, path)
        for fmt in LORA_FORMATS[1:]:
            if fmt != "peft" or part == "unet":
                assert torch.equal(weights[fmt][key], weights["kohya"][key]), (fmt, part, path)


def test_the_fixture_is_sdxl_family_for_comfyui_and_for_scott(comfy, sdxl):
    """ComfyUI detects the reduced fixture as Segmind_Vega (eps); model_family maps it to the SDXL entry."""
    model = sdxl[0]
    assert type(model.model.model_config).__name__ == "Segmind_Vega" and model.model.model_type.name == "EPS"
    assert comfy.pack("nodes.model_sampling").model_family(model).name == "sdxl"  # the pack's own Family class


def test_an_sd15_lora_on_an_sdxl_model_names_both_families(comfy, fixture_paths, sdxl):
    with pytest.raises(ValueError) as info:  # the pack's LoraFormatError (ComfyUI imports the pack under its path)
        run_loader(comfy, *sdxl, fixture_paths["lora_kohya"].name)
    assert str(info.value) == (
        "LoRA 'scott_test_lora_kohya.safetensors' is for sd15, the model is sdxl: SCott needs a LoRA of the model's "
        "family (an SD1.5 LoRA on an SD1.5-family model, an SDXL LoRA on an SDXL-family model)"
    )


VPRED = (
    "the model is sdxl_vpred (a v-prediction SDXL fine-tune such as NoobAI's v-pred line, zero terminal SNR): "
    f"{families.SUPPORTED}"
)


def test_a_vpred_ztsnr_sdxl_is_refused_by_name_in_the_samplers_and_the_loader(comfy, fixture_paths):
    """The SDXL UNet with ComfyUI's v_pred + ztsnr marker keys, through UNETLoader, as NoobAI's v-pred files load;
    SCott Scheduler (the check SCott KSampler shares) and SCott LoRA Loader refuse it."""
    prompt = {
        "unet": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": fixture_paths["sdxl_vpred_unet"].name, "weight_dtype": "default"},
        },
        "sigmas": {
            "class_type": "ScottScheduler",
            "inputs": {"model": ["unet", 0], "steps": 2, "denoise": 1.0, "timesteps": ""},
        },
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["sigmas", 0]}},
    }
    result = comfy.run(prompt)
    assert not result["ok"] and result["error"]["exception_message"].strip() == f"SCott Scheduler: {VPRED}"
    checkpoint = fixture_paths["sdxl_checkpoint"].name
    prompt["ckpt"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}
    prompt["lora"] = {
        "class_type": "ScottLoraLoader",
        "inputs": {
            "model": ["unet", 0],
            "clip": ["ckpt", 1],
            "lora_name": fixture_paths["sdxl_lora_kohya"].name,
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    }
    prompt["sigmas"]["inputs"]["model"] = ["lora", 0]
    result = comfy.run(prompt)
    expected = f"LoRA 'scott_test_sdxl_lora_kohya.safetensors' is for sdxl, {VPRED}"
    assert not result["ok"] and result["error"]["exception_message"].strip() == expected


@pytest.fixture(scope="module")
def full_size_sdxl(comfy_modules):
    """ComfyUI's LoRA key map of a full-size SDXL (its UNet config detected by ComfyUI from diffusers' SDXL UNet,
    built on the meta device) and of its SDXL text encoders, with the UNet's weight shapes."""
    from comfy import lora as comfy_lora
    from comfy import model_base, model_detection, sdxl_clip
    from comfy import utils as comfy_utils
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        diffusers_unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    config = model_detection.model_config_from_unet_config(
        model_detection.unet_config_from_diffusers_unet(diffusers_unet.state_dict())
    )
    assert type(config).__name__ == "SDXL"
    model = model_base.SDXL(config, device="meta")
    with torch.device("meta"):
        clip = sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    key_map = comfy_lora.model_lora_keys_clip(clip, comfy_lora.model_lora_keys_unet(model, {}))
    shapes = {k: tuple(v.shape) for k, v in {**model.state_dict(), **clip.state_dict()}.items()}
    to_ldm = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in
              comfy_utils.unet_to_diffusers(config.unet_config).items()}
    return key_map, shapes, to_ldm


def test_the_lcm_target_set_has_the_size_lcm_lora_and_lightning_document():
    """788 modules (SDXL-Lightning's re-pack card) and 196.75 M parameters at rank 64 (LCM-LoRA-SDXL's model card:
    197 M), counted on diffusers' full-size SDXL UNet."""
    modules = sdxl_unet_modules()
    params = sum(64 * (shape[0] + math.prod(shape[1:])) for shape in modules.values())
    assert len(modules) == 788 and round(params / 1e6) == 197


@pytest.mark.parametrize(
    "lora, layout", [(lora, layout) for lora, layouts in PUBLIC_LORAS.items() for layout in layouts]
)
def test_public_layouts_map_every_module_to_a_layer_of_the_right_shape(comfy, full_size_sdxl, lora, layout):
    """The loader's path (family check, to_kohya with SDXL's prefixes, every module matched, ComfyUI's load_lora) on
    rank-64 factors of the exact shapes: one patch per module, each onto a weight of shape up @ down."""
    from comfy import lora as comfy_lora

    key_map, shapes, to_ldm = full_size_sdxl
    sd = state_dict(LAYOUTS[layout], sdxl_unet_modules(), to_ldm)
    assert lora_format.detect_family(sd) == "sdxl"
    kohya = lora_format.to_kohya(sd, None, families.SDXL)
    comfy.pack("nodes.loader").check_all_keys_match(lora, kohya, key_map)
    patches = comfy_lora.load_lora(kohya, key_map, log_missing=False)
    assert len(patches) == 788 + (264 if LAYOUTS[layout].text_encoders else 0)  # CLIP-L 12 x 6, bigG 32 x 6 linears
    for target, patch in patches.items():
        up, down = patch.weights[0], patch.weights[1]
        assert shapes[target] == (up.shape[0], down.shape[1], *down.shape[2:]), target
