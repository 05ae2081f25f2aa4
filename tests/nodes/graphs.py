"""API-format prompt pieces for the tests: a checkpoint + SCott LoRA + text encoders, and sampler branches."""

PROMPT_TEXT = "a lighthouse on a cliff at sunset"


def base(checkpoint, lora=None, strength=1.0):
    """Nodes "ckpt", "lora" (if given), "pos", "neg"; returns (prompt, model ref, clip ref)."""
    prompt = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
    model, clip = ["ckpt", 0], ["ckpt", 1]
    if lora is not None:
        prompt["lora"] = {
            "class_type": "ScottLoraLoader",
            "inputs": {
                "model": model,
                "clip": clip,
                "lora_name": lora,
                "strength_model": strength,
                "strength_clip": strength,
            },
        }
        model, clip = ["lora", 0], ["lora", 1]
    prompt["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT_TEXT, "clip": clip}}
    prompt["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}}
    return prompt, model, clip


def empty_latent(prompt, name="empty", size=64):
    prompt[name] = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": size, "height": size, "batch_size": 1},
    }
    return [name, 0]


def ksampler(prompt, name, model, latent, seed, steps=2, cfg=1.0, gamma=1.0, denoise=1.0):
    """A SCott KSampler branch ending in SaveLatent (filename prefix = name)."""
    prompt[name] = {
        "class_type": "ScottKSampler",
        "inputs": {
            "model": model,
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "gamma": gamma,
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "latent_image": latent,
            "denoise": denoise,
        },
    }
    save_latent(prompt, name)


def sampler_custom(prompt, name, model, latent, seed, steps=2, cfg=1.0, gamma=1.0, denoise=1.0, timesteps=""):
    """SamplerCustom fed by SCott Sampler and SCott Scheduler, ending in SaveLatent (prefix = name)."""
    prompt[f"{name}_sampler"] = {"class_type": "ScottSampler", "inputs": {"gamma": gamma}}
    prompt[f"{name}_sigmas"] = {
        "class_type": "ScottScheduler",
        "inputs": {"model": model, "steps": steps, "denoise": denoise, "timesteps": timesteps},
    }
    prompt[name] = {
        "class_type": "SamplerCustom",
        "inputs": {
            "model": model,
            "add_noise": True,
            "noise_seed": seed,
            "cfg": cfg,
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "sampler": [f"{name}_sampler", 0],
            "sigmas": [f"{name}_sigmas", 0],
            "latent_image": latent,
        },
    }
    save_latent(prompt, name)


def save_latent(prompt, name):
    prompt[f"{name}_save"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [name, 0], "filename_prefix": name},
    }


def decode_and_save(prompt, name, latent, vae=("ckpt", 2)):
    prompt[f"{name}_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": list(vae)}}
    prompt[f"{name}_image"] = {
        "class_type": "SaveImage",
        "inputs": {"images": [f"{name}_decode", 0], "filename_prefix": name},
    }
