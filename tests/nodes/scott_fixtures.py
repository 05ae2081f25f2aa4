"""Deterministic random-weight fixtures for the ComfyUI tests, cached outside the repo: a reduced-depth
SD1.5-architecture checkpoint ComfyUI detects as SD15, an SD2-architecture UNet, and one set of random LoRA
tensors written in kohya, diffusers and peft keys (plus an SDXL-looking LoRA and broken files); and, in a folder
of their own (sdxl_fixtures.py), a reduced SDXL-family checkpoint with full-size text encoders and its LoRAs."""

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VERSION = "v2"
SD15_UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "num_heads": 8,
    "context_dim": 768,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
}
SD2_UNET = {
    **SD15_UNET,
    "channel_mult": [1],
    "num_res_blocks": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "num_heads": -1,
    "num_head_channels": 64,
    "context_dim": 1024,
    "use_linear_in_transformer": True,
}
VAE = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
LORA_RANK, LORA_ALPHA = 4, 2.0
# LoRA targets (diffusers module paths): attention, feed-forward, a conv and the text encoder's attention.
LORA_UNET_SUFFIXES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "resnets.0.conv1",
)
LORA_TE_PATHS = [f"text_model.encoder.layers.{i}.self_attn.{p}_proj" for i in (0, 11) for p in ("q", "v")]
SEED = 20240303
# The kohya LoRA's tensors again, with other sampling metadata: "meta4" recommends 4 steps at cfg 1.5, "bare" has
# none (as LCM-LoRA, TCD or Hyper-SD files), "badsteps" more steps than the sampler takes.
METADATA_VARIANTS = {
    "meta4": {"scott.steps": "4", "scott.cfg": "1.5", "scott.gamma": "0.3"},
    "bare": {},
    "badsteps": {"scott.steps": "40"},
}


def build_all(cache_dir):
    """Build (once, under a file lock, with atomic renames) and return the fixture paths."""
    root = Path(cache_dir) / VERSION
    paths = {
        "checkpoint": root / "checkpoints" / "scott_test_sd15.safetensors",
        "sd2_unet": root / "diffusion_models" / "scott_test_sd2_unet.safetensors",
        **{
            f"lora_{fmt}": root / "loras" / f"scott_test_lora_{fmt}.safetensors"
            for fmt in ("kohya", "diffusers", "peft")
        },
        "lora_sdxl": root / "loras" / "scott_test_sdxl_lora.safetensors",
        "lora_nomatch": root / "loras" / "scott_test_nomatch_lora.safetensors",
        "lora_empty": root / "loras" / "scott_test_empty.safetensors",
        "lora_pickle": root / "loras" / "scott_test_pickle.safetensors",
        "lora_truncated": root / "loras" / "scott_test_truncated.safetensors",
    }
    variants = {f"lora_{name}": root / "loras" / f"scott_test_lora_{name}.safetensors" for name in METADATA_VARIANTS}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(root / ".lock"):
        if not all(p.exists() for p in paths.values()):
            _build(paths)
        for name, metadata in METADATA_VARIANTS.items():
            if not variants[f"lora_{name}"].exists():
                atomic_save(load_file(str(paths["lora_kohya"])), variants[f"lora_{name}"], metadata or None)
    return {k: Path(v) for k, v in {**paths, **variants}.items()}


@contextlib.contextmanager
def exclusive(lock_path):
    """An inter-process lock where fcntl exists (POSIX); elsewhere atomic renames alone keep files whole."""
    with open(lock_path, "w") as lock:
        try:
            import fcntl
        except ImportError:
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def atomic_save(tensors, path, metadata=None):
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_bytes(data, path):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def random_state_dict(shapes, seed, dtype=torch.float16, perturb=0.0):
    """Seeded values by role: 1-D weights (every norm scale) 1, biases 0, each plus N(0, perturb^2);
    matrices/kernels N(0, 1/fan_in), embeddings N(0, 0.02^2)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1]).reshape(shape)
            continue
        if len(shape) <= 1:
            t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
            if perturb:
                t = t + torch.randn(shape, generator=g) * perturb
        elif "embedding" in name:
            t = torch.randn(shape, generator=g) * 0.02
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            t = torch.randn(shape, generator=g) / fan_in**0.5
        out[name] = t.to(dtype)
    return out


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def unet_shapes(config):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        return _shapes(UNetModel(**config, operations=comfy.ops.disable_weight_init, device="meta"))


def vae_shapes():
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        return _shapes(AutoencoderKL(ddconfig=VAE, embed_dim=4))


def clip_shapes():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        max_position_embeddings=77,
        vocab_size=49408,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    with torch.device("meta"):
        shapes = _shapes(CLIPTextModel(config))
    # transformers 5 drops the text_model. prefix; ComfyUI would then keep uninitialised CLIP weights.
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in shapes.items()}


def lora_tensors(unet_sd):
    """One set of random LoRA tensors {(part, diffusers path): (down, up)}, sized from the checkpoint."""
    import comfy.utils

    diffusers_to_unet = comfy.utils.unet_to_diffusers(SD15_UNET)
    g = torch.Generator().manual_seed(SEED + 7)
    mods = {}
    for dkey, ukey in sorted(diffusers_to_unet.items()):
        path = dkey.removesuffix(".weight")
        if not dkey.endswith(".weight") or not path.endswith(LORA_UNET_SUFFIXES):
            continue
        if path.endswith("resnets.0.conv1") and not path.startswith("down_blocks.0"):
            continue
        weight = unet_sd[f"model.diffusion_model.{ukey}"]
        mods[("unet", path)] = lora_pair(weight.shape, g)
    for path in LORA_TE_PATHS:
        mods[("text_encoder", path)] = lora_pair((768, 768), g)
    return mods


def lora_pair(shape, g):
    out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
    down = torch.randn((LORA_RANK, in_dim, *kernel), generator=g) * 0.05
    up = torch.randn((out_dim, LORA_RANK, *((1,) * len(kernel))), generator=g) * 0.05
    return down, up


def lora_in_format(mods, fmt):
    """(state dict, metadata) of the same modules in kohya, diffusers (unet./text_encoder.) or peft keys."""
    sd, meta = {}, {}
    for (part, path), (down, up) in mods.items():
        if fmt == "kohya":
            name = ("lora_unet_" if part == "unet" else "lora_te_") + path.replace(".", "_")
            sd.update(
                {
                    f"{name}.lora_down.weight": down,
                    f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(LORA_ALPHA),
                }
            )
        else:
            key = (
                f"{part}.{path}"
                if fmt == "diffusers"
                else f"base_model.model.{path}"
                if part == "unet"
                else path
            )
            sd.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
    if fmt == "diffusers":
        meta["lora_adapter_metadata"] = json.dumps(
            {
                "unet.r": LORA_RANK,
                "unet.lora_alpha": LORA_ALPHA,
                "text_encoder.r": LORA_RANK,
                "text_encoder.lora_alpha": LORA_ALPHA,
            }
        )
    if fmt == "peft":
        meta["lora_adapter_metadata"] = json.dumps({"r": LORA_RANK, "lora_alpha": LORA_ALPHA})
    meta.update({"scott.steps": "2", "scott.gamma": "0.3", "scott.cfg": "1.0"})
    return sd, meta


def _build(paths):
    unet = random_state_dict(unet_shapes(SD15_UNET), SEED)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    sd.update({f"first_stage_model.{k}": v for k, v in random_state_dict(vae_shapes(), SEED + 1).items()})
    clip = random_state_dict(clip_shapes(), SEED + 2)
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.items()})
    atomic_save(sd, paths["checkpoint"])
    atomic_save(random_state_dict(unet_shapes(SD2_UNET), SEED + 3), paths["sd2_unet"])

    mods = lora_tensors(sd)
    for fmt in ("kohya", "diffusers", "peft"):
        tensors, meta = lora_in_format(mods, fmt)
        if fmt == "peft":  # bare peft keys hold one model: the UNet modules
            tensors = {k: v for k, v in tensors.items() if k.startswith("base_model.model.")}
        atomic_save(tensors, paths[f"lora_{fmt}"], meta)
    g = torch.Generator().manual_seed(SEED + 9)
    atomic_save(
        {
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(
                4, 768, generator=g
            ),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(
                768, 4, generator=g
            ),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(
                4, 2048, generator=g
            ),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(
                640, 4, generator=g
            ),
        },
        paths["lora_sdxl"],
    )
    nomatch = {
        f"lora_unet_down_blocks_7_attentions_{i}_proj_in.lora_down.weight": torch.ones(4, 320)
        for i in range(5)
    }
    nomatch.update({k.replace("lora_down", "lora_up"): torch.ones(320, 4) for k in nomatch})
    nomatch.update(lora_in_format(dict(list(mods.items())[:2]), "kohya")[0])
    atomic_save(nomatch, paths["lora_nomatch"])
    _atomic_bytes(b"", paths["lora_empty"])
    _atomic_bytes(b"\x80\x04\x95" + b"\0" * 64, paths["lora_pickle"])
    _atomic_bytes(paths["lora_kohya"].read_bytes()[:-1000], paths["lora_truncated"])
