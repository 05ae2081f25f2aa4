"""SCott LoRA Loader in real ComfyUI: kohya, diffusers and peft files patch every module (0 dropped) to the
same weights, W + strength * alpha / rank * up @ down; ComfyUI's stock loader drops peft keys."""

import pytest
import torch
from graphs import base, empty_latent, ksampler
from safetensors.torch import load_file
from scott_fixtures import LORA_ALPHA, LORA_RANK, SD15_UNET

FORMATS = ("kohya", "diffusers", "peft")


@pytest.fixture(scope="module")
def loaded(comfy, fixture_paths):
    from comfy import sd as comfy_sd

    model, clip = comfy_sd.load_checkpoint_guess_config(str(fixture_paths["checkpoint"]), output_vae=False)[
        :2
    ]
    return model, clip


def lora_modules(fixture_paths):
    """{(part, diffusers path): (down, up)} from the kohya file (the fixtures' one set of tensors)."""
    from scott_core import lora_format

    mods = lora_format.modules(*lora_format.read_safetensors(fixture_paths["lora_kohya"]))
    return {(m.part, m.path): (m.down, m.up) for m in mods.values()}


def patched_weights(model_patcher):
    model_patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in model_patcher.model.state_dict().items()}
    finally:
        model_patcher.unpatch_model()


def run_loader(comfy, model, clip, name, strength=0.5):
    out = comfy.nodes.NODE_CLASS_MAPPINGS["ScottLoraLoader"].execute(model, clip, name, strength, strength)
    return out.result


def test_every_format_patches_every_module_to_the_same_weights(comfy, fixture_paths, loaded):
    from comfy import utils as comfy_utils

    model, clip = loaded
    base_weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    mods = lora_modules(fixture_paths)
    unet_mods = {path: pair for (part, path), pair in mods.items() if part == "unet"}
    diffusers_to_unet = comfy_utils.unet_to_diffusers(SD15_UNET)
    strength = 0.5
    weights = {}
    for fmt in FORMATS:
        new_model, new_clip = run_loader(comfy, model, clip, fixture_paths[f"lora_{fmt}"].name, strength)
        assert len(new_model.patches) == len(unet_mods)  # every UNet module applied, none dropped
        te_modules = (
            len(mods) - len(unet_mods) if fmt != "peft" else 0
        )  # the bare-peft file holds the UNet only
        assert len(new_clip.patcher.patches) == te_modules
        weights[fmt] = patched_weights(new_model)
    for path, (down, up) in unet_mods.items():
        key = "diffusion_model." + diffusers_to_unet[f"{path}.weight"]
        w = base_weights[key]
        delta = (up.flatten(1).double() @ down.flatten(1).double()).reshape(w.shape)
        expected = w.double() + strength * LORA_ALPHA / LORA_RANK * delta
        assert torch.allclose(weights["kohya"][key].double(), expected, atol=1e-5), path
        assert torch.equal(weights["kohya"][key], weights["diffusers"][key])
        assert torch.equal(weights["kohya"][key], weights["peft"][key])
    # the source model is untouched (patches live on clones)
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in base_weights.items())


def test_loader_sets_the_consistency_boundary_condition_on_a_clone_only(comfy, fixture_paths, loaded):
    model, clip = loaded
    new_model, _ = run_loader(comfy, model, clip, fixture_paths["lora_peft"].name)
    sampling, original = (
        new_model.get_model_object("model_sampling"),
        model.get_model_object("model_sampling"),
    )
    sigma = torch.tensor([original.sigma(torch.tensor(20.0))])
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    plain = original.calculate_denoised(sigma, eps, x)
    consistent = sampling.calculate_denoised(sigma, eps, x)
    # at t = 20 the boundary condition mixes in c_skip * z, c_skip = 0.25 / (200^2 + 0.25)
    c_skip, c_out = 0.25 / (200**2 + 0.25), 200 / (200**2 + 0.25) ** 0.5
    z = x / (1 + sigma**2).sqrt()
    assert torch.allclose(consistent, c_skip * z + c_out * plain, atol=1e-6)
    assert (consistent - plain).abs().max() > 1e-6  # c_skip ~ 6e-6: a small but real change
    # the LoRA's metadata rides on the clone as a model option, for the samplers' "from the LoRA" values
    pack = comfy.pack("nodes.model_sampling")
    assert pack.lora_settings(new_model.model_options) == {"steps": 2, "gamma": 0.3, "cfg": 1.0}
    assert pack.LORA_SETTINGS not in model.model_options


def test_stock_loader_drops_peft_keys_that_ours_maps(comfy, fixture_paths, loaded):
    from comfy import sd as comfy_sd
    from comfy import utils as comfy_utils

    model, clip = loaded
    peft = comfy_utils.load_torch_file(str(fixture_paths["lora_diffusers"]), safe_load=True)
    stock_model, _ = comfy_sd.load_lora_for_models(model, clip, peft, 1.0, 1.0)
    ours, _ = run_loader(comfy, model, clip, fixture_paths["lora_diffusers"].name)
    assert len(stock_model.patches) < len(ours.patches)


def test_three_formats_give_the_same_image_and_differ_from_no_lora(comfy, fixture_paths):
    latents = {}
    for fmt in (*FORMATS, None):
        lora = fixture_paths[f"lora_{fmt}"].name if fmt else None
        prompt, model, _ = base(fixture_paths["checkpoint"].name, lora)
        ksampler(prompt, f"fmt_{fmt}", model, empty_latent(prompt), seed=99, gamma=1.0)
        result = comfy.run(prompt)
        assert result["ok"], result["error"]
        latents[fmt] = load_file(str(comfy.output_files(result, "latents", f"fmt_{fmt}_")[-1]))[
            "latent_tensor"
        ]
    # peft holds no text-encoder modules, so compare the UNet-only formats through the same CLIP path
    assert torch.equal(latents["kohya"], latents["diffusers"])
    assert (latents["kohya"] - latents[None]).abs().max() > 1e-3
    assert (latents["peft"] - latents[None]).abs().max() > 1e-3
