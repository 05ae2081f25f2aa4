"""The shapes-world teachers: the --quick runs write SD1.5- and SDXL-family folders; the shipped ones fit and load."""

import json
import signal

import pytest
import torch
from safetensors import safe_open

from experiments.world import teacher as world_teacher
from scott_core.schedule import alphas_cumprod
from training.config import DEMO_TEACHER, DEMO_XL_TEACHER
from training.data import scenes
from training.models.family import SD15, SDXL
from training.models.teacher import check_teacher_path, load_teacher

MODEL_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")


def build_quick(out, *flags):
    """world_teacher.main(--quick ...) into `out`, the process's threads and SIGTERM handler restored after."""
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    try:
        world_teacher.main(["--out", str(out), "--quick", "--threads", "1", *flags])
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, handler)
    return out


@pytest.fixture(scope="module")
def quick_teacher(tmp_path_factory):
    """A --quick teacher (tiny models, a few steps a phase), built once for this module."""
    return build_quick(tmp_path_factory.mktemp("teacher") / "demo")


@pytest.fixture(scope="module")
def quick_xl_teacher(tmp_path_factory):
    """A --quick SDXL-family teacher, built once for this module."""
    return build_quick(tmp_path_factory.mktemp("teacher") / "demo_xl", "--family", "sdxl")


def latent_size(teacher, resolution=scenes.SIZE):
    """The trainer's latent size: resolution // 2 ** (VAE levels - 1)."""
    return resolution // 2 ** (len(teacher.vae.config.block_out_channels) - 1)


def test_quick_teacher_is_an_sd15_family_folder(quick_teacher):
    assert check_teacher_path(quick_teacher) is SD15
    teacher = load_teacher(quick_teacher)
    assert latent_size(teacher) == 16 == teacher.unet.config.sample_size
    assert teacher.unet.dtype == torch.float32
    (text_encoder,), (tokenizer,) = teacher.text_encoders, teacher.tokenizers
    assert teacher.unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert tokenizer.vocab_size == text_encoder.config.vocab_size == 49408
    assert teacher.vae.config.scaling_factor != 1.0  # measured from the latents, not the default


def test_quick_teacher_files_are_fp16(quick_teacher):
    for name in MODEL_FILES + ("text_encoder/model.safetensors",):
        with safe_open(str(quick_teacher / name), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, name


def test_quick_teacher_has_sd15_schedule(quick_teacher):
    from diffusers import DDPMScheduler

    config = json.loads((quick_teacher / "scheduler" / "scheduler_config.json").read_text())
    assert config.get("prediction_type", "epsilon") == "epsilon"
    scheduler = DDPMScheduler.from_pretrained(str(quick_teacher / "scheduler"))
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), alphas_cumprod(), atol=1e-6, rtol=0)


def test_quick_teacher_prompts_are_world_captions(quick_teacher):
    prompts = (quick_teacher / "prompts.txt").read_text(encoding="utf-8").splitlines()
    parsed = [scenes.parse_caption(p) for p in prompts]
    assert len(parsed) == 8
    assert {len(scene.shapes) for scene in parsed} == {1, 2}
    assert (quick_teacher / "README.md").read_text(encoding="utf-8").startswith("# Shapes-world demo teacher")


def test_quick_teacher_generates_a_64px_image(quick_teacher):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(quick_teacher), local_files_only=True, safety_checker=None, requires_safety_checker=False
    ).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    image = pipe(world_teacher.PROMPTS[0], num_inference_steps=2, guidance_scale=7.5, generator=generator).images[0]
    assert image.size == (scenes.SIZE, scenes.SIZE)


def test_init_keeps_the_vae_and_trains_on_the_diverse_captions(quick_teacher, tmp_path):
    """--init: the saved teacher's VAE and latent scale unchanged, its UNet trained further; --world diverse: the
    prompts are diverse-world captions (same images as seed 0's pool, captions naming only some attributes)."""
    out = build_quick(tmp_path / "diverse", "--init", str(quick_teacher), "--world", "diverse")
    before, after = load_teacher(quick_teacher), load_teacher(out)
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor
    for name, value in before.vae.state_dict().items():
        assert torch.equal(after.vae.state_dict()[name], value), name
    assert any(not torch.equal(after.unet.state_dict()[k], v) for k, v in before.unet.state_dict().items())
    _, drawn = scenes.sample_batch(8, 0)
    expected = [scenes.caption_of(scene, i, 0, "diverse") for i, scene in enumerate(drawn)]
    assert (out / "prompts.txt").read_text(encoding="utf-8").splitlines() == expected
    assert (out / "README.md").read_text(encoding="utf-8").startswith("# Diverse-world teacher")


@pytest.mark.skipif(not (DEMO_TEACHER / "model_index.json").is_file(), reason="no shipped demo teacher")
def test_shipped_demo_teacher_fits_and_loads():
    assert world_teacher.folder_mb(DEMO_TEACHER) <= 20.0
    teacher = load_teacher(DEMO_TEACHER)
    assert latent_size(teacher) == 16 == teacher.unet.config.sample_size
    prompts = (DEMO_TEACHER / "prompts.txt").read_text(encoding="utf-8").splitlines()
    assert all(scenes.parse_caption(p) for p in prompts)


def test_shipped_diverse_teacher_shares_the_demo_vae_and_speaks_diverse_captions():
    folder = world_teacher.Path(world_teacher.__file__).parent / "assets" / "diverse_teacher"
    if not (folder / "model_index.json").is_file() or not (DEMO_TEACHER / "model_index.json").is_file():
        pytest.skip("the diverse or the demo teacher is not shipped here")
    assert world_teacher.folder_mb(folder) <= 20.0
    diverse, demo = load_teacher(folder), load_teacher(DEMO_TEACHER)
    for name, value in demo.vae.state_dict().items():  # --init keeps the VAE, so latents mean the same
        assert torch.equal(diverse.vae.state_dict()[name], value), name
    prompts = (folder / "prompts.txt").read_text(encoding="utf-8").splitlines()
    assert len(prompts) == 8 and all(scenes.parse_partial(p) for p in prompts)
    with pytest.raises(ValueError, match="not a shapes-world caption"):  # some name only part of the scene
        for p in prompts:
            scenes.parse_caption(p)


def test_quick_xl_teacher_is_an_sdxl_family_folder_the_sdxl_pipeline_samples(quick_xl_teacher):
    from diffusers import StableDiffusionXLPipeline

    assert check_teacher_path(quick_xl_teacher) is SDXL
    teacher = load_teacher(quick_xl_teacher)
    clip, with_projection = teacher.text_encoders
    assert type(with_projection).__name__ == "CLIPTextModelWithProjection"
    config = teacher.unet.config
    assert config.addition_embed_type == "text_time"
    assert config.cross_attention_dim == clip.config.hidden_size + with_projection.config.hidden_size
    assert config.projection_class_embeddings_input_dim == 6 * config.addition_time_embed_dim + 16
    assert [t.pad_token for t in teacher.tokenizers] == ["<|endoftext|>", "!"]  # SDXL's own tokenizers
    pipe = StableDiffusionXLPipeline.from_pretrained(str(quick_xl_teacher), local_files_only=True).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(world_teacher.PROMPTS[0], num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (scenes.SIZE, scenes.SIZE)
    assert (quick_xl_teacher / "README.md").read_text().startswith("# Shapes-world demo-xl teacher")


def test_size_augmentation_records_what_it_did():
    images = (torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    augmented, sizes = world_teacher.size_augmented(images, torch.Generator().manual_seed(1))
    low_res = sizes[:, 0] < 64
    cropped = sizes[:, 2:4].ne(0).any(dim=1)
    assert int(low_res.sum()) == 4 and set(sizes[low_res, 0].tolist()) <= {32, 48}
    assert torch.equal(sizes[low_res, 0], sizes[low_res, 1])  # square originals
    assert int(cropped.sum()) <= 4 and not (low_res & cropped).any()  # a crop at (0, 0) records no offset
    assert sizes[:, 2:4].max() <= 64 * (64 - 40) // 40 and sizes[:, 4:].eq(64).all()
    untouched = [i for i in range(16) if not low_res[i] and not cropped[i]]
    changed = [i for i in range(16) if not torch.equal(augmented[i], images[i])]
    assert len(changed) == 8 and set(changed) >= {i for i in range(16) if low_res[i] or cropped[i]}
    assert all(torch.equal(sizes[i], torch.tensor([64, 64, 0, 0, 64, 64])) for i in untouched)


@pytest.mark.skipif(not (DEMO_XL_TEACHER / "model_index.json").is_file(), reason="no shipped demo-xl teacher")
def test_shipped_demo_xl_teacher_fits_and_loads():
    assert world_teacher.folder_mb(DEMO_XL_TEACHER) <= 20.0
    teacher = load_teacher(DEMO_XL_TEACHER)
    assert teacher.family is SDXL and latent_size(teacher) == 16 == teacher.unet.config.sample_size
    prompts = (DEMO_XL_TEACHER / "prompts.txt").read_text(encoding="utf-8").splitlines()
    assert all(scenes.parse_caption(p) for p in prompts)
