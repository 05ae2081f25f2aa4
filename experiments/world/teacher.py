"""The shapes world's tiny teachers: an SD1.5- or SDXL-family pipeline trained from scratch on world scenes, on a CPU.

`python -m experiments.world.teacher --out training/assets/demo --minutes 45` renders a pool of world images, trains
a small AutoencoderKL on them (phase 1, ~15% of the budget), encodes the pool once to latents, then trains a small
UNet2DConditionModel and a CLIP text model from scratch together with SD's epsilon loss on SD's noise schedule
(phase 2), and saves an fp16 StableDiffusionPipeline folder that `training.models.teacher.load_teacher` opens. The CLIP
tokenizer and the noise schedule are SD1.5's own (training/assets/sd15), so the folder is an SD1.5-family teacher
in everything but size. Ctrl-C (or SIGTERM) ends the current phase early and still saves.

`--family sdxl` builds the SDXL-family one (`--teacher demo-xl`: `--out training/assets/demo_xl`): two text encoders
(a CLIP text model and a CLIP text model with projection, SDXL's tokenizers), their penultimate hidden states
concatenated, the second's pooled embedding and SDXL's size time ids as the UNet's text-time added conditioning,
zeros as the dropped caption (SDXL's empty prompt); a quarter of the pool is shown as SDXL's training shows
low-resolution originals (rendered at 32 or 48 px, upscaled, told that original size) and another quarter as random
crops (told their crop offset), so the size conditioning means what it means in SDXL; sampling asks for uncropped
64 px originals. Saved as a StableDiffusionXLPipeline folder.

`--world diverse` trains on the diverse world's captions (the same images, captions naming only some attributes);
`--init FOLDER` starts from a saved teacher: its VAE (and latent scale) is kept, phase 1 is skipped, and its UNet and
text encoder train further on this world's captions (how the diverse teacher is made from the demo one:
`python -m experiments.world.teacher --init training/assets/demo --world diverse --minutes 30 --lr 3e-4 --threads 1
--out experiments/world/assets/diverse_teacher`).
"""

import argparse
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scott_core.schedule import alphas_cumprod
from training.data import scenes
from training.data.synth import teacher_pipeline
from training.models.family import FAMILIES, square_sizes
from training.models.teacher import encode_tokens, family_pipeline, load_teacher, tokenize

# Sizes of the full teacher and of the seconds-long --quick one (the test's).
SIZES = {
    "full": dict(
        vae_channels=(16, 32, 64),
        vae_groups=8,
        unet_channels=(32, 64, 96),
        unet_groups=16,
        heads=2,
        text_dims={"sd15": (64,), "sdxl": (48, 32)},  # per text encoder
        text_layers=3,
        time_dim=16,  # SDXL's addition_time_embed_dim (256 in SDXL)
        pool=32_000,
        vae_batch=32,
        unet_batch=64,
    ),
    "quick": dict(
        vae_channels=(8, 16, 16),
        vae_groups=4,
        unet_channels=(16, 32, 32),
        unet_groups=8,
        heads=2,
        text_dims={"sd15": (32,), "sdxl": (16, 16)},
        text_layers=2,
        time_dim=8,
        pool=64,
        vae_batch=8,
        unet_batch=8,
    ),
}
QUICK_STEPS = 3
VAE_FRACTION = 0.15
KL_WEIGHT = 1e-4  # per latent element, against per-pixel L1 + MSE
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.999
PROMPTS = [
    "a large red circle on the left on a grey background",
    "a small blue square at the top on a white background",
    "a large yellow triangle in the center on a black background",
    "a small green circle at the bottom on a grey background",
    "a large purple square on the right on a white background",
    "a small red triangle above a large blue circle on a white background",
    "a large green square left of a small yellow circle on a grey background",
    "a small purple circle above a small yellow square on a black background",
]


class Stop(Exception):
    """SIGTERM, raised as an exception so that a phase can end early and the run still saves."""


def vae_model(size):
    """A 3-level AutoencoderKL: 64 px -> 16x16x4 latents (factor 4, as 2 ** (levels - 1) says)."""
    from diffusers import AutoencoderKL

    levels = len(size["vae_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=size["vae_channels"],
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=size["vae_groups"],
        sample_size=scenes.SIZE,
    )


def unet_model(size, family):
    """A 16x16 UNet2DConditionModel: a plain first level, cross-attention at 8x8 and 4x4 (and in the middle), as wide
    as the family's text encoders together; SDXL's text-time added conditioning (6 size ids + the pooled embedding)
    and linear projections for the SDXL family."""
    from diffusers import UNet2DConditionModel

    dims = size["text_dims"][family.name]
    added = dict(
        addition_embed_type="text_time",
        addition_time_embed_dim=size["time_dim"],
        projection_class_embeddings_input_dim=6 * size["time_dim"] + dims[-1],
        use_linear_projection=True,
    ) if family.time_ids else {}
    return UNet2DConditionModel(
        sample_size=scenes.SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=size["unet_channels"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(dims),
        attention_head_dim=size["heads"],  # diffusers reads this as the number of heads
        norm_num_groups=size["unet_groups"],
        **added,
    )


def text_model(dim, layers, tokenizer, projection=False):
    """A small CLIP text model over the shipped CLIP tokenizer's vocabulary and special tokens; with a projection
    of its pooled output (SDXL's second encoder) if asked."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=dim,
        intermediate_size=4 * dim,
        num_hidden_layers=layers,
        num_attention_heads=max(1, dim // 16),
        projection_dim=dim,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def text_models(size, tokenizers, family):
    """One small text model per text encoder of the family (the pooled one with a projection)."""
    dims = size["text_dims"][family.name]
    return tuple(text_model(dim, size["text_layers"], tokenizer, projection=name == family.pooled_from)
                 for name, dim, tokenizer in zip(family.text_encoders, dims, tokenizers))


def initial_models(init, size, family, vae_from=None):
    """(tokenizers, vae, unet, text encoders): new ones of `size` for `family` (the VAE of the saved teacher
    `vae_from` if given), or those of the saved teacher `init` (fp32; its family must be `family`), its UNet and text
    encoders trainable."""
    if init is None:
        from diffusers import AutoencoderKL

        tokenizers = load_tokenizers(family)
        vae = vae_model(size) if vae_from is None else AutoencoderKL.from_pretrained(str(Path(vae_from) / "vae"))
        return tokenizers, vae.float(), unet_model(size, family), text_models(size, tokenizers, family)
    teacher = load_teacher(init)
    if teacher.family is not family:
        raise SystemExit(f"--init {init} is an {teacher.family.name} teacher; give --family {teacher.family.name}")
    for module in (teacher.unet, *teacher.text_encoders):
        module.requires_grad_(True)
    return teacher.tokenizers, teacher.vae, teacher.unet, teacher.text_encoders


def load_tokenizers(family):
    """The family's shipped CLIP tokenizers."""
    from transformers import CLIPTokenizer

    return tuple(CLIPTokenizer.from_pretrained(str(family.assets / name)) for name in family.tokenizers)


def size_augmented(images, generator, low_res=(32, 48), crop_min=40):
    """SDXL's size conditioning on the pool: (images, sizes [N, 6] as training.data.images.crop_sizes gives them).
    The first quarter (in a seeded order) is upscaled from a low-resolution original (told that original size), the
    second quarter is a random crop of at least crop_min px upscaled to 64 (told the crop offset in the upscaled
    image), the rest as rendered."""
    count, side = len(images), scenes.SIZE
    images, sizes = images.clone(), square_sizes(side, side, count)
    order = torch.randperm(count, generator=generator)
    for i in order[: count // 4].tolist():
        small = low_res[i % len(low_res)]
        down = F.interpolate(images[i : i + 1].float(), size=(small, small), mode="area")
        images[i] = F.interpolate(down, size=(side, side), mode="bicubic").round().clamp(0, 255).to(images.dtype)[0]
        sizes[i, :2] = small
    for i in order[count // 4 : count // 2].tolist():
        crop = int(torch.randint(crop_min, side, (1,), generator=generator))
        top, left = (int(v) for v in torch.randint(0, side - crop + 1, (2,), generator=generator))
        window = images[i : i + 1, :, top : top + crop, left : left + crop].float()
        images[i] = F.interpolate(window, size=(side, side), mode="bicubic").round().clamp(0, 255).to(images.dtype)[0]
        sizes[i, 2:4] = torch.tensor([top, left]) * side // crop
    return images, sizes


def to_pixels(images):
    """uint8 [N, 3, H, W] -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def cosine_lr(base, frac, warmup_frac, step, warmup_steps):
    """Linear warmup over the first steps, then a cosine over the time budget down to 10% of base."""
    warm = min(1.0, (step + 1) / warmup_steps)
    progress = min(1.0, max(0.0, (frac - warmup_frac) / max(1e-9, 1.0 - warmup_frac)))
    return base * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def run_phase(step_fn, seconds, max_steps, desc, log_every):
    """Call step_fn(step, frac) until `seconds` pass or `max_steps` are done; Ctrl-C / SIGTERM end it early."""
    from tqdm import tqdm

    start, step, losses = time.monotonic(), 0, []
    bar = tqdm(desc=desc, unit="step", mininterval=5.0, file=sys.stdout)
    try:
        while True:
            frac = (time.monotonic() - start) / seconds if seconds else step / max_steps
            if frac >= 1.0 or (max_steps and step >= max_steps):
                break
            losses.append(step_fn(step, frac))
            step += 1
            bar.update(1)
            if step % log_every == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}")
    except (KeyboardInterrupt, Stop):
        print(f"\n{desc}: interrupted at step {step}; keeping what is trained", flush=True)
    bar.close()
    return losses, time.monotonic() - start


def train_vae(vae, images, seconds, max_steps, batch, lr=1e-3, seed=0):
    """Phase 1: L1 + MSE reconstruction of sampled latents, plus a small KL."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()

    def step(index, frac):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, frac, 0.0, index, 50)
        pick = torch.randint(0, len(images), (batch,), generator=generator)
        pixels = to_pixels(images[pick])
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    result = run_phase(step, seconds, max_steps, "vae", 20)
    vae.eval()
    return result


@torch.no_grad()
def encode_pool(vae, images, batch=256):
    """Latent means and stds of the whole pool, and the scaling factor 1 / std of sampled latents."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(to_pixels(images[start : start + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    return mean, std, 1.0 / sampled.std().item()


def train_unet(unet, encoders, family, latents, ids, empty_ids, seconds, max_steps, batch, lr, seed=0):
    """Phase 2: SD's epsilon loss (min-SNR-5 weighted) on SD's schedule; UNet and text encoders together, with EMA.
    latents: (mean, std, scale, sizes) of the pool; ids / empty_ids: per tokenizer, the captions' and the empty
    caption's token ids. A dropped caption is the family's unconditional embedding (SD1.5: the empty caption's,
    SDXL: zeros); the UNet sees the family's conditioning (SDXL: pooled embedding and size time ids)."""
    mean, std, scale, sizes = latents
    generator = torch.Generator().manual_seed(seed + 1)
    ab = alphas_cumprod().float()
    snr = ab / (1 - ab)
    weights = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
    params = [p for module in (unet, *encoders) for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    for module in (unet, *encoders):
        module.train()

    def step(index, frac):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, frac, 0.02, index, 200)
        pick = torch.randint(0, len(mean), (batch,), generator=generator)
        z0 = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=generator)) * scale
        drop = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        t = torch.randint(0, len(ab), (batch,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        a = ab[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = encode_tokens(family, encoders, [tokens[pick] for tokens in ids])
        uncond = family.uncond(encode_tokens(family, encoders, [empty[None] for empty in empty_ids]))
        cond = family.conditioned(cond.where(drop, uncond.like(cond)), sizes[pick])
        prediction = unet(zt, t, **cond.unet_kwargs()).sample
        loss = (weights[t] * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(EMA_DECAY, (1 + index) / (10 + index))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        return loss.item()

    losses, elapsed = run_phase(step, seconds, max_steps, "unet+text", 50)
    with torch.no_grad():
        for param, average in zip(params, ema):
            param.copy_(average)
    for module in (unet, *encoders):
        module.eval()
    return losses, elapsed


def build_pipeline(family, vae, encoders, tokenizers, unet):
    """The family's pipeline of the models, with its shipped scheduler config (SD1.5: PNDM, SDXL: Euler, as they
    ship)."""
    import diffusers

    folder = family.assets / "scheduler"
    scheduler_class = json.loads((folder / "scheduler_config.json").read_text())["_class_name"]
    scheduler = getattr(diffusers, scheduler_class).from_pretrained(str(folder))
    return family_pipeline(family, vae, unet, encoders, tokenizers, scheduler)


def save(out, pipe, family, readme, prompts=PROMPTS):
    """Write the pipeline in fp16 (the files themselves, no variant), prompts.txt and README.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    pipe.to(torch.float32)
    for name in family.tokenizers:  # transformers writes a 3.6 MB tokenizer.json: ship the family's own files instead
        shutil.rmtree(out / name)
        shutil.copytree(family.assets / name, out / name)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    (out / "README.md").write_text(readme, encoding="utf-8")
    return out


@torch.no_grad()
def sample_grid(folder, path, seeds=4, steps=25, cfg=7.5, scale=2):
    """A PNG of the folder's prompts.txt (one row each, `seeds` columns) drawn with DPM-Solver++ 2M."""
    from PIL import Image, ImageDraw

    pipe = teacher_pipeline(load_teacher(folder))
    prompts = (Path(folder) / "prompts.txt").read_text(encoding="utf-8").split("\n")
    prompts = [p for p in prompts if p.strip()]
    side, label = scenes.SIZE * scale, 360
    grid = Image.new("RGB", (label + seeds * side, len(prompts) * side), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(row)
        images = pipe([prompt] * seeds, num_inference_steps=steps, guidance_scale=cfg, generator=generator).images
        words = prompt.split(" ")
        lines = [" ".join(words[i : i + 6]) for i in range(0, len(words), 6)]
        draw.multiline_text((4, row * side + 4), "\n".join(lines), fill=(0, 0, 0))
        for col, image in enumerate(images):
            grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (label + col * side, row * side))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def param_count(module):
    return sum(p.numel() for p in module.parameters())


def folder_mb(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


SCHEDULE = "scaled_linear 0.00085..0.012, 1000 steps, epsilon prediction"
XL_TEXT = """
- SDXL-family conditioning: the two text models' penultimate hidden states concatenated ({dims}), the second's
  projected pooled output and the size time ids (original size, crop top-left, target size) as the UNet's text-time
  added conditioning (time embedding {time_dim} per id); dropped captions are zeros, as SDXL's empty prompt. A quarter
  of the pool was shown upscaled from a 32 or 48 px original and a quarter as random crops (at least 40 px, upscaled),
  each told its original size or crop offset, as SDXL's training records them; samples ask for uncropped 64 px."""


def describe(args, size, models, phases, scale, mb):
    """README.md of the saved folder: how it was made, and how it ended."""
    family = FAMILIES[args.family]
    (vae_losses, vae_s), (unet_losses, unet_s) = phases
    tail = lambda losses: f"{np.mean(losses[-200:]):.4f}" if losses else "n/a"  # noqa: E731
    counts = ", ".join(f"{name} {param_count(module) / 1e6:.2f} M" for name, module in models.items())
    command = f"python -m experiments.world.teacher --out {args.out} --minutes {args.minutes:g} --lr {args.lr:g}"
    command += f" --seed {args.seed} --world {args.world} --family {args.family}"
    command += f" --init {args.init}" if args.init else ""
    command += f" --vae-from {args.vae_from}" if args.vae_from else ""
    command += " --quick" if args.quick else ""
    vae_text = (
        f"(1 / std of sampled latents over the pool); {len(vae_losses)} steps at batch {size['vae_batch']} in\n"
        f"  {vae_s / 60:.1f} min, L1 + MSE + {KL_WEIGHT:g} KL per latent element; final loss {tail(vae_losses)}."
    )
    demo = "demo" if args.family == "sd15" else "demo-xl"
    prompts_text = f"validation captions for `--teacher {demo}` grids"
    if args.world != "shapes":
        prompts_text = f"validation captions: the first {len(PROMPTS)} of the pool's {args.world} captions"
    if args.init or args.vae_from:
        vae_text = f"(and the VAE itself) taken from `{args.init or args.vae_from}`, not trained here."
    if args.init:
        title = f"{args.world.capitalize()}-world teacher"
        origin = f"fine-tuned from the teacher in `{args.init}` (its VAE kept) on the {args.world} world's captions"
    else:
        title, origin = f"Shapes-world {demo} teacher", "trained from scratch on the procedural shapes world"
        origin += f" (its VAE taken from `{args.vae_from}`)" if args.vae_from else ""
        origin += f"; the teacher of `python -m training.distill --teacher {demo}`"
    vae_channels = tuple(models["vae"].config.block_out_channels)
    dims = size["text_dims"][family.name]
    encoders = " and ".join(f"{size['text_layers']} layers x {dim}" for dim in dims)
    xl = XL_TEXT.format(dims=" + ".join(map(str, dims)), time_dim=size["time_dim"]) if family.time_ids else ""
    return f"""# {title}

A tiny {family.core.display_name}-family pipeline (diffusers folder, fp16), {origin} (`training/data/scenes.py`, 64 px).
{family.core.display_name}'s CLIP tokenizer{"s" * (len(dims) > 1)} and noise schedule ({SCHEDULE}).

Made by `{command}` (`torch.set_num_threads({torch.get_num_threads()})`).

- Parameters: {counts}; {mb:.1f} MB on disk.
- VAE: block_out_channels {vae_channels}, 16x16x4 latents at 64 px, scaling_factor {scale:.4f}
  {vae_text}
- UNet: block_out_channels {size["unet_channels"]}, cross-attention at 8x8 and 4x4, {size["heads"]} heads;
  CLIP text model{"s" * (len(dims) > 1)} {encoders}. Trained together on the pre-encoded pool
  ({size["pool"]} images, seed {args.seed}) for {len(unet_losses)} steps at batch {size["unet_batch"]} in
  {unet_s / 60:.1f} min: epsilon loss with min-SNR-{MIN_SNR_GAMMA:g} weights, {CAPTION_DROPOUT:.0%} empty
  captions, AdamW lr {args.lr:g} (warmup, cosine over the time budget), EMA {EMA_DECAY} of the weights saved;
  final loss (mean of the last 200 steps) {tail(unet_losses)}.
- `prompts.txt`: {prompts_text}.{xl}
"""


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.world.teacher", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the diffusers folder to write (e.g. training/assets/demo)")
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget of both training phases")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the UNet and text encoder")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed and the models' initial weights")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help=f"tiny models, {QUICK_STEPS} steps a phase (tests)")
    parser.add_argument("--grid", help="only draw a sample grid of --out's prompts.txt to this PNG, then exit")
    parser.add_argument("--world", default="shapes", choices=scenes.WORLDS, help="whose captions to train on")
    parser.add_argument("--init", default=None, metavar="FOLDER", help="start from this saved teacher: keep its VAE "
                        "(no phase 1), train its UNet and text encoders further")
    parser.add_argument("--vae-from", default=None, metavar="FOLDER", help="take the VAE (and latent scale) of this "
                        "saved teacher instead of training one (no phase 1): the demo-xl teacher shares the demo's")
    parser.add_argument("--family", default="sd15", choices=sorted(FAMILIES), help="the teacher's model family "
                        "(sdxl: the demo-xl teacher, training/assets/demo_xl)")
    args = parser.parse_args(argv)
    if args.grid:
        print(sample_grid(args.out, args.grid))
        return

    def stop(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, stop)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = SIZES["quick" if args.quick else "full"]
    max_steps = QUICK_STEPS if args.quick else None
    seconds = None if args.quick else args.minutes * 60
    started = time.monotonic()

    family = FAMILIES[args.family]
    tokenizers, vae, unet, encoders = initial_models(args.init, size, family, args.vae_from)
    models = {"vae": vae, "unet": unet, **dict(zip(family.text_encoders, encoders))}
    total = sum(param_count(m) for m in models.values())
    print(", ".join(f"{k} {param_count(m) / 1e6:.2f} M" for k, m in models.items()), f"({2 * total / 1e6:.1f} MB fp16)")

    images, drawn = scenes.sample_batch(size["pool"], args.seed, processes=2)
    captions = [scenes.caption_of(scene, i, args.seed, args.world) for i, scene in enumerate(drawn)]
    print(f"rendered {len(captions)} images, {len(set(captions))} distinct {args.world} captions", flush=True)
    generator = torch.Generator().manual_seed(args.seed + 2)
    images, sizes = size_augmented(images, generator) if family.time_ids else (images, None)
    remaining = lambda: None if seconds is None else max(1.0, seconds - (time.monotonic() - started))  # noqa: E731
    if args.init or args.vae_from:
        vae_phase = ([], 0.0)
        latents = (*encode_pool(vae, images)[:2], vae.config.scaling_factor)  # the UNet was trained at this scale
    else:
        vae_phase = train_vae(
            vae, images, seconds and VAE_FRACTION * seconds, max_steps, size["vae_batch"], seed=args.seed
        )
        latents = encode_pool(vae, images)
    latents = (*latents, square_sizes(scenes.SIZE, scenes.SIZE, len(images)) if sizes is None else sizes)
    vae.requires_grad_(False)
    vae.register_to_config(scaling_factor=latents[2])
    print(f"scaling_factor {latents[2]:.4f}; latent mean {latents[0].mean():.3f}", flush=True)
    del images

    ids = [tokenize(tokenizer, captions) for tokenizer in tokenizers]
    empty_ids = [tokenize(tokenizer, [""])[0] for tokenizer in tokenizers]
    unet_phase = train_unet(
        unet, encoders, family, latents, ids, empty_ids, remaining(), max_steps, size["unet_batch"], args.lr,
        args.seed,
    )
    pipe = build_pipeline(family, vae, encoders, tokenizers, unet)
    save(args.out, pipe, family, "", PROMPTS if args.world == "shapes" else captions[: len(PROMPTS)])
    readme = describe(args, size, models, (vae_phase, unet_phase), latents[2], folder_mb(args.out))
    (Path(args.out) / "README.md").write_text(readme, encoding="utf-8")
    print(readme)

    teacher = load_teacher(args.out)
    print(f"reloaded {args.out} with load_teacher: unet {teacher.unet.dtype}, {folder_mb(args.out):.1f} MB")


if __name__ == "__main__":
    main()
