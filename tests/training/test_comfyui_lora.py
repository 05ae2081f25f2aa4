"""Exported LoRAs load in real ComfyUI with 0 keys dropped (skips without a checkout): a full-size SD1.5 export in
the stock loader; an SDXL export (the nodes' reduced SDXL fixture) in the stock LoraLoader and the SCott LoRA Loader;
and every key of a full-size SDXL export is one ComfyUI's key map for the full SDXL UNet knows."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.config import DistillConfig
from training.export import export_lora, to_kohya
from training.models.adapters import STUDENT, adapter_params, add_adapters
from training.models.family import SD15, SDXL

TESTS = Path(__file__).resolve().parents[1]

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

# The SDXL fixture checkpoint with its CLIP, the exported LoRA through the stock LoraLoader (its "lora key not
# loaded" lines counted) and through the SCott LoRA Loader node as ComfyUI loads the pack; prints the patch counts.
CHECK_SDXL = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    sys.path.insert(0, {nodes!r})
    from comfy_harness import Comfy, import_comfyui
    import_comfyui(Path({comfy!r}))
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    instance = Comfy({{"sdxl_checkpoint": Path({ckpt!r}), "sdxl_lora_kohya": Path({lora!r})}}, Path({work!r}))
    import comfy.sd, nodes
    model, clip = comfy.sd.load_checkpoint_guess_config({ckpt!r}, output_vae=False)[:2]
    stock_model, _ = nodes.LoraLoader().load_lora(model, clip, Path({lora!r}).name, 1.0, 1.0)
    missing = sum("lora key not loaded" in line for line in lines)
    scott = instance.nodes.NODE_CLASS_MAPPINGS["ScottLoraLoader"].execute(model, clip, Path({lora!r}).name, 1.0, 1.0)
    print(type(model.model).__name__, len(stock_model.patches), missing, len(scott.result[0].patches))
""")

# ComfyUI's map from diffusers-named kohya keys to the full-size SDXL UNet (model_lora_keys_unet's unet_to_diffusers
# part, on SDXL's own UNet config): which of the given module names it does not know.
CHECK_FULL_SDXL = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {comfy!r})
    import comfy.utils
    config = dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                  transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)
    known = {{"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in comfy.utils.unet_to_diffusers(config)
             if k.endswith(".weight")}}
    names = json.loads(sys.stdin.read())
    print(len(names), len([n for n in names if n not in known]))
""")


def meta_unet(config_folder):
    """A diffusers UNet from a config on the meta device, made real and empty: only names and shapes matter."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config_folder)))
    return unet.to_empty(device="cpu")


def exported(unet, family, path):
    """The student LoRA (rank 4, alpha 2, random weights) of `unet` exported for `family` to `path`."""
    add_adapters(unet, rank=4, alpha=2.0)
    with torch.no_grad():
        for p in adapter_params(unet, STUDENT).values():
            p.normal_(0, 0.01)
    cfg = DistillConfig(teacher="t", data="d", lora_rank=4, lora_alpha=2.0, resolution=64).resolved()
    export_lora(unet, cfg, family, f"random-{family.name}", "0" * 64, path)
    return path


def run_script(script, comfyui_path, stdin=None):
    result = subprocess.run([sys.executable, "-c", script], cwd=comfyui_path, capture_output=True, text=True,
                            input=stdin)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_comfyui_lora_loader_drops_no_key(comfyui_path, sd15_single_file, tmp_path):
    lora = exported(meta_unet(SD15.assets / "unet"), SD15, tmp_path / "scott.safetensors")
    script = CHECK.format(comfy=str(comfyui_path), ckpt=str(sd15_single_file), lora=str(lora))
    result = run_script(script, comfyui_path)
    assert "lora key not loaded" not in result.stderr + result.stdout
    keys, patches, used = map(int, result.stdout.split()[-3:])
    assert keys == 3 * patches and used == keys  # every module patched: down, up and alpha of each
    assert patches == 278  # every layer kind LCM-LoRA adapts in the SD1.5 UNet


def test_sdxl_lora_loads_in_the_stock_and_the_scott_loader_with_no_key_dropped(comfyui_path, cache_dir, tmp_path):
    import sdxl_fixtures  # tests/nodes: the reduced SDXL-family (Segmind-Vega layout) checkpoint and its UNet config

    fixtures = sdxl_fixtures.build_sdxl(cache_dir)
    config = tmp_path / "unet"
    config.mkdir()
    (config / "config.json").write_text(json.dumps(sdxl_fixtures.DIFFUSERS_UNET))
    lora = exported(meta_unet(config), SDXL, tmp_path / "loras" / "scott_sdxl.safetensors")
    script = CHECK_SDXL.format(nodes=str(TESTS / "nodes"), comfy=str(comfyui_path),
                               ckpt=str(fixtures["sdxl_checkpoint"]), lora=str(lora), work=str(tmp_path / "work"))
    result = run_script(script, comfyui_path)
    detected, stock, missing, scott = result.stdout.split()[-4:]
    modules = sum(k.endswith(".alpha") for k in load_file(str(lora)))
    assert detected == "SDXL" and int(missing) == 0
    assert int(stock) == int(scott) == modules > 0  # every module patched by both loaders


def test_every_full_size_sdxl_key_is_one_comfyui_knows(comfyui_path):
    unet = meta_unet(SDXL.assets / "unet")
    add_adapters(unet, rank=1, alpha=1.0)
    modules = {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if f".lora_A.{STUDENT}." in n}
    fake = {f"{m}.lora_{ab}.weight": torch.zeros(1, 1) for m in modules for ab in "AB"}  # names only
    names = sorted({k.rsplit(".", 2)[0] for k in to_kohya(fake, 1.0, SDXL)})
    result = run_script(CHECK_FULL_SDXL.format(comfy=str(comfyui_path)), comfyui_path, json.dumps(names))
    count, unknown = map(int, result.stdout.split()[-2:])
    # LCM-LoRA's layer kinds in SDXL's UNet, counted by hand: down 7 + 52 + 211, mid 108, up 319 + 79 + 12
    assert count == len(modules) == 788 and unknown == 0
