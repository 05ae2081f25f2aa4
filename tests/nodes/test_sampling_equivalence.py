"""SCott KSampler and SamplerCustom + SCott Sampler/Scheduler, run by ComfyUI's executor, give what
scott_core's VP-space reference sampler gives from the same model, start latent and noise (fp32, 1e-4)."""

import pytest
import torch
from graphs import PROMPT_TEXT, base, empty_latent, ksampler, sampler_custom
from safetensors.torch import load_file, save_file

from scott_core import sampling, schedule

SEED = 1234
GAMMAS = (0.0, 0.3, 1.0)
DENOISES = (1.0, 0.6)
SCALE = 0.18215  # SD1.5 latent scale: ComfyUI's latents are unscaled, the sampler works on scaled ones


def load_latent(path):
    return load_file(str(path))["latent_tensor"]


@pytest.fixture(scope="module")
def start_latent(comfy):
    """An img2img start latent (as VAEEncode would give) written where LoadLatent finds it."""
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    save_file(
        {"latent_tensor": latent, "latent_format_version_0": torch.tensor([])},
        str(comfy.input_dir / "scott_start.latent"),
    )
    return latent


@pytest.fixture(scope="module")
def node_results(comfy, fixture_paths, start_latent):
    """One prompt, twelve branches {(path, gamma, denoise): latent}, plus gamma -1 (LoRA metadata: 0.3)."""
    prompt, model, _ = base(fixture_paths["checkpoint"].name, fixture_paths["lora_kohya"].name)
    empty = empty_latent(prompt)
    prompt["loaded"] = {"class_type": "LoadLatent", "inputs": {"latent": "scott_start.latent"}}
    names = {}
    for gamma in GAMMAS + (-1.0,):
        for denoise in DENOISES:
            latent = empty if denoise == 1.0 else ["loaded", 0]
            for path, add in (("ksampler", ksampler), ("custom", sampler_custom)):
                name = f"{path}_g{int(gamma * 10)}_d{int(denoise * 10)}"
                add(prompt, name, model, latent, SEED, gamma=gamma, denoise=denoise)
                names[(path, gamma, denoise)] = name
    result = comfy.run(prompt)
    assert result["ok"], result["error"]
    files = {f.name.split("_00001")[0]: f for f in comfy.output_files(result, "latents")}
    return {key: load_latent(files[name]) for key, name in names.items()}


@pytest.fixture(scope="module")
def reference_denoiser(comfy, fixture_paths):
    """f(z, t) of the same checkpoint with the LoRA applied by ComfyUI's stock loader (kohya keys) and the
    prompt encoded by its CLIP: scott_core.sampling.consistency_denoiser around the raw UNet's eps."""
    from comfy import sd as comfy_sd
    from comfy import utils as comfy_utils

    model, clip = comfy_sd.load_checkpoint_guess_config(str(fixture_paths["checkpoint"]), output_vae=False)[
        :2
    ]
    lora = comfy_utils.load_torch_file(str(fixture_paths["lora_kohya"]), safe_load=True)
    model, clip = comfy_sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    context = clip.encode_from_tokens(clip.tokenize(PROMPT_TEXT)).float()
    model.patch_model()
    unet = model.model.diffusion_model

    def eps_fn(z, t):
        with torch.no_grad():
            return unet(z, timesteps=t.float(), context=context.expand(z.shape[0], -1, -1)).float()

    return sampling.consistency_denoiser(eps_fn, schedule.alphas_cumprod())


def reference(denoiser, start_latent, gamma, denoise):
    ab = schedule.alphas_cumprod()
    timesteps = schedule.lcm_timesteps(2, denoise)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED))
    if denoise == 1.0:
        z = noise  # txt2img starts from pure noise (ComfyUI's max_denoise, diffusers' LCM)
    else:
        z = sampling.add_noise(start_latent * SCALE, noise, timesteps[0], ab).float()
    return sampling.sample_scott(
        denoiser, z, timesteps, ab, gamma, generator=torch.Generator().manual_seed(SEED)
    )


@pytest.mark.parametrize("path", ["ksampler", "custom"])
@pytest.mark.parametrize("denoise", DENOISES)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_nodes_match_the_core_reference(node_results, reference_denoiser, start_latent, path, gamma, denoise):
    """Compared in the sampler's latent space (ComfyUI's saved latent * 0.18215), where the reference works.
    The random-weight UNet's clean estimates reach |x0| ~ 50 there (a trained one: ~4): 1e-4 is ~2e-6
    relative."""
    expected = reference(reference_denoiser, start_latent, gamma, denoise)
    got = node_results[(path, gamma, denoise)] * SCALE
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_gamma_changes_the_result_and_auto_gamma_is_the_loras(node_results):
    for denoise in DENOISES:
        for path in ("ksampler", "custom"):
            a, b, c = (node_results[(path, g, denoise)] for g in GAMMAS)
            assert (a - b).abs().max() > 1e-3 and (b - c).abs().max() > 1e-3
            assert torch.equal(
                node_results[(path, -1.0, denoise)], b
            )  # fixture LoRA metadata: scott.gamma = 0.3


def test_explicit_timesteps_match_the_reference(comfy, fixture_paths, reference_denoiser):
    """SCott Scheduler's explicit list (here the paper's 4-step grid, as text) samples those timesteps."""
    prompt, model, _ = base(fixture_paths["checkpoint"].name, fixture_paths["lora_kohya"].name)
    sampler_custom(
        prompt, "explicit", model, empty_latent(prompt), SEED + 1, gamma=0.3, timesteps="999,759, 499 ,259"
    )
    result = comfy.run(prompt)
    assert result["ok"], result["error"]
    got = load_latent(comfy.output_files(result, "latents", "explicit")[-1]) * SCALE
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED + 1))
    expected = sampling.sample_scott(
        reference_denoiser,
        noise,
        [999, 759, 499, 259],
        schedule.alphas_cumprod(),
        0.3,
        generator=torch.Generator().manual_seed(SEED + 1),
    )
    assert (got - expected).abs().max().item() <= 1e-4
