"""SCott KSampler and SamplerCustom + SCott Sampler/Scheduler on the SDXL-family fixture, run by ComfyUI's executor,
give the latents diffusers' StableDiffusionXLPipeline (and its img2img twin) gives with LCMScheduler, TCDScheduler,
DDIMScheduler (these two: the x0 of their last step) and EulerDiscreteScheduler on the same checkpoint (loaded by
diffusers' single-file loader), the same LCM-LoRA-layout LoRA on the UNet (kohya keys with diffusers module paths;
loaded by SCott LoRA Loader and by diffusers' own LoRA loader), the same start latent and noise, and the same size
conditioning (64 x 64 px: ComfyUI's SDXL encode_adm takes width/height from the latent, crop 0, target = size;
diffusers' add_time_ids original_size + crops_coords_top_left + target_size). fp32, max abs diff <= 1e-4.

The text-encoder half of the LoRA is compared separately, merged by hand into diffusers' text encoders: diffusers'
LoRA loader cannot load text-encoder LoRAs into transformers 5's CLIP models (it drops kohya q_proj keys and fails on
peft ones), so the sampling comparison runs with strength_clip 0."""

import contextlib
import functools
import gc

import pytest
import torch
from graphs import PROMPT_TEXT, base, empty_latent, ksampler, sampler_custom
from safetensors.torch import load_file, save_file
from sdxl_fixtures import diffusers_modules

from scott_core import families, schedule

SEED = 2468
SIZE = 64
SCALE = families.SDXL.latent_scale  # ComfyUI saves unscaled latents; the samplers work on scaled ones
TOLERANCE = 1e-4
# name: (node path, diffusers scheduler, node settings); img2img cases (denoise < 1) start from the LoadLatent latent.
# The diffusers side takes the same steps / timesteps, cfg (guidance_scale), gamma (TCD's eta) and denoise (strength).
CASES = {
    "lcm1": ("ksampler", "lcm", dict(steps=1, gamma=1.0)),
    "lcm4": ("ksampler", "lcm", dict(steps=4, gamma=1.0)),
    "lcm4_custom": ("custom", "lcm", dict(steps=4, gamma=1.0)),
    "lcm2_cfg": ("ksampler", "lcm", dict(steps=2, gamma=1.0, cfg=1.5)),
    "tcd0": ("ksampler", "tcd", dict(steps=4, gamma=0.0)),
    "tcd3_custom": ("custom", "tcd", dict(steps=4, gamma=0.3)),
    "img_lcm": ("ksampler", "lcm", dict(steps=2, gamma=1.0, denoise=0.6)),
    "img_lcm_custom": ("custom", "lcm", dict(steps=2, gamma=1.0, denoise=0.6)),
    "img_tcd3": ("ksampler", "tcd", dict(steps=2, gamma=0.3, denoise=0.5)),
    # published recipes through SCott Scheduler's explicit timesteps (docs/nodes_sdxl.md)
    "dmd2": ("custom", "lcm", dict(gamma=1.0, timesteps="999, 749, 499, 249")),
    "hyper_800": ("custom", "lcm", dict(gamma=1.0, timesteps="800")),
    "lightning2": ("custom", "euler_trailing", dict(steps=2, gamma=0.0, timesteps="999, 499")),
    "hyper_ddim2": ("custom", "ddim_trailing", dict(steps=2, gamma=0.0, timesteps="999, 499")),
}


@pytest.fixture(scope="module")
def start_latent(comfy):
    """An img2img start latent (ComfyUI's unscaled latent space) written where LoadLatent finds it."""
    latent = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(11))
    save_file(
        {"latent_tensor": latent, "latent_format_version_0": torch.tensor([])},
        str(comfy.input_dir / "scott_sdxl_start.latent"),
    )
    return latent


@pytest.fixture(scope="module")
def node_results(comfy, fixture_paths, start_latent):
    """One prompt, a branch per case, on the SDXL fixture + SCott LoRA Loader (kohya LoRA, strength_clip 0);
    {case: saved latent * scale}."""
    prompt, model, _ = base(fixture_paths["sdxl_checkpoint"].name, fixture_paths["sdxl_lora_kohya"].name)
    prompt["lora"]["inputs"]["strength_clip"] = 0.0
    empty = empty_latent(prompt, size=SIZE)
    prompt["loaded"] = {"class_type": "LoadLatent", "inputs": {"latent": "scott_sdxl_start.latent"}}
    for name, (path, _, settings) in CASES.items():
        latent = ["loaded", 0] if "denoise" in settings else empty
        (ksampler if path == "ksampler" else sampler_custom)(prompt, name, model, latent, SEED, **settings)
    result = comfy.run(prompt)
    assert result["ok"], result["error"]
    files = {f.name.split("_00001")[0]: f for f in comfy.output_files(result, "latents")}
    return {name: load_file(str(files[name]))["latent_tensor"] * SCALE for name in CASES}


@pytest.fixture(scope="module")
def diffusers_pipe(fixture_paths):
    """The same checkpoint in StableDiffusionXLPipeline (single-file loading with the fixture's local configs, fp32)
    with the kohya LoRA's UNet modules loaded by diffusers' own LoRA loader."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(
        str(fixture_paths["sdxl_checkpoint"]),
        config=str(fixture_paths["sdxl_diffusers"]),
        local_files_only=True,
        torch_dtype=torch.float32,
    )
    kohya = load_file(str(fixture_paths["sdxl_lora_kohya"]))
    pipe.load_lora_weights({k: v for k, v in kohya.items() if k.startswith("lora_unet_")})
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    del pipe
    gc.collect()


@pytest.fixture(scope="module")
def prompt_embeds(diffusers_pipe):
    """The prompt and the empty negative prompt, encoded once by the pipeline's encode_prompt."""
    embeds = diffusers_pipe.encode_prompt(PROMPT_TEXT, negative_prompt="", do_classifier_free_guidance=True)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return dict(zip(names, embeds))


@pytest.fixture(scope="module")
def references(diffusers_pipe, prompt_embeds, start_latent):
    """{case: diffusers' latent} (output_type="latent": the sampler's scaled latent space)."""
    prompt, done = prompt_embeds, {}
    for _, kind, settings in CASES.values():  # the KSampler and SamplerCustom twins share one reference
        key = (kind, tuple(sorted(settings.items())))
        if key not in done:
            done[key] = diffusers_reference(diffusers_pipe, prompt, start_latent, kind, settings)
    return {name: done[(kind, tuple(sorted(settings.items())))] for name, (_, kind, settings) in CASES.items()}


def scheduler(kind, config):
    """A diffusers scheduler of this kind from the pipeline's scheduler config."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

    if kind == "euler_trailing":  # SDXL-Lightning's published sampler (its model card)
        return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    if kind == "ddim_trailing":  # Hyper-SD's N-step LoRAs' (and PCM's card's) sampler, eta 0
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    return {"lcm": LCMScheduler, "tcd": TCDScheduler}[kind].from_config(config)


def pipeline_kwargs(kind, settings):
    """The node settings as pipeline arguments: timesteps (LCM, TCD; Euler and DDIM take their own trailing ones)
    or steps, TCD's eta = gamma, guidance_scale = cfg (1: no guidance, as ComfyUI's cfg 1)."""
    kwargs = dict(guidance_scale=settings.get("cfg", 1.0), eta=settings["gamma"] if kind == "tcd" else 0.0)
    if "timesteps" in settings and kind not in ("euler_trailing", "ddim_trailing"):
        kwargs["timesteps"] = schedule.parse_timesteps(settings["timesteps"])
    else:
        kwargs["num_inference_steps"] = settings["steps"]
    return kwargs


def diffusers_reference(pipe, prompt, start_latent, kind, settings):
    """The pipeline's latent for one case, from the start ComfyUI samples from (comfy_start) and step noise from a
    generator seeded SEED (ComfyUI's sampler seeds its own noise stream with the same seed); img2img at the
    timesteps of set_timesteps(steps, strength=denoise) (SCott Scheduler's denoise rule). TCD's and DDIM's last
    step returns x0 re-noised to t = 0, where SCott and LCM return x0: for them the reference is the x0 of the
    scheduler's last step (its pred_original_sample)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    kwargs = pipeline_kwargs(kind, settings)
    pipe.scheduler = scheduler(kind, pipe.scheduler.config)
    timesteps = reference_timesteps(pipe.scheduler, kind, kwargs, settings.get("denoise", 1.0))
    z = comfy_start(start_latent if "denoise" in settings else None, timesteps[0])
    last_x0 = record_last_x0(pipe.scheduler)
    common = dict(prompt, generator=torch.Generator().manual_seed(SEED), output_type="latent", **kwargs)
    if "denoise" in settings:
        img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
        img2img.set_progress_bar_config(disable=True)
        common.pop("num_inference_steps", None)
        common["timesteps"] = timesteps
        out = img2img(image=start_latent * SCALE, latents=z, strength=1.0, **common).images
    else:
        if kind == "euler_trailing":  # k-diffusion x = z * sqrt(1 + sigma^2), handed over divided by its own scale
            z = z * (1 + sigma_at(timesteps[0]) ** 2).sqrt() / pipe.scheduler.init_noise_sigma
        out = pipe(height=SIZE, width=SIZE, latents=z, **common).images
    return last_x0() if kind in ("tcd", "ddim_trailing") else out


def reference_timesteps(diffusers_scheduler, kind, kwargs, denoise):
    """The timesteps the scheduler samples for these arguments (LCM and TCD take img2img strength)."""
    if kind in ("euler_trailing", "ddim_trailing"):
        diffusers_scheduler.set_timesteps(kwargs["num_inference_steps"])
    else:
        diffusers_scheduler.set_timesteps(
            kwargs.get("num_inference_steps"), timesteps=kwargs.get("timesteps"), strength=denoise
        )
    return diffusers_scheduler.timesteps.tolist()


def comfy_start(start_latent, timestep):
    """The VP latent ComfyUI's samplers start from at `timestep`, with noise drawn as ComfyUI draws it (seed SEED):
    from t = 999 pure noise; from a lower t (img2img, or txt2img at Hyper-SD's 800) the latent (zero for txt2img)
    noised to t, sqrt(ab) x0 + sqrt(1 - ab) noise, by diffusers' add_noise. diffusers' own txt2img pipelines start
    from pure noise at any t (1.4 % more at t = 800) and Euler with trailing spacing from noise * sigma_max (0.2 %
    less at t = 999), so the reference is handed ComfyUI's start."""
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(SEED))
    if start_latent is None and timestep == 999:
        return noise
    z0 = torch.zeros_like(noise) if start_latent is None else start_latent * SCALE
    return add_noise(z0, noise, timestep)


def add_noise(z0, noise, timestep):
    """diffusers' forward process at an integer timestep (SD/SDXL's scaled-linear schedule)."""
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return ddpm.add_noise(z0, noise, torch.tensor([int(timestep)]))


def sigma_at(timestep):
    """The k-diffusion sigma at a timestep, float32."""
    return schedule.timestep_to_sigma(timestep, schedule.alphas_cumprod()).float()


def record_last_x0(diffusers_scheduler):
    """Wrap the scheduler's step to keep its last call; returns a function giving that step's x0
    (sample - sqrt(1 - ab_t) eps) / sqrt(ab_t), TCDScheduler's and DDIMScheduler's pred_original_sample for eps
    models."""
    calls, step = [], diffusers_scheduler.step

    @functools.wraps(step)  # the pipeline passes eta and generator only to a step whose signature names them
    def recording_step(model_output, timestep, sample, *args, **kwargs):
        calls.append((model_output, int(timestep), sample))
        return step(model_output, timestep, sample, *args, **kwargs)

    diffusers_scheduler.step = recording_step

    def last_x0():
        eps, t, sample = calls[-1]
        ab = diffusers_scheduler.alphas_cumprod[t]
        return (sample - (1 - ab).sqrt() * eps) / ab.sqrt()

    return last_x0


@pytest.mark.parametrize("case", list(CASES))
def test_sdxl_nodes_match_diffusers(node_results, references, case):
    """Compared in the sampler's latent space; the random-weight UNet's clean estimates reach |x0| ~ 10-50."""
    got, expected = node_results[case], references[case]
    assert got.shape == expected.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert (got - expected).abs().max().item() <= TOLERANCE, (got - expected).abs().max().item()


def test_the_cases_differ_from_each_other(node_results):
    """Each setting changes the result (the comparison above could not pass with a sampler that ignored it)."""
    pairs = [("lcm1", "lcm4"), ("lcm4", "tcd0"), ("tcd0", "tcd3_custom"), ("img_lcm", "img_tcd3"), ("dmd2", "lcm4")]
    for a, b in pairs:
        assert (node_results[a] - node_results[b]).abs().max() > 1e-2, (a, b)


def test_the_text_conditioning_equals_diffusers_encode_prompt(comfy, fixture_paths, diffusers_pipe, prompt_embeds):
    """ComfyUI's SDXL CLIP (CLIP-L penultimate layer ++ bigG penultimate layer, bigG's projected pooled output) with
    SCott LoRA Loader's kohya lora_te1_/lora_te2_ modules equals diffusers' encode_prompt on the same weights with
    the diffusers-format file's text_encoder./text_encoder_2. modules merged by hand (W += alpha / rank * B @ A).
    ComfyUI keeps CPU text encoders in fp16 and merges LoRAs into them in fp16 (a 1e-3 relative rounding): here it
    loads them in fp32."""
    from comfy import sd as comfy_sd

    model, clip = comfy_sd.load_checkpoint_guess_config(
        str(fixture_paths["sdxl_checkpoint"]), output_vae=False, te_model_options={"dtype": torch.float32}
    )[:2]
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["ScottLoraLoader"]
    _, clip = loader.execute(model, clip, fixture_paths["sdxl_lora_kohya"].name, 1.0, 1.0).result
    cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT_TEXT), return_pooled=True)
    with merged_text_encoder_lora(diffusers_pipe, fixture_paths["sdxl_lora_diffusers"]) as merged:
        embeds, _, pooled_ref, _ = diffusers_pipe.encode_prompt(PROMPT_TEXT, do_classifier_free_guidance=False)
    assert merged == {"text_encoder": 4, "text_encoder_2": 4}
    assert cond.shape == embeds.shape == (1, 77, 2048) and pooled.shape == pooled_ref.shape == (1, 1280)
    assert (cond - embeds).abs().max() <= TOLERANCE * max(1.0, float(embeds.abs().max()))
    assert (pooled - pooled_ref).abs().max() <= TOLERANCE * max(1.0, float(pooled_ref.abs().max()))
    plain, plain_pooled = prompt_embeds["prompt_embeds"], prompt_embeds["pooled_prompt_embeds"]  # without the LoRA
    assert (plain - embeds).abs().max() > 1e-2 and (plain_pooled - pooled_ref).abs().max() > 1e-2


@contextlib.contextmanager
def merged_text_encoder_lora(pipe, path):
    """The file's text-encoder modules merged into the pipeline's text encoders (restored after); yields
    {part: modules merged}."""
    saved, counts = {}, {}
    for (part, module), (down, up, scale) in diffusers_modules(path).items():
        if part == "unet":
            continue
        layer = submodule(getattr(pipe, part), module)
        saved[(part, module)] = layer.weight.detach().clone()
        layer.weight.data += (scale * (up.double() @ down.double())).to(layer.weight.dtype)
        counts[part] = counts.get(part, 0) + 1
    try:
        yield counts
    finally:
        for (part, module), weight in saved.items():
            submodule(getattr(pipe, part), module).weight.data.copy_(weight)


def submodule(text_encoder, path):
    """transformers 5's CLIPTextModel has no text_model level (its WithProjection twin still has)."""
    try:
        return text_encoder.get_submodule(path)
    except AttributeError:
        return text_encoder.get_submodule(path.removeprefix("text_model."))


def test_lcm_timesteps_are_the_ones_the_pipeline_sampled():
    """The node's 4-step and img2img timesteps are diffusers' LCMScheduler's (what the cases above rely on)."""
    from diffusers import LCMScheduler

    lcm = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    lcm.set_timesteps(4)
    assert lcm.timesteps.tolist() == schedule.lcm_timesteps(4) == [999, 759, 499, 259]
    lcm.set_timesteps(2, strength=0.6)
    assert lcm.timesteps.tolist() == schedule.lcm_timesteps(2, 0.6) == [599, 299]
