"""Export: kohya keys with the real alpha and SCott metadata; diffusers reloads the trained output."""

import pytest
import torch
from safetensors import safe_open

from scott_core import lora_format
from training.config import DistillConfig
from training.export import export_lora, metadata, peft_state_dict
from training.loop import build, train
from training.models.adapters import STUDENT, STUDENT_TARGETS, adapter_params, using
from training.models.conditioning import Conditioning
from training.models.family import SD15


@pytest.fixture
def trained_run(family_teacher, tiny_data, tmp_path, tiny_config):
    """A run (on each family's tiny teacher) whose student LoRA holds random non-zero weights, rank 4 with alpha 2
    (scale 0.5, not 1)."""
    run = build(tiny_config(family_teacher, tiny_data, tmp_path / "out", mode="lcm", lora_alpha=2.0))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapter_params(run.unet, STUDENT).values():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return run


def unet_inputs(unet):
    """(z, t, UNet keyword arguments) for the tiny UNet: hidden states as wide as its cross-attention, and where it
    takes SDXL's added conditioning a pooled embedding and time ids."""
    generator = torch.Generator().manual_seed(7)
    z, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([999, 300])
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    pooled, time_ids = torch.randn(2, 32, generator=generator), torch.tensor([[24.0, 16, 4, 0, 16, 16]] * 2)
    xl = unet.config.addition_embed_type == "text_time"
    return z, t, Conditioning(states, pooled, time_ids) if xl else Conditioning(states)


def test_kohya_keys_alpha_and_metadata(trained_run, tmp_path):
    path = tmp_path / "lora.safetensors"
    export_lora(trained_run.unet, trained_run.cfg, trained_run.teacher.family, "base", "0" * 64, path)
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    peft_modules = {k.rsplit(".lora_A", 1)[0] for k in peft_state_dict(trained_run.unet) if ".lora_A" in k}
    # One kohya module per peft module, each named lora_unet_<module path with _>, and nothing else.
    assert {k.split(".")[0] for k in keys} == {"lora_unet_" + m.replace(".", "_") for m in peft_modules}
    assert len(keys) == 3 * len(peft_modules)
    assert set(alphas.values()) == {2.0}
    assert (
        meta["scott.mode"] == "lcm" and meta["scott.solver"] == "ode" and meta["scott.base_model"] == "base"
    )
    assert meta["scott.base_model_sha256"] == "0" * 64 and meta["scott.resolution"] == "16"
    assert lora_format.sampling_defaults(meta) == {"steps": 4, "gamma": 1.0, "cfg": 1.0}
    family = trained_run.teacher.family
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == {
        "sd15": ("sd_v1", "stable-diffusion-v1/lora"),
        "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    }[family.name]
    # Every layer kind LCM-LoRA adapts that the tiny UNet has is exported.
    kinds = {t for t in STUDENT_TARGETS if any(m.endswith(t) for m in peft_modules)}
    assert kinds >= {
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
        "time_emb_proj",
    }


def test_diffusers_load_lora_weights_reproduces_the_student(trained_run, family_teacher, tmp_path):
    import diffusers
    from peft.utils import get_peft_model_state_dict

    path = tmp_path / "lora.safetensors"
    family = trained_run.teacher.family
    export_lora(trained_run.unet, trained_run.cfg, family, "base", "0" * 64, path)
    z, t, c = unet_inputs(trained_run.unet)
    with torch.no_grad(), using(trained_run.unet, STUDENT):
        expected = trained_run.unet(z, t, **c.unet_kwargs()).sample
    pipeline = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}[family.name]
    pipe = pipeline.from_pretrained(str(family_teacher), **family.pipeline_kwargs)
    with torch.no_grad():
        bare = pipe.unet(z, t, **c.unet_kwargs()).sample
    pipe.load_lora_weights(str(path), adapter_name="scott")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="scott")
    ours = peft_state_dict(trained_run.unet)
    assert {k.replace(".lora_A", "").replace(".lora_B", "") for k in loaded} == {
        k.replace(".lora_A", "").replace(".lora_B", "") for k in ours
    }  # 0 missing, 0 unexpected modules
    with torch.no_grad():
        got = pipe.unet(z, t, **c.unet_kwargs()).sample
    assert (expected - bare).abs().max() > 1e-2  # the LoRA matters ...
    assert (got - expected).abs().max() <= 1e-4  # ... and reloads at the same strength (alpha 2, rank 4)


def test_training_run_exports_beside_its_config(tiny_teacher, tiny_data, tmp_path, tiny_config):
    out = tmp_path / "out"
    path = train(tiny_config(tiny_teacher, tiny_data, out, max_steps=1, name="mine"))
    assert path == out / "mine.safetensors" and path.is_file()
    assert (out / "config.toml").read_text().count('solver = "er_sde_5"') == 1
    state, _ = lora_format.read_safetensors(path)
    assert lora_format.detect_format(state) == "kohya"


def test_save_every_exports_the_lora_as_a_shorter_run_would(tiny_teacher, tiny_data, tmp_path, tiny_config):
    out, short = tmp_path / "out", tmp_path / "short"
    train(tiny_config(tiny_teacher, tiny_data, out, max_steps=4, save_every=2, name="mine"))
    train(tiny_config(tiny_teacher, tiny_data, short, max_steps=2, name="mine"))
    saved = sorted(p.name for p in out.glob("mine_step*.safetensors"))
    assert saved == ["mine_step0000002.safetensors"]  # step 4 is the final LoRA itself
    at_2, meta = lora_format.read_safetensors(out / saved[0])
    final, _ = lora_format.read_safetensors(out / "mine.safetensors")
    assert meta["scott.step"] == "2"
    expected, _ = lora_format.read_safetensors(short / "mine.safetensors")
    assert at_2.keys() == expected.keys() and all(torch.equal(at_2[k], expected[k]) for k in at_2)
    assert any(not torch.equal(at_2[k], final[k]) for k in at_2 if k.endswith("lora_up.weight"))


@pytest.mark.parametrize(
    "flags, solver_keys",
    [
        (dict(mode="scott"), {"scott.solver": "er_sde_5"}),
        (dict(mode="lcm"), {"scott.solver": "ode"}),
        (dict(solver="ddim"), {"scott.solver": "ddim", "scott.eta": "0.0"}),
        (dict(solver="ddim", eta=0.3), {"scott.solver": "ddim", "scott.eta": "0.3"}),
        (
            dict(solver="noise_strength", noise_strength=0.3),
            {"scott.solver": "noise_strength", "scott.noise_strength": "0.3"},
        ),
        (dict(mode="lcm", solver="sde"), {"scott.solver": "sde"}),
        (
            dict(solver="er_sde_5_below", noise_below=300),
            {"scott.solver": "er_sde_5_below", "scott.noise_below": "300"},
        ),
    ],
)
def test_metadata_names_the_solver_and_only_the_knob_it_used(flags, solver_keys):
    meta = metadata(DistillConfig(teacher="t", data="d", **flags).resolved(), SD15, "base", "0" * 64)
    assert {k: v for k, v in meta.items() if k.startswith(("scott.solver", "scott.eta", "scott.noise"))} == solver_keys
