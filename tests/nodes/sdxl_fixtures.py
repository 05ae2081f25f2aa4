"""The SDXL-family test fixtures, built once and cached like the SD1.5 ones (in a folder of their own, so that
neither set rebuilds the other): a reduced SDXL checkpoint ComfyUI detects as SDXL-family (class Segmind_Vega) with
full-size text encoders (CLIP-L and OpenCLIP bigG, as ComfyUI builds them from its own configs) and a full-size
VAE, the same UNet marked v-prediction + zero terminal SNR, one set of random LoRA tensors in four key layouts, and
a diffusers pipeline folder (configs and tokenizers, no weights) for loading the same checkpoint in diffusers.

The UNet: Segmind-Vega's input layout (transformer depth 0, 0, 1, 1, 2, 2, which is all ComfyUI's detection
matches on besides widths: comfy/supported_models.py) with every level 320 channels wide and the output side and
middle as diffusers builds them from transformer_layers_per_block [1, 1, 2] (output 0, 0, 0, 1, 1, 1, 2, 2, 2;
middle 2), so that diffusers' single-file loader converts it with a plain UNet2DConditionModel config."""

import json
import shutil
from pathlib import Path

import torch
from public_sdxl_loras import LCM_TARGETS
from scott_fixtures import (
    LORA_ALPHA,
    LORA_RANK,
    SEED,
    atomic_save,
    clip_shapes,
    exclusive,
    lora_pair,
    random_state_dict,
    unet_shapes,
    vae_shapes,
)

SDXL_VERSION = "sdxl-v1"
SDXL_SEED = SEED + 100
PERTURB = 0.05  # norm scales 1 + N(0, 0.05^2), biases N(0, 0.05^2): a swapped or dropped norm/bias shows up
SDXL_UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "transformer_depth_middle": 2,
    "num_heads": -1,
    "num_head_channels": 64,
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "legacy": False,
}
DIFFUSERS_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 5, 5],
    "block_out_channels": [320, 320, 320],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 1, 2],
    "use_linear_projection": True,
}
DIFFUSERS_VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
TE_PATHS = [f"text_model.encoder.layers.{i}.{p}" for i in (0, 10) for p in ("self_attn.q_proj", "mlp.fc2")]
LORA_FORMATS = ("kohya", "kohya_ldm", "diffusers", "peft")
LORA_METADATA = {"scott.steps": "2", "scott.gamma": "0.3", "scott.cfg": "1.0"}


def paths(cache_dir):
    """Where the SDXL fixtures live in the cache."""
    root = Path(cache_dir) / SDXL_VERSION
    out = {
        "sdxl_checkpoint": root / "checkpoints" / "scott_test_sdxl.safetensors",
        "sdxl_vpred_unet": root / "diffusion_models" / "scott_test_sdxl_vpred_unet.safetensors",
        "sdxl_diffusers": root / "diffusers",
    }
    out.update({f"sdxl_lora_{f}": root / "loras" / f"scott_test_sdxl_lora_{f}.safetensors" for f in LORA_FORMATS})
    return out


def build_sdxl(cache_dir):
    """Build (once, under a file lock, with atomic renames) and return the SDXL fixture paths."""
    out = paths(cache_dir)
    for p in out.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out["sdxl_checkpoint"].parent.parent / ".lock"):
        if not all(p.exists() for p in out.values()):
            _build(out)
    return out


def bigg_shapes(layers=32, width=1280, heads_mlp=5120, vocab=49408, positions=77):
    """OpenCLIP ViT-bigG text tower keys and shapes (the `conditioner.embedders.1.model.` layout SDXL ships)."""
    shapes = {
        "token_embedding.weight": (vocab, width),
        "positional_embedding": (positions, width),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
        "text_projection": (width, width),
    }
    for i in range(layers):
        block = f"transformer.resblocks.{i}"
        shapes.update(
            {
                f"{block}.ln_1.weight": (width,),
                f"{block}.ln_1.bias": (width,),
                f"{block}.attn.in_proj_weight": (3 * width, width),
                f"{block}.attn.in_proj_bias": (3 * width,),
                f"{block}.attn.out_proj.weight": (width, width),
                f"{block}.attn.out_proj.bias": (width,),
                f"{block}.ln_2.weight": (width,),
                f"{block}.ln_2.bias": (width,),
                f"{block}.mlp.c_fc.weight": (heads_mlp, width),
                f"{block}.mlp.c_fc.bias": (heads_mlp,),
                f"{block}.mlp.c_proj.weight": (width, heads_mlp),
                f"{block}.mlp.c_proj.bias": (width,),
            }
        )
    return shapes


def lora_modules(unet_sd):
    """{(part, diffusers path): (down, up)}: every module of the fixture UNet that LCM-LoRA-SDXL, DMD2 and PCM adapt
    (public_sdxl_loras.LCM_TARGETS) and TE_PATHS of both text encoders, rank LORA_RANK, from one seeded generator."""
    import comfy.utils

    g = torch.Generator().manual_seed(SDXL_SEED + 7)
    mods = {}
    for dkey, ukey in sorted(comfy.utils.unet_to_diffusers(SDXL_UNET).items()):
        path, weight = dkey.removesuffix(".weight"), unet_sd.get(f"model.diffusion_model.{ukey}")
        if weight is not None and dkey.endswith(".weight") and path.endswith(tuple("." + t for t in LCM_TARGETS)):
            mods[("unet", path)] = lora_pair(weight.shape, g)
    for part, width in (("text_encoder", 768), ("text_encoder_2", 1280)):
        for path in TE_PATHS:
            shape = (width, width) if path.endswith("q_proj") else (width, 4 * width)
            mods[(part, path)] = lora_pair(shape, g)
    return mods


def kohya_name(part, path, ldm_names=None):
    """kohya module name: lora_unet_/lora_te1_/lora_te2_ + the path with "_"; ldm_names maps a diffusers UNet path
    to its original-layout path (kohya sd-scripts' SDXL naming)."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part]
    if part == "unet" and ldm_names is not None:
        path = ldm_names[path]
    return prefix + path.replace(".", "_")


def lora_in_format(mods, fmt):
    """(state dict, metadata) of the same modules in kohya (diffusers paths, as LCM-LoRA/DMD2/PCM), kohya_ldm
    (original-layout UNet names, as kohya sd-scripts), diffusers (unet./text_encoder./text_encoder_2.) or bare peft
    keys (UNet only)."""
    import comfy.utils

    to_ldm = comfy.utils.unet_to_diffusers(SDXL_UNET)
    ldm = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in to_ldm.items()}
    sd, meta = {}, dict(LORA_METADATA)
    for (part, path), (down, up) in mods.items():
        if fmt in ("kohya", "kohya_ldm"):
            name = kohya_name(part, path, ldm if fmt == "kohya_ldm" else None)
            sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
            sd[f"{name}.alpha"] = torch.tensor(LORA_ALPHA)
        elif fmt == "diffusers":
            sd.update({f"{part}.{path}.lora_A.weight": down, f"{part}.{path}.lora_B.weight": up})
        elif part == "unet":
            sd.update({f"base_model.model.{path}.lora_A.weight": down, f"base_model.model.{path}.lora_B.weight": up})
    if fmt == "diffusers":
        adapter = {f"{p}.{k}": v for p in ("unet", "text_encoder", "text_encoder_2") for k, v in
                   (("r", LORA_RANK), ("lora_alpha", LORA_ALPHA))}
        meta["lora_adapter_metadata"] = json.dumps(adapter)
    if fmt == "peft":
        meta["lora_adapter_metadata"] = json.dumps({"r": LORA_RANK, "lora_alpha": LORA_ALPHA})
    return sd, meta


def diffusers_modules(path):
    """{(part, diffusers path): (down, up, alpha / rank)} of a diffusers-format LoRA file (the fixture's), read by
    plain key splitting and its lora_adapter_metadata: the tests' ground truth, independent of lora_format."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    out = {}
    for key in (k for k in tensors if k.endswith(".lora_A.weight")):
        part, module = key.removesuffix(".lora_A.weight").split(".", 1)
        scale = meta[f"{part}.lora_alpha"] / meta[f"{part}.r"]
        out[(part, module)] = (tensors[key], tensors[key.replace("lora_A", "lora_B")], scale)
    return out


def _checkpoint():
    """The checkpoint's state dict: UNet, VAE and both text encoders in the layout SDXL checkpoints ship."""
    unet = random_state_dict(unet_shapes(SDXL_UNET), SDXL_SEED, perturb=PERTURB)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    sd.update({f"first_stage_model.{k}": v for k, v in random_state_dict(vae_shapes(), SDXL_SEED + 1).items()})
    clip_l = random_state_dict(clip_shapes(), SDXL_SEED + 2, perturb=PERTURB)
    sd.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_l.items()})
    clip_g = random_state_dict(bigg_shapes(), SDXL_SEED + 3, perturb=PERTURB)
    sd.update({f"conditioner.embedders.1.model.{k}": v for k, v in clip_g.items()})
    return sd


def _diffusers_folder(folder):
    """model_index.json, component configs and tokenizers (ComfyUI's CLIP tokenizer files; bigG pads with "!",
    as SDXL's tokenizer_2) for StableDiffusionXLPipeline.from_single_file(checkpoint, config=folder)."""
    import comfy.sd1_clip
    from transformers import CLIPTokenizer

    comfy_dir = Path(comfy.sd1_clip.__file__).parent
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    configs = {
        "model_index.json": MODEL_INDEX,
        "unet/config.json": DIFFUSERS_UNET,
        "vae/config.json": DIFFUSERS_VAE,
        "scheduler/scheduler_config.json": SCHEDULER,
        "text_encoder/config.json": _clip_config(comfy_dir / "sd1_clip_config.json", "CLIPTextModel"),
        "text_encoder_2/config.json": _clip_config(comfy_dir / "clip_config_bigg.json", "CLIPTextModelWithProjection"),
    }
    for name, config in configs.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(json.dumps(config, indent=1))
    vocab = comfy_dir / "sd1_tokenizer"
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        files = (str(vocab / "vocab.json"), str(vocab / "merges.txt"))
        tokenizer = CLIPTokenizer(*files, pad_token=pad, model_max_length=77)
        tokenizer.save_pretrained(str(tmp / name))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _clip_config(path, architecture):
    """A transformers config from one of ComfyUI's CLIP config files, for the given model class."""
    return {**json.loads(Path(path).read_text()), "architectures": [architecture]}


def _build(out):
    """Write every SDXL fixture file (atomic renames)."""
    sd = _checkpoint()
    atomic_save(sd, out["sdxl_checkpoint"])
    prefix = "model.diffusion_model."
    unet = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    atomic_save({**unet, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, out["sdxl_vpred_unet"])
    mods = lora_modules(sd)
    for fmt in LORA_FORMATS:
        tensors, meta = lora_in_format(mods, fmt)
        atomic_save(tensors, out[f"sdxl_lora_{fmt}"], meta)
    _diffusers_folder(out["sdxl_diffusers"])

