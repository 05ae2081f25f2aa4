"""The shapes-world report: teacher vs LCM-mode vs SCott LoRAs (with and without the adversarial loss) at 1/2/4 steps.

`python -m experiments.world.report --out runs/world_report --seeds 0 1 2` distills one LoRA per (arm, seed) from the
demo teacher with `python -m training.distill --teacher demo` (the same budget for every arm), samples the same
captions with the same seeds for every row, scores each set with experiments.world.evaluate against real world images,
and writes a markdown table (mean +- std over seeds), a JSON of every number and one PNG strip per row.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from scott_core.schedule import alphas_cumprod
from training.config import demo_teacher
from training.models import load_teacher, tokenize
from training.synth import save_pair, teacher_pipeline
from training.validation import consistency_sample, decode
from training.world import scenes

ARMS = {
    "lcm": ["--mode", "lcm"],
    "scott": ["--mode", "scott"],
    "scott_no_adv": ["--mode", "scott", "--adv-weight", "0"],
}
STUDENT_STEPS = (1, 2, 4)
EVAL_SEED = 7  # the real evaluation images; the trainer's world:N data uses seed 0
TEACHER_STEPS, TEACHER_CFG = 25, 7.5
METRICS = ("fd", "prompt_acc", "exact_match", "precision", "recall", "density", "coverage")
STRIP = 8  # images per PNG strip: the first 8 evaluation captions, generation seed 0


def distill(arm, seed, out, max_steps, train_images):
    """The (arm, seed) LoRA, trained by the CLI on world:train_images unless it already exists."""
    folder = Path(out) / "runs" / f"{arm}_seed{seed}"
    lora = folder / f"{arm}.safetensors"
    if not lora.is_file():
        argv = ["--teacher", "demo", "--output", str(folder), "--name", arm, "--seed", str(seed)]
        argv += ["--data", f"world:{train_images}"]
        argv += ["--max-steps", str(max_steps), "--validate-every", "0", "--checkpoint-every", "0", *ARMS[arm]]
        subprocess.run([sys.executable, "-m", "training.distill", *argv], check=True)
    return lora


def load_pipeline(lora=None):
    """The demo teacher's DPM-Solver++ 2M pipeline (training.synth.teacher_pipeline; fp32, CPU), with `lora` loaded
    if given."""
    pipe = teacher_pipeline(load_teacher(demo_teacher()))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def initial_noise(count, seed, shape):
    """The starting latents every row shares: one generator per seed."""
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def student_images(pipe, captions, steps, seed, batch=100):
    """uint8 HWC images from the LoRA student: multi-step consistency sampling (gamma 1), no CFG."""
    ab = alphas_cumprod()
    latent = pipe.unet.config.sample_size
    noise = initial_noise(len(captions), seed, (pipe.unet.config.in_channels, latent, latent))
    out = []
    for start in range(0, len(captions), batch):
        cond = pipe.text_encoder(tokenize(pipe.tokenizer, captions[start : start + batch]))[0]
        generator = torch.Generator().manual_seed(seed * 7919 + start)
        x0 = consistency_sample(pipe.unet, cond, noise[start : start + batch], steps, ab, 1.0, generator)
        out.append(decode(pipe.vae, x0))
    return torch.cat(out)


@torch.no_grad()
def teacher_images(pipe, captions, seed, batch=100):
    """uint8 HWC images from the teacher: DPM-Solver++ 2M, 25 steps, cfg 7.5, from the shared initial noise."""
    latent = pipe.unet.config.sample_size
    noise = initial_noise(len(captions), seed, (pipe.unet.config.in_channels, latent, latent))
    out = []
    for start in range(0, len(captions), batch):
        images = pipe(
            prompt=captions[start : start + batch], latents=noise[start : start + batch],
            num_inference_steps=TEACHER_STEPS, guidance_scale=TEACHER_CFG, output_type="np",
        ).images
        out.append(torch.from_numpy((images * 255).round().astype("uint8")))
    return torch.cat(out)


def write_set(folder, images, captions):
    """images + same-name captions as an evaluation folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions)):
        save_pair(folder, f"{i:05d}", caption, Image.fromarray(image.numpy()))
    return folder


def strip(images, path, scale=2):
    """The first STRIP images side by side, upscaled `scale` times (nearest), as a PNG."""
    row = torch.cat(list(images[:STRIP]), dim=1).numpy()
    image = Image.fromarray(row)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)


def summarize(results):
    """{row: {metric: [values over seeds]}} -> {row: {metric: (mean, std)}} (std: sample std, 0 for 1 seed)."""
    table = {}
    for row, metrics in results.items():
        table[row] = {}
        for name, values in metrics.items():
            v = torch.tensor(values, dtype=torch.float64)
            table[row][name] = (v.mean().item(), v.std().item() if len(values) > 1 else 0.0)
    return table


def markdown(table, seeds):
    """The summary as a markdown table, one row per (model, steps)."""
    arrows = {"fd": "FD (lower is better)"}
    head = ["row"] + [arrows.get(m, m) for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, metrics in table.items():
        cells = [f"{metrics[m][0]:.3f} +- {metrics[m][1]:.3f}" for m in METRICS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append(f"\nmean +- std over seeds {', '.join(map(str, seeds))}")
    return "\n".join(lines)


def score_row(results, row, folder, real):
    """Score one generated folder against the real set and append its metrics under `row`."""
    from .evaluate import evaluate_folder

    metrics = evaluate_folder(folder, real)
    for name in METRICS:
        results.setdefault(row, {}).setdefault(name, []).append(float(metrics[name]))


def plural(steps):
    return f"{steps} step{'s' if steps > 1 else ''}"


def add_row(results, row, key, images, captions, ctx):
    """Write one generated set, score it under `row`, and keep its strip for the first seed."""
    out, real, docs, first = ctx
    score_row(results, row, write_set(out / key, images, captions), real)
    if first:
        strip(images, docs / "world" / f"{key.rsplit('_s', 1)[0]}.png")


def run_report(out, seeds, max_steps, n_eval, docs, train_images=4000):
    """Train, sample, score; write <docs>/world_table.md, world_results.json and the strips."""
    out, docs = Path(out), Path(docs)
    real = scenes.write_folder(out / "real", n_eval, seed=EVAL_SEED)
    captions = [p.read_text(encoding="utf-8").strip() for p in sorted(real.glob("*.txt"))]
    results = {}
    for seed in seeds:
        ctx = (out, real, docs, seed == seeds[0])
        floor = scenes.write_folder(out / f"real_s{seed}", n_eval, seed=EVAL_SEED + 1 + seed)
        score_row(results, "real images (another draw: the floor)", floor, real)
        base = load_pipeline()
        images = teacher_images(base, captions, seed)
        add_row(results, f"teacher {TEACHER_STEPS} steps cfg {TEACHER_CFG}", f"teacher_s{seed}", images, captions, ctx)
        for steps in STUDENT_STEPS:
            images = student_images(base, captions, steps, seed)
            add_row(results, f"teacher, no LoRA, {plural(steps)}", f"nolora_{steps}step_s{seed}", images, captions, ctx)
        for arm in ARMS:
            pipe = load_pipeline(distill(arm, seed, out, max_steps, train_images))
            for steps in STUDENT_STEPS:
                images = student_images(pipe, captions, steps, seed)
                add_row(results, f"{arm} {plural(steps)}", f"{arm}_{steps}step_s{seed}", images, captions, ctx)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    table = summarize(results)
    docs.mkdir(parents=True, exist_ok=True)
    numbers = {"seeds": seeds, "max_steps": max_steps, "train_images": train_images, "n_eval": n_eval, "raw": results}
    (docs / "world_results.json").write_text(json.dumps(numbers, indent=1) + "\n")
    text = markdown(table, seeds)
    (docs / "world_table.md").write_text(text + "\n")
    print(text)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.world.report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/world_report", help="work folder: LoRAs, generated sets")
    parser.add_argument("--docs", default="docs", help="where the table, JSON and PNG strips go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training and sampling seeds")
    parser.add_argument("--max-steps", type=int, default=300, help="the training budget of every LoRA")
    parser.add_argument("--train-images", type=int, default=4000, help="world images each LoRA trains on")
    parser.add_argument("--n-eval", type=int, default=500, help="captions (and real images) per evaluation set")
    args = parser.parse_args(argv)
    run_report(args.out, args.seeds, args.max_steps, args.n_eval, args.docs, args.train_images)


if __name__ == "__main__":
    main()
