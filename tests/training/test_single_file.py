"""Single-file checkpoints in the original layout load offline, every tensor in place: a full-size SD1.5 one, and
an SDXL-family one (the nodes' reduced SDXL fixture: full-size CLIP-L, OpenCLIP bigG and VAE) against the shipped
SDXL configs and tokenizers."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from training.models.family import SD15, SDXL
from training.models.teacher import check_teacher_path

REPO = Path(__file__).resolve().parents[2]

# Loads the teacher with the hub switched off and an empty HF cache, maps every loaded tensor back to its
# original key (the test's own inverse of diffusers' converter) and compares it with the file: a wrong
# mapping anywhere fails.
CHECK = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import original_layout
    from safetensors import safe_open
    from training.models.family import SD15, SDXL
    from training.models.teacher import load_teacher
    teacher = load_teacher({path!r})
    loaded = original_layout(teacher.unet, teacher.vae, *teacher.text_encoders)
    with safe_open({path!r}, "pt") as f:
        keys = set(f.keys())
        assert set(loaded) <= keys, sorted(set(loaded) - keys)[:5]
        bad = [k for k in loaded if not torch.equal(loaded[k], f.get_tensor(k))]
    assert not bad, bad[:5]
    (tokenizer,) = teacher.tokenizers
    assert teacher.unet.dtype == torch.float32 and tokenizer.model_max_length == 77
    assert teacher.scheduler_config == SD15.assets / "scheduler"  # a single file samples on the shipped config
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and len(ids) == 77
    print("OK", len(loaded), sum(p.numel() for p in teacher.unet.parameters()))
""")


def test_original_layout_sd15_loads_offline_and_round_trips(sd15_single_file, tmp_path):
    assert check_teacher_path(sd15_single_file) is SD15
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(REPO),
    }
    script = CHECK.format(tests=str(Path(__file__).parent), path=str(sd15_single_file))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    count, unet_params = result.stdout.split()[-2:]
    assert int(count) > 1000 and int(unet_params) == 859_520_964
    assert not any((tmp_path / "hf").rglob("*.json"))  # nothing was fetched or cached


# The SDXL fixture loaded by load_teacher offline against the shipped SDXL assets (its reduced UNet's config swapped
# in); every loaded tensor mapped back to its original key by independent maps (ComfyUI's unet_to_diffusers for the
# UNet, the OpenCLIP layout for bigG, the SD1.5 test's for the VAE) and compared with the file.
CHECK_SDXL = textwrap.dedent("""
    import dataclasses, shutil, sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    sys.path.insert(0, {comfy!r})
    import comfy.utils
    from conftest import vae_to_original
    from safetensors import safe_open
    from sdxl_fixtures import DIFFUSERS_UNET, SDXL_UNET
    import training.models.family as family
    from training.models.teacher import encode_captions, load_teacher
    assets = Path({work!r}) / "sdxl"
    shutil.copytree(family.SDXL.assets, assets)
    (assets / "unet" / "config.json").write_text(__import__("json").dumps(DIFFUSERS_UNET))
    family.FAMILIES["sdxl"] = dataclasses.replace(family.SDXL, assets=assets)
    teacher = load_teacher({path!r})
    clip_l, big_g = teacher.text_encoders
    loaded = {{}}
    to_ldm = comfy.utils.unet_to_diffusers(SDXL_UNET)
    loaded.update({{"model.diffusion_model." + to_ldm[k]: v for k, v in teacher.unet.state_dict().items()
                   if k in to_ldm}})
    loaded.update(dict(vae_to_original(k, v) for k, v in teacher.vae.state_dict().items()))
    loaded.update({{"conditioner.embedders.0.transformer." + ("" if k.startswith("text_model.") else "text_model.")
                   + k: v for k, v in clip_l.state_dict().items() if "position_ids" not in k}})
    g = big_g.state_dict()
    prefix, out = "conditioner.embedders.1.model.", {{}}
    out["token_embedding.weight"] = g["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = g["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = g["text_projection.weight"].T
    for ours, theirs in (("final_layer_norm", "ln_final"),):
        for p in ("weight", "bias"):
            out[f"{{theirs}}.{{p}}"] = g[f"text_model.{{ours}}.{{p}}"]
    for i in range(big_g.config.num_hidden_layers):
        layer, block = f"text_model.encoder.layers.{{i}}.", f"transformer.resblocks.{{i}}."
        for p in ("weight", "bias"):
            out[block + f"attn.in_proj_{{p}}"] = torch.cat([g[layer + f"self_attn.{{x}}_proj.{{p}}"] for x in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[block + f"{{theirs}}.{{p}}"] = g[layer + f"{{ours}}.{{p}}"]
    loaded.update({{prefix + k: v for k, v in out.items()}})
    with safe_open({path!r}, "pt") as f:
        keys = set(f.keys())
        assert set(loaded) <= keys, sorted(set(loaded) - keys)[:5]
        bad = [k for k in loaded if not torch.equal(loaded[k].to(torch.float16), f.get_tensor(k))]
    assert not bad, bad[:5]
    unet_keys = {{k for k in keys if k.startswith("model.diffusion_model.")}}
    assert unet_keys <= set(loaded), sorted(unet_keys - set(loaded))[:5]  # every UNet tensor of the file checked
    cond = encode_captions(teacher, ["a photo of a cat"])
    assert cond.states.shape == (1, 77, 2048) and cond.pooled.shape == (1, 1280)
    print("OK", len(loaded), len(keys))
""")


def test_original_layout_sdxl_loads_offline_against_the_shipped_configs(comfyui_path, cache_dir, tmp_path):
    import sdxl_fixtures  # tests/nodes: the reduced SDXL-family checkpoint

    path = sdxl_fixtures.build_sdxl(cache_dir)["sdxl_checkpoint"]
    assert check_teacher_path(path) is SDXL
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'nodes'}"}
    script = CHECK_SDXL.format(tests=str(Path(__file__).parent), comfy=str(comfyui_path), work=str(tmp_path),
                               path=str(path))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded, total = map(int, result.stdout.split()[-2:])
    assert loaded > 1000 and total - loaded < 10  # at most position ids and the like left unchecked
    assert not any((tmp_path / "hf").rglob("*.json"))  # nothing was fetched or cached
