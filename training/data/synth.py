"""Data-free distillation: draw training images from the teacher itself into an image + caption folder cache."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class SynthItem:
    """Image `index` of the cache: its prompt and its seed."""

    index: int
    prompt: str
    seed: int

    @property
    def stem(self):
        return f"{self.index:06d}"


def plan(prompts, n_images, seed=0):
    """Image i takes prompts[i % len(prompts)] and seed + i: the same plan on every process and every rerun."""
    if n_images < 1:
        raise ValueError(f"synth_images must be >= 1, got {n_images}")
    return [SynthItem(i, prompts[i % len(prompts)], seed + i) for i in range(n_images)]


def shard(items, rank, world_size):
    """The items process `rank` of `world_size` generates: every world_size-th, so shards neither overlap nor gap."""
    return items[rank::world_size]


def is_cached(folder, item):
    """An image counts once its .png exists: the .txt caption is written first, the .png last, each atomically."""
    return (Path(folder) / f"{item.stem}.png").is_file()


def save_pair(folder, stem, text, image):
    """Write stem.txt then stem.png, each to a temporary name renamed into place, so a kill leaves no half file."""
    folder = Path(folder)
    caption, png = folder / f"{stem}.txt", folder / f"{stem}.png"
    tmp_caption, tmp_png = caption.with_suffix(".txt.tmp"), png.with_suffix(".png.tmp")
    tmp_caption.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp_caption, caption)
    image.save(tmp_png, format="PNG")
    os.replace(tmp_png, png)


def synthesize(generate, items, folder, batch_size=4, rank=0, show_progress=True):
    """Generate the uncached items in batches with generate(prompts, seeds) -> PIL images; returns how many it made."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [item for item in items if not is_cached(folder, item)]
    bar = tqdm(
        total=len(items), initial=len(items) - len(todo), unit="img", desc=f"teacher images (rank {rank})",
        disable=not show_progress,
    )
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        for item, image in zip(batch, generate([i.prompt for i in batch], [i.seed for i in batch])):
            save_pair(folder, item.stem, item.prompt, image)
        bar.update(len(batch))
    bar.close()
    return len(todo)


def pipeline_generator(pipe, steps=25, cfg=7.5, resolution=512):
    """generate(prompts, seeds) over a diffusers text-to-image pipeline, one torch.Generator per image."""

    def generate(prompts, seeds):
        generators = [torch.Generator(device=pipe.device).manual_seed(seed) for seed in seeds]
        return pipe(
            prompt=prompts, num_inference_steps=steps, guidance_scale=cfg, height=resolution, width=resolution,
            generator=generators, output_type="pil",
        ).images

    return generate


def teacher_pipeline(teacher):
    """The family's diffusers pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline) over the teacher's
    modules with DPM-Solver++ 2M on the teacher's own scheduler config (timestep spacing included), no safety
    checker or watermark: the one teacher sampler of synthesis, evaluation and the world."""
    from diffusers import DPMSolverMultistepScheduler

    from ..models.teacher import family_pipeline

    scheduler = DPMSolverMultistepScheduler.from_pretrained(
        str(teacher.scheduler_config), algorithm_type="dpmsolver++", solver_order=2
    )
    pipe = family_pipeline(teacher.family, teacher.vae, teacher.unet, teacher.text_encoders, teacher.tokenizers,
                           scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def synthesize_run(cfg, teacher, prompts, device, rank=0, world_size=1):
    """Fill <output>/synth with this process's shard of the run's images; returns (folder, images made).
    Lean: the teacher runs in its load dtype (bf16 under the CUDA default), the VAE decodes one image at a time,
    and the pipeline is freed and the CUDA cache emptied before training starts."""
    folder = Path(cfg.output) / "synth"
    pipe = teacher_pipeline(teacher).to(device)
    pipe.vae.enable_slicing()
    try:
        generate = pipeline_generator(pipe, cfg.synth_steps, cfg.synth_cfg, cfg.resolution)
        items = shard(plan(prompts, cfg.synth_images, cfg.seed), rank, world_size)
        made = synthesize(generate, items, folder, cfg.batch_size, rank, show_progress=rank == 0)
    finally:
        pipe.vae.disable_slicing()
        del pipe
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return folder, made
