"""A full-size SD1.5 LoRA export loads in ComfyUI's stock LoRA path with 0 keys dropped (skips without it)."""

import subprocess
import sys
import textwrap

import torch

from training.config import DistillConfig
from training.export import export_lora
from training.models.adapters import STUDENT, adapter_params, add_adapters
from training.models.teacher import ASSETS

# ComfyUI's own key map for the loaded checkpoint (model_lora_keys_unet) and its loader (load_lora), as
# LoraLoader runs them; in a subprocess, so that ComfyUI's globals stay out of the test process.
CHECK = textwrap.dedent("""
    import sys
    sys.path.insert(0, {comfy!r})
    from comfy.cli_args import args
    args.cpu = True
    import comfy.lora, comfy.sd, comfy.utils
    model = comfy.sd.load_checkpoint_guess_config({ckpt!r}, output_vae=False, output_clip=False)[0]
    key_map = comfy.lora.model_lora_keys_unet(model.model, {{}})
    lora = comfy.utils.load_torch_file({lora!r}, safe_load=True)
    patches = comfy.lora.load_lora(lora, key_map, log_missing=True)
    used = {{k for k in lora if k.rsplit(".", 2)[0] in key_map or k.rsplit(".", 1)[0] in key_map}}
    print(len(lora), len(patches), len(used))
""")


def test_comfyui_lora_loader_drops_no_key(comfyui_path, sd15_single_file, tmp_path):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(ASSETS / "unet")))
    unet = unet.to_empty(device="cpu")  # only the module names and shapes matter here
    add_adapters(unet, rank=4, alpha=2.0)
    with torch.no_grad():
        for p in adapter_params(unet, STUDENT).values():
            p.normal_(0, 0.01)
    cfg = DistillConfig(teacher="t", data="d", lora_rank=4, lora_alpha=2.0, resolution=64).resolved()
    lora = tmp_path / "scott.safetensors"
    export_lora(unet, cfg, "random-sd15", "0" * 64, lora)
    script = CHECK.format(comfy=str(comfyui_path), ckpt=str(sd15_single_file), lora=str(lora))
    result = subprocess.run([sys.executable, "-c", script], cwd=comfyui_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lora key not loaded" not in result.stderr + result.stdout
    keys, patches, used = map(int, result.stdout.split()[-3:])
    assert keys == 3 * patches and used == keys  # every module patched: down, up and alpha of each
    assert patches == 278  # every layer kind LCM-LoRA adapts in the SD1.5 UNet
