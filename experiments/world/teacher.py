"""The shapes world's tiny teacher: an SD1.5-family pipeline trained from scratch on world scenes, on a CPU.

`python -m experiments.world.teacher --out training/assets/demo --minutes 45` renders a pool of world images, trains
a small AutoencoderKL on them (phase 1, ~15% of the budget), encodes the pool once to latents, then trains a small
UNet2DConditionModel and a CLIP text model from scratch together with SD's epsilon loss on SD's noise schedule
(phase 2), and saves an fp16 StableDiffusionPipeline folder that `training.models.teacher.load_teacher` opens. The CLIP
tokenizer and the noise schedule are SD1.5's own (training/assets/sd15), so the folder is an SD1.5-family teacher
in everything but size. Ctrl-C (or SIGTERM) ends the current phase early and still saves.

`--world diverse` trains on the diverse world's captions (the same images, captions naming only some attributes);
`--init FOLDER` starts from a saved teacher: its VAE (and latent scale) is kept, phase 1 is skipped, and its UNet and
text encoder train further on this world's captions (how the diverse teacher is made from the demo one:
`python -m experiments.world.teacher --init training/assets/demo --world diverse --minutes 30 --lr 3e-4 --threads 1
--out experiments/world/assets/diverse_teacher`).
"""

import argparse
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
from training.models.family import SD15
from training.models.teacher import load_teacher, tokenize

ASSETS = SD15.assets

# Sizes of the full teacher and of the seconds-long --quick one (the test's).
SIZES = {
    "full": dict(
        vae_channels=(16, 32, 64),
        vae_groups=8,
        unet_channels=(32, 64, 96),
        unet_groups=16,
        heads=2,
        text_dim=64,
        text_layers=3,
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
        text_dim=32,
        text_layers=2,
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


def unet_model(size):
    """A 16x16 UNet2DConditionModel: a plain first level, cross-attention at 8x8 and 4x4 (and in the middle)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=scenes.SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=size["unet_channels"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=size["text_dim"],
        attention_head_dim=size["heads"],  # diffusers reads this as the number of heads
        norm_num_groups=size["unet_groups"],
    )


def text_model(size, tokenizer):
    """A small CLIPTextModel over the shipped CLIP tokenizer's vocabulary and special tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    dim = size["text_dim"]
    config = CLIPTextConfig(
        hidden_size=dim,
        intermediate_size=4 * dim,
        num_hidden_layers=size["text_layers"],
        num_attention_heads=dim // 16,
        projection_dim=dim,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def initial_models(init, size):
    """(tokenizer, vae, unet, text encoder): new ones of `size`, or those of the saved teacher `init` (fp32), its UNet
    and text encoder trainable."""
    if init is None:
        tokenizer = load_tokenizer()
        return tokenizer, vae_model(size), unet_model(size), text_model(size, tokenizer)
    teacher = load_teacher(init)
    teacher.unet.requires_grad_(True)
    (text_encoder,), (tokenizer,) = teacher.text_encoders, teacher.tokenizers
    text_encoder.requires_grad_(True)
    return tokenizer, teacher.vae, teacher.unet, text_encoder


def load_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(ASSETS / "tokenizer"))


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


def train_unet(unet, text_encoder, latents, ids, empty_ids, seconds, max_steps, batch, lr, seed=0):
    """Phase 2: SD's epsilon loss (min-SNR-5 weighted) on SD's schedule; UNet and text encoder together, with EMA."""
    mean, std, scale = latents
    generator = torch.Generator().manual_seed(seed + 1)
    ab = alphas_cumprod().float()
    snr = ab / (1 - ab)
    weights = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
    params = [p for module in (unet, text_encoder) for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    unet.train()
    text_encoder.train()

    def step(index, frac):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, frac, 0.02, index, 200)
        pick = torch.randint(0, len(mean), (batch,), generator=generator)
        z0 = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=generator)) * scale
        tokens = ids[pick].clone()
        tokens[torch.rand(batch, generator=generator) < CAPTION_DROPOUT] = empty_ids
        t = torch.randint(0, len(ab), (batch,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        a = ab[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        prediction = unet(zt, t, text_encoder(tokens)[0]).sample
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
    unet.eval()
    text_encoder.eval()
    return losses, elapsed


def build_pipeline(vae, text_encoder, tokenizer, unet):
    """The StableDiffusionPipeline of the three models, with SD1.5's scheduler config (PNDM, as SD1.5 ships)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_pretrained(str(ASSETS / "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save(out, pipe, readme, prompts=PROMPTS):
    """Write the pipeline in fp16 (the files themselves, no variant), prompts.txt and README.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    pipe.to(torch.float32)
    shutil.rmtree(out / "tokenizer")  # transformers writes a 3.6 MB tokenizer.json: ship SD1.5's own files instead
    shutil.copytree(ASSETS / "tokenizer", out / "tokenizer")
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


def describe(args, size, models, phases, scale, mb):
    """README.md of the saved folder: how it was made, and how it ended."""
    (vae_losses, vae_s), (unet_losses, unet_s) = phases
    tail = lambda losses: f"{np.mean(losses[-200:]):.4f}" if losses else "n/a"  # noqa: E731
    counts = ", ".join(f"{name} {param_count(module) / 1e6:.2f} M" for name, module in models.items())
    command = f"python -m experiments.world.teacher --out {args.out} --minutes {args.minutes:g} --lr {args.lr:g}"
    command += f" --seed {args.seed} --world {args.world}" + (f" --init {args.init}" if args.init else "")
    command += " --quick" if args.quick else ""
    vae_text = (
        f"(1 / std of sampled latents over the pool); {len(vae_losses)} steps at batch {size['vae_batch']} in\n"
        f"  {vae_s / 60:.1f} min, L1 + MSE + {KL_WEIGHT:g} KL per latent element; final loss {tail(vae_losses)}."
    )
    prompts_text = "validation captions for `--teacher demo` grids"
    if args.world != "shapes":
        prompts_text = f"validation captions: the first {len(PROMPTS)} of the pool's {args.world} captions"
    if args.init:
        vae_text = f"(and the VAE itself) kept from `{args.init}`, not trained here."
        title = f"{args.world.capitalize()}-world teacher"
        origin = f"fine-tuned from the teacher in `{args.init}` (its VAE kept) on the {args.world} world's captions"
    else:
        title, origin = "Shapes-world demo teacher", (
            "trained from scratch on the procedural shapes world; the teacher of "
            "`python -m training.distill --teacher demo`"
        )
    return f"""# {title}

A tiny SD1.5-family pipeline (diffusers folder, fp16), {origin} (`training/data/scenes.py`, 64 px).
SD1.5's CLIP tokenizer and noise schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon prediction).

Made by `{command}` (`torch.set_num_threads({torch.get_num_threads()})`).

- Parameters: {counts}; {mb:.1f} MB on disk.
- VAE: block_out_channels {size["vae_channels"]}, 16x16x4 latents at 64 px, scaling_factor {scale:.4f}
  {vae_text}
- UNet: block_out_channels {size["unet_channels"]}, cross-attention at 8x8 and 4x4, {size["heads"]} heads;
  CLIP text model {size["text_layers"]} layers x {size["text_dim"]}. Trained together on the pre-encoded pool
  ({size["pool"]} images, seed {args.seed}) for {len(unet_losses)} steps at batch {size["unet_batch"]} in
  {unet_s / 60:.1f} min: epsilon loss with min-SNR-{MIN_SNR_GAMMA:g} weights, {CAPTION_DROPOUT:.0%} empty
  captions, AdamW lr {args.lr:g} (warmup, cosine over the time budget), EMA {EMA_DECAY} of the weights saved;
  final loss (mean of the last 200 steps) {tail(unet_losses)}.
- `prompts.txt`: {prompts_text}.
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
                        "(no phase 1), train its UNet and text encoder further")
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

    tokenizer, vae, unet, text_encoder = initial_models(args.init, size)
    models = {"vae": vae, "unet": unet, "text_encoder": text_encoder}
    total = sum(param_count(m) for m in models.values())
    print(", ".join(f"{k} {param_count(m) / 1e6:.2f} M" for k, m in models.items()), f"({2 * total / 1e6:.1f} MB fp16)")

    images, drawn = scenes.sample_batch(size["pool"], args.seed, processes=2)
    captions = [scenes.caption_of(scene, i, args.seed, args.world) for i, scene in enumerate(drawn)]
    print(f"rendered {len(captions)} images, {len(set(captions))} distinct {args.world} captions", flush=True)
    remaining = lambda: None if seconds is None else max(1.0, seconds - (time.monotonic() - started))  # noqa: E731
    if args.init:
        vae_phase = ([], 0.0)
        latents = (*encode_pool(vae, images)[:2], vae.config.scaling_factor)  # the UNet was trained at this scale
    else:
        vae_phase = train_vae(
            vae, images, seconds and VAE_FRACTION * seconds, max_steps, size["vae_batch"], seed=args.seed
        )
        latents = encode_pool(vae, images)
    vae.requires_grad_(False)
    vae.register_to_config(scaling_factor=latents[2])
    print(f"scaling_factor {latents[2]:.4f}; latent mean {latents[0].mean():.3f}", flush=True)
    del images

    ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    unet_phase = train_unet(
        unet, text_encoder, latents, ids, empty_ids, remaining(), max_steps, size["unet_batch"], args.lr, args.seed
    )
    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    save(args.out, pipe, "", PROMPTS if args.world == "shapes" else captions[: len(PROMPTS)])
    readme = describe(args, size, models, (vae_phase, unet_phase), latents[2], folder_mb(args.out))
    (Path(args.out) / "README.md").write_text(readme, encoding="utf-8")
    print(readme)

    teacher = load_teacher(args.out)
    print(f"reloaded {args.out} with load_teacher: unet {teacher.unet.dtype}, {folder_mb(args.out):.1f} MB")


if __name__ == "__main__":
    main()
