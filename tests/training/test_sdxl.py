"""SDXL-family teachers: the shipped configs and tokenizers, folder detection and refusals, text encoding and added
conditioning against diffusers' StableDiffusionXLPipeline, caption dropout, validation time ids, and both modes end
to end on the tiny SDXL-architecture teacher."""

import contextlib
import json

import pytest
import torch
from safetensors import safe_open

from scott_core.schedule import alphas_cumprod
from training import validation
from training.encode import batch_latents
from training.loop import build, data_batches, take_micro_batches, train
from training.models.conditioning import Conditioning
from training.models.family import SD15, SDXL
from training.models.teacher import TeacherError, check_teacher_path, encode_captions, load_teacher
from training.step import draw


def param_count(module):
    return sum(p.numel() for p in module.parameters())


def test_shipped_configs_build_sdxl_base_at_its_published_sizes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SDXL.assets / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SDXL.assets / "vae")))
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SDXL.assets / "text_encoder")))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(SDXL.assets / "text_encoder_2")))
    # SDXL base 1.0's parameter counts: UNet 2.567 B, VAE 83.7 M, CLIP-L 123.1 M, OpenCLIP bigG 694.7 M
    assert [param_count(m) for m in (unet, vae, clip_l, big_g)] == [2_567_463_684, 83_653_863, 123_060_480,
                                                                    694_659_840]
    assert unet.config.cross_attention_dim == 768 + 1280 and vae.config.scaling_factor == SDXL.core.latent_scale
    # both tokenizers give CLIP's ids; bigG's pads with "!" (id 0), CLIP-L's with the end token, as SDXL ships them
    ids = [CLIPTokenizer.from_pretrained(str(SDXL.assets / name))("a photo of a cat", padding="max_length",
                                                                   max_length=77).input_ids
           for name in ("tokenizer", "tokenizer_2")]
    assert ids[0][:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407] and ids[1][7:9] == [0, 0]


def write_folder(folder, pipeline="StableDiffusionXLPipeline", scheduler=None, **unet):
    """A diffusers folder's configs only (what detection reads): an SDXL-like UNet config with `unet` overrides."""
    configs = {
        "model_index.json": {"_class_name": pipeline},
        "unet/config.json": {"addition_embed_type": "text_time", "cross_attention_dim": 2048, "in_channels": 4,
                             **unet},
        "scheduler/scheduler_config.json": {"_class_name": "EulerDiscreteScheduler", **(scheduler or {})},
    }
    for name, config in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "pipeline, scheduler, unet, what",
    [
        ("StableDiffusionXLImg2ImgPipeline", {}, {"cross_attention_dim": 1280},
         "the SDXL refiner, a second-stage model (sdxl_refiner)"),
        ("StableDiffusionXLInpaintPipeline", {}, {"in_channels": 9},
         "an SDXL inpainting model, 9 input channels (sdxl_inpaint)"),
        ("StableDiffusionXLPipeline", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, {},
         "a v-prediction SDXL fine-tune such as NoobAI's v-pred line, zero terminal SNR (sdxl_vpred)"),
        ("StableDiffusionXLPipeline", {"_class_name": "EDMDPMSolverMultistepScheduler"}, {},
         "Playground v2.5, EDM (playground_v2.5)"),
        ("StableDiffusionXLPipeline", {"_class_name": "EDMEulerScheduler", "prediction_type": "v_prediction"}, {},
         "a v-prediction EDM SDXL model such as CosXL (sdxl_vpred_edm)"),
        ("StableDiffusionPipeline", {}, {"addition_embed_type": None, "cross_attention_dim": 1024}, "SD2.x (sd2)"),
    ],
)
def test_refused_folders_are_named_in_one_line(tmp_path, pipeline, scheduler, unet, what):
    folder = write_folder(tmp_path / "model", pipeline, scheduler, **unet)
    with pytest.raises(TeacherError) as error:
        check_teacher_path(folder)
    assert str(error.value) == (
        f"teacher {folder} is {what}; this trainer distills eps-prediction SD1.5- and SDXL-family models"
    )


def test_families_of_the_tiny_teachers(tiny_teacher, tiny_xl_teacher, tmp_path):
    assert check_teacher_path(tiny_teacher) is SD15 and check_teacher_path(tiny_xl_teacher) is SDXL
    assert check_teacher_path(write_folder(tmp_path / "xl")) is SDXL  # an eps SDXL folder, whatever its scheduler


@pytest.fixture(scope="module")
def xl(tiny_xl_teacher):
    """The tiny SDXL teacher (ours) and diffusers' own pipeline over the same folder (the reference)."""
    from diffusers import StableDiffusionXLPipeline

    return load_teacher(tiny_xl_teacher), StableDiffusionXLPipeline.from_pretrained(str(tiny_xl_teacher))


def test_captions_encode_as_the_sdxl_pipeline_encodes_a_prompt(xl):
    teacher, pipe = xl
    captions = ["a red circle", "a small blue square at the top on a white background"]
    cond = encode_captions(teacher, captions)
    with torch.no_grad():
        states, uncond_states, pooled, uncond_pooled = pipe.encode_prompt(captions, device="cpu")
    assert cond.states.shape == (2, 77, 64) and cond.pooled.shape == (2, 32) and cond.time_ids is None
    torch.testing.assert_close(cond.states, states, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    # the unconditional embedding: zeros, as the pipeline's force_zeros_for_empty_prompt gives without a negative
    uncond = SDXL.uncond(encode_captions(teacher, [""]))
    assert not uncond.states.any() and not uncond.pooled.any()
    assert not uncond_states.any() and not uncond_pooled.any()


def test_time_ids_are_the_pipelines_add_time_ids(xl):
    _, pipe = xl
    sizes = torch.tensor([[1216, 832, 64, 0, 1024, 768], [512, 2048, 0, 96, 512, 1536]])
    cond = SDXL.conditioned(Conditioning(torch.zeros(2, 77, 64), torch.zeros(2, 32)), sizes)
    for row, (h, w, top, left, target_h, target_w) in zip(cond.time_ids, sizes.tolist()):
        reference = pipe._get_add_time_ids((h, w), (top, left), (target_h, target_w), torch.float32, 32)
        assert torch.equal(row[None], reference)
    assert SD15.conditioned(Conditioning(torch.zeros(2, 77, 8)), sizes).time_ids is None


def test_caption_dropout_replaces_states_and_pooled_and_keeps_the_time_ids(tiny_xl_teacher, tiny_data, tmp_path,
                                                                           tiny_config):
    run = build(tiny_config(tiny_xl_teacher, tiny_data, tmp_path / "o", caption_dropout=0.5, batch_size=4,
                            cache_latents=False))
    (batch,), _ = take_micro_batches(data_batches(run, 0), 1)
    generator = torch.Generator().manual_seed(3)
    z0, cond = batch_latents(run, batch, generator)
    draws = draw(z0, run.grid, run.cfg, generator)
    assert draws.drop.any() and not draws.drop.all()
    model = run.accelerator.unwrap_model(run.model)
    est = model.estimate(z0, cond, run.uncond, draws)
    for i, dropped in enumerate(draws.drop.tolist()):
        expected = run.uncond if dropped else cond[i : i + 1]
        assert torch.equal(est.cond.states[i], expected.states[0])
        assert torch.equal(est.cond.pooled[i], expected.pooled[0])
    assert torch.equal(est.cond.time_ids, cond.time_ids) and cond.time_ids[:, 4:].eq(16).all()


class RecordingUNet(torch.nn.Module):
    """Stands in for the UNet in a validation grid: eps = 0, and it records the time ids of each call."""

    def __init__(self, config):
        super().__init__()
        self.config, self.calls = config, []

    def forward(self, z, t, encoder_hidden_states, added_cond_kwargs):
        self.calls.append(added_cond_kwargs["time_ids"].tolist())
        return type("Out", (), {"sample": torch.zeros_like(z)})()


def test_validation_rows_carry_their_own_size_as_time_ids(xl, tmp_path, monkeypatch):
    teacher, _ = xl
    unet = RecordingUNet(teacher.unet.config)
    monkeypatch.setattr(validation, "using", lambda unet, adapter: contextlib.nullcontext())
    lines = [validation.PromptLine("a cat"), validation.PromptLine("a dog", width=24, height=16, cfg=2.0)]
    cond = encode_captions(teacher, [line.prompt for line in lines])
    uncond = SDXL.uncond(encode_captions(teacher, ["", ""]))
    path = tmp_path / "g.png"
    validation.validation_grid(unet, teacher.vae, SDXL, cond, uncond, lines, [1], alphas_cumprod(), 16, path)
    assert unet.calls == [[[16, 16, 0, 0, 16, 16]], [[16, 24, 0, 0, 16, 24]] * 2]  # the guided row: [cond, uncond]


@pytest.mark.parametrize("mode", ["scott", "lcm"])
def test_both_modes_train_and_export_an_sdxl_lora(mode, tiny_xl_teacher, tiny_data, tmp_path, tiny_config):
    cfg = tiny_config(tiny_xl_teacher, tiny_data, tmp_path / mode, mode=mode, validate_every=1)
    path = train(cfg)
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        ups = [f.get_tensor(k) for k in keys if k.endswith("lora_up.weight")]
    assert meta["scott.mode"] == mode and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert all(k.startswith("lora_unet_") for k in keys) and any(u.abs().max() > 0 for u in ups)  # it trained
    grids = sorted(p.name for p in (tmp_path / mode / "validation").glob("step_*.png"))
    assert grids == ["step_0000001.png", "step_0000002.png"]
    with safe_open(str(tmp_path / mode / f"{cfg.name}_best.safetensors"), "pt") as f:  # keep-best scored SDXL
        best = f.metadata()
    assert best["ss_base_model_version"] == "sdxl_base_v1-0" and best["scott.step"] in ("1", "2")
    assert best["scott.validation_score_name"] == cfg.keep_best_score


def test_datafree_images_are_the_sdxl_pipelines_own(tiny_xl_teacher, tmp_path):
    import numpy as np
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
    from PIL import Image

    from training.config import DistillConfig
    from training.data.synth import synthesize_run

    cfg = DistillConfig(teacher=str(tiny_xl_teacher), output=str(tmp_path), synth_images=2, synth_steps=3,
                        synth_cfg=4.0, resolution=16, seed=5).resolved()
    folder, made = synthesize_run(cfg, load_teacher(tiny_xl_teacher), ["a red circle", "a blue square"], "cpu")
    reference = StableDiffusionXLPipeline.from_pretrained(str(tiny_xl_teacher), add_watermarker=False)
    reference.scheduler = DPMSolverMultistepScheduler.from_config(reference.scheduler.config,
                                                                  algorithm_type="dpmsolver++", solver_order=2)
    for i, prompt in enumerate(["a red circle", "a blue square"]):
        expected = reference(prompt, num_inference_steps=3, guidance_scale=4.0, height=16, width=16,
                             generator=torch.Generator().manual_seed(5 + i)).images[0]
        drawn = Image.open(folder / f"{i:06d}.png")
        assert np.abs(np.asarray(drawn, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    assert made == 2


def test_an_sdxl_teacher_defaults_to_1024_px_and_sdxl_buckets(tiny_xl_teacher, tiny_teacher, tmp_path):
    from training.config import DistillConfig
    from training.data.buckets import bucket_sizes

    xl = DistillConfig(teacher=str(tiny_xl_teacher), data=str(tmp_path)).resolved()
    sd15 = DistillConfig(teacher=str(tiny_teacher), data=str(tmp_path)).resolved()
    assert (xl.resolution, xl.min_bucket_reso, xl.max_bucket_reso) == (1024, 512, 2048)
    assert (sd15.resolution, sd15.min_bucket_reso, sd15.max_bucket_reso) == (512, 256, 1024)  # kohya's, as before
    # SDXL's own multi-aspect buckets (the SDXL report's appendix) are among kohya's sizes at 1024 over 512..2048
    sdxl_buckets = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                    (1536, 640), (640, 1536)]
    assert set(sdxl_buckets) <= set(bucket_sizes(1024, 512, 2048))


def test_an_sdxl_vae_stays_float32_under_float16_and_decodes_outside_autocast(tiny_xl_teacher, tiny_teacher):
    xl, sd15 = load_teacher(tiny_xl_teacher, dtype=torch.float16), load_teacher(tiny_teacher, dtype=torch.float16)
    assert (xl.unet.dtype, xl.vae.dtype, sd15.vae.dtype) == (torch.float16, torch.float32, torch.float16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = validation.decode(xl.vae, latents)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loop validates under the run's autocast
        assert torch.equal(validation.decode(xl.vae, latents), plain)


def test_the_evaluator_samples_an_sdxl_teacher_with_the_trainers_conditioning(xl):
    from training.eval import evaluation

    teacher, _ = xl
    cond = evaluation.encode(teacher, ["a red circle"], 24, "cpu")
    reference = encode_captions(teacher, ["a red circle"])
    assert torch.equal(cond.states, reference.states) and torch.equal(cond.pooled, reference.pooled)
    assert cond.time_ids.tolist() == [[24, 24, 0, 0, 24, 24]]  # an uncropped 24 px image
    images = evaluation.consistency_generator(teacher, 2, 1.0, 2.0, 16, "cpu")(["a red circle", "a cat"], [0, 1])
    assert [image.size for image in images] == [(16, 16)] * 2
