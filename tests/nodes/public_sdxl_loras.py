"""Key layouts of the public few-step SDXL LoRAs, as test data: which modules each adapts, how it names them, its
rank and alpha, taken from each project's published code, or, where a project publishes none, what its documentation
says (and the layouts its documented loaders accept). The tests build state dicts of these exact keys and shapes (on
the meta device: no memory) against a full-size SDXL UNet and the SDXL text encoders.

Sources (read 2026-12):
- LCM-LoRA-SDXL: luosiallen/latent-consistency-model, LCM_Training_Script/consistency_distillation/
  train_lcm_distill_lora_sdxl_wds.py: LoraConfig(r=--lora_rank (default 64), target_modules=LCM_TARGETS) with peft's
  default lora_alpha 8; saved by get_module_kohya_state_dict: "lora_unet_" + the diffusers module path with "_" +
  ".lora_down/.lora_up.weight", and ".alpha".
- DMD2 (dmd2_sdxl_4step_lora_fp16): tianweiy/DMD2, main/sdxl/extract_lora_module.py: the same target modules,
  lora_rank 64, lora_alpha 8, the same kohya naming, fp16.
- PCM SDXL (pcm_sdxl_*_converted): G-U-N/Phased-Consistency-Model, code/text_to_image_sdxl/
  train_pcm_lora_sdxl_adv.py (the same target modules and get_module_kohya_state_dict) and train_pcm_lora_sdxl.sh
  (--lora_rank=64).
- SDXL-Lightning LoRAs: no training code published. A re-pack's model card (huggingface.co/aaaaaeeeee/
  blip-lora-sdxl-lightning4) documents kohya factors, rank 64, alpha 8, 788 UNet layers: the LCM target set on SDXL
  has exactly 788 modules (test_public_layouts); whether its names follow diffusers' or the original UNet layout is
  not documented, so both are tested.
- Hyper-SDXL (1/2/4/8-step, 8/12-step CFG) and TCD-SDXL: no training code published; their model cards load them
  with diffusers' load_lora_weights (and Hyper-SD's with ComfyUI's LoraLoader). Tested: every layout those loaders
  accept: kohya with diffusers paths, kohya sd-scripts' SDXL layout (original UNet names, lora_te1_/lora_te2_ on
  CLIPAttention/CLIPMLP linears: kohya-ss/sd-scripts networks/lora.py), the diffusers LCM trainer's layout
  (huggingface/diffusers examples/consistency_distillation/train_lcm_distill_lora_sdxl.py:
  convert_state_dict_to_diffusers + save_lora_weights: "unet.<path>.lora.down.weight"), and peft's lora_A/lora_B
  with unet. / text_encoder. / text_encoder_2. prefixes.
"""

import functools
from dataclasses import dataclass

import torch

LCM_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
# kohya sd-scripts networks/lora.py: TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPMLP"], their Linears.
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
# The SDXL base UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL_UNET_CONFIG = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    in_channels=4,
    layers_per_block=2,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
# Text encoders: (part, layers, width, mlp width): CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers.
TEXT_ENCODERS = (("text_encoder", 12, 768, 3072), ("text_encoder_2", 32, 1280, 5120))


@dataclass(frozen=True)
class Layout:
    """How a LoRA file names its modules: naming "kohya" (lora_unet_<diffusers path>), "kohya_ldm" (lora_unet_<original
    UNet path>), "diffusers_down" (unet.<path>.lora.down.weight), "peft" (<part>.<path>.lora_A.weight); whether it
    adapts the text encoders; rank and alpha."""

    naming: str
    text_encoders: bool
    rank: int = 64
    alpha: float = 8.0


LAYOUTS = {
    "kohya": Layout("kohya", False),
    "kohya_ldm_te": Layout("kohya_ldm", True),
    "diffusers_down": Layout("diffusers_down", False),
    "peft_te": Layout("peft", True),
}
# Each public LoRA: the layouts it is tested in (one where its code publishes it, every candidate where it does not).
PUBLIC_LORAS = {
    "LCM-LoRA-SDXL": ("kohya",),
    "DMD2 SDXL 4-step LoRA": ("kohya",),
    "PCM SDXL (converted)": ("kohya",),
    "SDXL-Lightning 2/4/8-step LoRA": ("kohya", "kohya_ldm_te"),
    "Hyper-SDXL 1/2/4/8-step, 8/12-step CFG LoRA": ("kohya", "kohya_ldm_te", "diffusers_down", "peft_te"),
    "TCD-SDXL-LoRA": ("kohya", "kohya_ldm_te", "diffusers_down", "peft_te"),
}


@functools.cache
def sdxl_unet_modules():
    """{diffusers module path: weight shape} of the LCM_TARGETS modules of the full-size SDXL UNet (meta device)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return {
        name: tuple(module.weight.shape)
        for name, module in unet.named_modules()
        if any(name == t or name.endswith("." + t) for t in LCM_TARGETS)
    }


def text_encoder_modules():
    """{(part, path): weight shape} of the TE_TARGETS linears of both SDXL text encoders."""
    out = {}
    for part, layers, width, mlp in TEXT_ENCODERS:
        shapes = {"mlp.fc1": (mlp, width), "mlp.fc2": (width, mlp)}
        for i in range(layers):
            for target in TE_TARGETS:
                out[(part, f"text_model.encoder.layers.{i}.{target}")] = shapes.get(target, (width, width))
    return out


def state_dict(layout, unet_modules, ldm_paths=None):
    """A LoRA state dict in `layout` over `unet_modules` (and the text encoders if the layout has them): meta-device
    down [rank, in, *kernel] and up [out, rank, 1, 1] factors, real alpha scalars; ldm_paths maps a diffusers UNet
    path to the original layout's (for kohya_ldm)."""
    modules = {("unet", path): shape for path, shape in unet_modules.items()}
    if layout.text_encoders:
        modules.update(text_encoder_modules())
    out = {}
    for (part, path), shape in modules.items():
        down = torch.empty((layout.rank, shape[1], *shape[2:]), device="meta", dtype=torch.float16)
        up = torch.empty((shape[0], layout.rank, *((1,) * len(shape[2:]))), device="meta", dtype=torch.float16)
        out.update(_keys(layout, part, path, down, up, ldm_paths))
    return out


def _keys(layout, part, path, down, up, ldm_paths):
    """The keys of one module in the layout's naming."""
    if layout.naming in ("kohya", "kohya_ldm"):
        if part == "unet" and layout.naming == "kohya_ldm":
            path = ldm_paths[path]
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part]
        name = prefix + path.replace(".", "_")
        alpha = torch.tensor(layout.alpha)
        return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha}
    if layout.naming == "diffusers_down":
        return {f"{part}.{path}.lora.down.weight": down, f"{part}.{path}.lora.up.weight": up}
    return {f"{part}.{path}.lora_A.weight": down, f"{part}.{path}.lora_B.weight": up}
