"""Fixtures of the trainer tests: a tiny SD-family diffusers pipeline and a tiny image + caption folder."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import DistillConfig
from training.models.family import SD15, SDXL

ASSETS = SD15.assets
TINY_VERSION = "tiny-sd-v1"
TINY_XL_VERSION = "tiny-sdxl-v1"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator (one per process in real runs): reset accelerate's state after."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tiny model's ops are too small to gain from threads, and one thread is robust on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vae():
    """A tiny AutoencoderKL: 2 levels, 4 latent channels, latents at 1/2 the pixel size."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=16,
    )


def tiny_clip_config(**extra):
    """A 2-layer, 32-wide CLIP text config over CLIP's vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **extra,
    )


def save_atomically(pipe, folder):
    """save_pretrained into folder.tmp, then rename: a killed build leaves no half folder."""
    tmp = Path(str(folder) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))
    tmp.rename(folder)


TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 norm_num_groups=8)  # both tiny UNets: 2 levels at 8x8 latents


def build_tiny_pipeline(folder):
    """A random tiny SD-family pipeline (UNet 2 levels, VAE x2, 2-layer CLIP) saved as a diffusers folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(tiny_clip_config())
    tokenizer = CLIPTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    scheduler = DDIMScheduler.from_pretrained(str(ASSETS / "scheduler"))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_atomically(pipe, folder)


TINY_TIME_DIM = 8  # addition_time_embed_dim of the tiny SDXL UNet: 6 time ids x 8 + the 32-wide pooled embedding


def tiny_sdxl_unet():
    """A tiny SDXL-architecture UNet: a plain first level, cross-attention (depth 2) at the second, text-time added
    conditioning (6 size ids + a pooled embedding), linear projections; cross-attention 64 = two 32-wide encoders."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_DIM,
        projection_class_embeddings_input_dim=6 * TINY_TIME_DIM + 32,
    )


def build_tiny_sdxl_pipeline(folder):
    """A random tiny SDXL-family pipeline (tiny_sdxl_unet, VAE x2, a 2-layer CLIP and a 2-layer CLIP with a 32-wide
    projection, SDXL's shipped tokenizers and scheduler) saved as a diffusers folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(projection_dim=32)),
        tokenizer=CLIPTokenizer.from_pretrained(str(SDXL.assets / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(SDXL.assets / "tokenizer_2")),
        unet=tiny_sdxl_unet(),
        scheduler=EulerDiscreteScheduler.from_pretrained(str(SDXL.assets / "scheduler")),
        add_watermarker=False,
    )
    save_atomically(pipe, folder)


def cached_build(cache_dir, version, build):
    """cache_dir/version, built once by build(folder)."""
    folder = cache_dir / version
    if not (folder / "model_index.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        build(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(cache_dir):
    """Path of the cached tiny SD1.5-family diffusers pipeline (built once)."""
    return cached_build(cache_dir, TINY_VERSION, build_tiny_pipeline)


@pytest.fixture(scope="session")
def tiny_xl_teacher(cache_dir):
    """Path of the cached tiny SDXL-family diffusers pipeline (built once)."""
    return cached_build(cache_dir, TINY_XL_VERSION, build_tiny_sdxl_pipeline)


@pytest.fixture(params=["sd15", "sdxl"])
def family_teacher(request):
    """The tiny teacher of each family in turn: a test that takes it runs on both."""
    return request.getfixturevalue({"sd15": "tiny_teacher", "sdxl": "tiny_xl_teacher"}[request.param])


def assert_same_conditioning(a, b, **tolerances):
    """Two Conditionings hold the same tensors (torch.testing.assert_close with `tolerances`), None where None."""
    for name in ("states", "pooled", "time_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, msg=name, **tolerances)


@pytest.fixture
def same_conditioning():
    return assert_same_conditioning


def write_images(folder, n, size=20, seed=0):
    """n random-ish images (smooth colour fields) with same-name captions."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(n):
        base = torch.rand(3, 1, 1, generator=generator) * 255
        ramp = torch.linspace(0, 60, size).reshape(1, 1, size)
        pixels = (base + ramp + ramp.transpose(1, 2)).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a picture number {i}")
    return folder


@pytest.fixture
def tiny_data(tmp_path):
    return write_images(tmp_path / "data", 8)


TINY_FLAGS = dict(
    resolution=16,
    batch_size=2,
    max_steps=2,
    lora_rank=4,
    disc_lora_rank=4,
    validate_every=0,
    num_workers=0,
    checkpoint_every=0,
    log_every=1,
    buckets=False,  # 16 px is under the 64 px buckets: the tiny runs train square crops unless a test asks
    validation_samples=4,  # keep-best scores 4 samples (its withheld captions when validation is on)
    synth_steps=4,  # the teacher's reference samples for keep-best (and data-free images) in 4 steps
)


def make_tiny_config(teacher, data, output, **overrides):
    """A resolved config for the tiny model: 16 px, batch 2, rank 4, no validation, no workers."""
    values = dict(teacher=str(teacher), data=str(data), output=str(output), **TINY_FLAGS)
    values.update(overrides)
    return DistillConfig(**values).resolved()


def tiny_argv(teacher, data, output, **overrides):
    """The same run as CLI arguments."""
    values = {**TINY_FLAGS, **overrides}
    argv = ["--teacher", str(teacher), "--data", str(data), "--output", str(output)]
    for key, value in values.items():
        flag = key.replace("_", "-")
        argv += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return argv


@pytest.fixture(scope="session")
def tiny_config():
    return make_tiny_config


@pytest.fixture
def tiny_args():
    return tiny_argv


@pytest.fixture
def images():
    return write_images


# --- A random-weight full SD1.5 checkpoint in the original (CompVis / A1111) single-file layout ---

SD15_FILE = "sd15-random-original-layout-fp16-v1.safetensors"


def _sub(rules, key):
    """Apply (regex, replacement) rules in order."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _unet_rules():
    def level(block, offset):
        return lambda m: f"{block}.{3 * int(m.group(1)) + int(m.group(2)) + offset}."

    return [
        (r"^time_embedding\.linear_1\.", "time_embed.0."),
        (r"^time_embedding\.linear_2\.", "time_embed.2."),
        (r"^conv_in\.", "input_blocks.0.0."),
        (r"^conv_norm_out\.", "out.0."),
        (r"^conv_out\.", "out.2."),
        (r"\.norm1\.(?=(weight|bias)$)", ".in_layers.0."),
        (r"\.conv1\.", ".in_layers.2."),
        (r"\.norm2\.(?=(weight|bias)$)", ".out_layers.0."),
        (r"\.conv2\.", ".out_layers.3."),
        (r"\.time_emb_proj\.", ".emb_layers.1."),
        (r"\.conv_shortcut\.", ".skip_connection."),
        (r"^down_blocks\.(\d)\.resnets\.(\d)\.", lambda m: level("input_blocks", 1)(m) + "0."),
        (r"^down_blocks\.(\d)\.attentions\.(\d)\.", lambda m: level("input_blocks", 1)(m) + "1."),
        (
            r"^down_blocks\.(\d)\.downsamplers\.0\.conv\.",
            lambda m: f"input_blocks.{3 * int(m.group(1)) + 3}.0.op.",
        ),
        (r"^up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: level("output_blocks", 0)(m) + "0."),
        (r"^up_blocks\.(\d)\.attentions\.(\d)\.", lambda m: level("output_blocks", 0)(m) + "1."),
        (
            r"^up_blocks\.(\d)\.upsamplers\.0\.",
            lambda m: f"output_blocks.{3 * int(m.group(1)) + 2}.{1 if m.group(1) == '0' else 2}.",
        ),
        (r"^mid_block\.attentions\.0\.", "middle_block.1."),
        (r"^mid_block\.resnets\.(\d)\.", lambda m: f"middle_block.{2 * int(m.group(1))}."),
    ]


def unet_to_original(key):
    """diffusers UNet key -> 'model.diffusion_model.<CompVis key>' (SD1.5 block layout).
    Resnet renames only apply inside resnets: transformer blocks keep norm1/norm2."""
    rules = _unet_rules()
    if ".resnets." in key:
        key = _sub(rules[5:11], key)
    return "model.diffusion_model." + _sub(rules[:5] + rules[11:], key)


def vae_to_original(key, value):
    """diffusers VAE key, tensor -> 'first_stage_model.<CompVis key>', tensor (attention: 1x1 convs)"""
    rules = [
        (r"^encoder\.down_blocks\.(\d)\.resnets\.(\d)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (
            r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.",
            lambda m: f"decoder.up.{3 - int(m.group(1))}.block.{m.group(2)}.",
        ),
        (
            r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{3 - int(m.group(1))}.upsample.",
        ),
        (r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.conv_norm_out\.", ".norm_out."),
    ]
    attention = [
        (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
        (r"\.group_norm\.", ".norm."),
        (r"\.to_q\.", ".q."),
        (r"\.to_k\.", ".k."),
        (r"\.to_v\.", ".v."),
        (r"\.to_out\.0\.", ".proj_out."),
    ]
    if ".attentions." in key:
        key = _sub(attention, key)
        if value.ndim == 2:
            value = value[:, :, None, None]
    return "first_stage_model." + _sub(rules, key), value


def text_encoder_to_original(key):
    """transformers CLIPTextModel key -> 'cond_stage_model.transformer.text_model.<key>'."""
    return "cond_stage_model.transformer." + (key if key.startswith("text_model.") else "text_model." + key)


def original_layout(unet, vae, text_encoder):
    """The three state dicts merged under original single-file keys, fp16."""
    out = {unet_to_original(k): v for k, v in unet.state_dict().items()}
    out.update(dict(vae_to_original(k, v) for k, v in vae.state_dict().items()))
    out.update({text_encoder_to_original(k): v for k, v in text_encoder.state_dict().items()})
    return {k: v.detach().to(torch.float16).contiguous() for k, v in out.items()}


def build_sd15_single_file(path):
    """Random full-size SD1.5 UNet / VAE / CLIP-L from the shipped configs, saved in the original layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(ASSETS / "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(ASSETS / "vae")))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(ASSETS / "text_encoder")))
    state = original_layout(unet, vae, text_encoder)
    del unet, vae, text_encoder
    tmp = Path(str(path) + ".tmp")
    save_file(state, str(tmp))
    tmp.rename(path)


@pytest.fixture(scope="session")
def sd15_single_file(cache_dir):
    """Path of the cached random SD1.5 checkpoint (about 2 GB, built once)."""
    path = cache_dir / SD15_FILE
    if not path.is_file():
        build_sd15_single_file(path)
    return path


# --- Random-weight scoring networks of training.eval (FID Inception-v3, a tiny CLIP) ---

INCEPTION_VERSION = "fid-inception-random-v1.pth"
CLIP_VERSION = "tiny-clip-random-v1"


@pytest.fixture(scope="session")
def inception_file(cache_dir):
    """A random-weight state dict of the FID Inception-v3 architecture (same keys and shapes as the real file)."""
    path = cache_dir / INCEPTION_VERSION
    if not path.is_file():
        torch.manual_seed(0)
        from training.eval import scorers

        tmp = path.with_suffix(".tmp")
        torch.save(scorers.fid_inception_v3().state_dict(), tmp)
        tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def clip_folder(cache_dir):
    """A tiny random transformers CLIP model + processor folder (32 px images, SD1.5's CLIP tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = cache_dir / CLIP_VERSION
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                    pad_token_id=49407)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                      patch_size=8)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = CLIPProcessor(image_processor=images, tokenizer=CLIPTokenizer.from_pretrained(ASSETS / "tokenizer"))
        tmp = Path(str(folder) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        tmp.rename(folder)
    return folder


def torchmetrics_clip_score(model, processor, images, captions):
    """torchmetrics' CLIPScore of uint8 CHW tensors and captions, on our CLIP model and processor."""
    from torchmetrics import multimodal

    class Features(torch.nn.Module):
        """CLIPModel's own get_*_features, as plain tensors (transformers 5 returns output objects)."""

        def __init__(self):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return _tensor(self.model.get_image_features(pixel_values=pixel_values))

        def get_text_features(self, input_ids, attention_mask=None):
            return _tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    reference = multimodal.CLIPScore(model_name_or_path=lambda: (Features(), processor))
    reference.update(images, captions)
    return reference.compute().item()


def _tensor(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def pytorch_fid_of(a, b):
    """pytorch-fid's Frechet distance (scipy sqrtm) of two numpy feature sets."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    return calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@pytest.fixture(scope="session")
def references():
    """The independent references of FID and CLIP score: .fid(a, b) by pytorch-fid, .clip_score(...) by
    torchmetrics."""
    from types import SimpleNamespace

    return SimpleNamespace(fid=pytorch_fid_of, clip_score=torchmetrics_clip_score)
