"""The world report: an ablation grid of LoRAs distilled from a world's teacher (the demo one unless --teacher),
scored at 1/2/4 steps, each arm paired by seed with LCM mode and with SCott's defaults.

    python -m experiments.world.report --arms lcm scott ode_h3 --world shapes --seeds 0 1 2 3 4 --max-steps 300 \\
        --n-eval 1000 --out runs/world_grid --docs docs

For every (arm, seed) one LoRA is distilled with `python -m training.distill --teacher ...` (the same budget, data
and seed for every arm: the same data order, captions and noise), then the same evaluation captions are sampled from
the same initial noise and scored with experiments.world.evaluate against real world images. The grid is resumable:
finished LoRAs and every scored set's metrics (a JSON under --out) are kept, so a rerun trains and scores only what
is missing. Writes <docs>/world_results.json (world_<world>_<teacher folder>_results.json for another world or
teacher, e.g. world_diverse_diverse_teacher_results.json): for every arm, step count and metric [mean, std] over
seeds, the raw per-seed values and the paired differences to LCM and to SCott with their standard errors; the same
as a markdown table; and a PNG strip per row for generation seed 0.
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from scott_core.schedule import alphas_cumprod
from training.config import DEMO_DEFAULTS, DEMO_NAMES, demo_teacher
from training.data import scenes
from training.data.synth import save_pair, teacher_pipeline
from training.loop import step_lora_path
from training.models.family import square_sizes
from training.models.teacher import encode_captions, load_teacher
from training.validation import consistency_sample, decode

NO_ADV = ("--adv-weight", "0")
ARMS = {  # each differs from --mode scott's defaults (ER-SDE 5, 3 sub-steps, span 24, grid 8, adversarial) in one thing
    "lcm": ["--mode", "lcm"],
    "scott": ["--mode", "scott"],
    "scott_no_adv": ["--mode", "scott", *NO_ADV],
    "ode_h3": ["--mode", "scott", "--solver", "ode", *NO_ADV],
    "ns01": ["--mode", "scott", "--solver", "noise_strength", "--noise-strength", "0.1", *NO_ADV],
    "ns03": ["--mode", "scott", "--solver", "noise_strength", "--noise-strength", "0.3", *NO_ADV],
    "grid20": ["--mode", "scott", "--grid-spacing", "20"],
    "adv_lr": ["--mode", "scott", "--disc-lr", "1e-4"],
    "ode_adv": ["--mode", "scott", "--solver", "ode"],
    "adv_frozen": ["--mode", "scott", "--disc-lr", "0"],
    "below500": ["--mode", "scott", "--solver", "er_sde_5_below", "--noise-below", "500", *NO_ADV],
    "h1": ["--mode", "scott", "--sub-steps", "1"],
    "down_mid": ["--mode", "scott", "--disc-features", "down_mid"],
    "lcm_adv": ["--mode", "lcm", "--adv-weight", "0.4"],
    "scott_lite": ["--mode", "scott", "--solver", "ode", "--sub-steps", "1", "--adv-decay-steps", "500"],
}
REFERENCES = {"real": (0,), "teacher": (25,), "nolora": (1, 2, 4)}  # rows that train nothing: their step counts
STUDENT_STEPS = (1, 2, 4)
BASELINES = ("lcm", "scott")  # every other student arm is paired with each: the baseline, and SCott's defaults
EVAL_SEED = 7  # the real evaluation images; the trainer's world:N data uses seed 0
TEACHER_STEPS, TEACHER_CFG = 25, 7.5
METRICS = ("fd", "prompt_acc", "exact_match", "precision", "recall", "density", "coverage")
STRIP = 8  # images per PNG strip: the first 8 evaluation captions, generation seed 0
DATA_PREFIX = {"shapes": "world", "diverse": "diverse"}
DEMO_SIZES = ("resolution", "batch_size", "lr", "lora_rank", "disc_lora_rank", "num_workers")
CHECKPOINT_EVERY = 200  # a killed run resumes from its latest checkpoint


def teacher_tag(teacher):
    """'' for the demo teacher, else the teacher folder's name: what tells its LoRAs, scores and results apart."""
    return "" if teacher == "demo" else Path(teacher).name


def budget_name(world, max_steps, train_images, teacher="demo"):
    """'shapes_300_4000'; a teacher other than the demo one adds its tag."""
    return "_".join(part for part in (f"{world}_{max_steps}_{train_images}", teacher_tag(teacher)) if part)


def curve_folder(out, world, arm, seed, train_images, teacher="demo"):
    """The trainer's --output of the (world, arm, seed) run: one run per curve, its LoRAs saved along the way."""
    data = "_".join(part for part in (f"{world}_{train_images}", teacher_tag(teacher)) if part)
    return Path(out) / "loras" / data / f"{arm}_seed{seed}"


def lora_path(out, world, arm, seed, steps, train_images, teacher="demo"):
    """The (world, arm, seed) LoRA after `steps` optimiser steps (the trainer's --save-steps file)."""
    folder = curve_folder(out, world, arm, seed, train_images, teacher)
    return step_lora_path(SimpleNamespace(output=folder, name=arm), steps)


def score_path(out, world, arm, seed, steps, max_steps, train_images, n_eval, teacher="demo"):
    """The cached metrics of one scored set (a JSON) of the LoRA after max_steps optimiser steps (0 for the reference
    rows, which train nothing), sampled at `steps`; its presence means the set is done."""
    budget = f"{budget_name(world, max_steps, train_images, teacher)}_n{n_eval}"
    return Path(out) / "scores" / budget / f"{arm}_seed{seed}_{steps}step.json"


def distill_argv(world, arm, seed, folder, checkpoints, train_images, teacher="demo"):
    """The training.distill command line of one (arm, seed) run to the last of `checkpoints` (optimiser steps), the
    LoRA saved at each, resuming from its latest checkpoint; another teacher than the demo one gets the demo's
    sizes (resolution, batch, lr, ranks: DEMO_DEFAULTS), so every world's LoRAs train alike."""
    argv = ["--teacher", str(teacher), "--output", str(folder), "--name", arm, "--seed", str(seed)]
    if teacher != "demo":
        argv += [f"--{key.replace('_', '-')}={DEMO_DEFAULTS[key]}" for key in DEMO_SIZES]
    argv += ["--data", f"{DATA_PREFIX[world]}:{train_images}", "--max-steps", str(max(checkpoints)),
             "--save-steps", ",".join(map(str, sorted(checkpoints))), "--validate-every", "0",
             "--checkpoint-every", str(CHECKPOINT_EVERY), "--keep-checkpoints", "1", "--resume", "latest"]
    return argv + ARMS[arm]


def distill(loras, argv):
    """Train with the CLI unless every LoRA in `loras` already exists; prints the run's CPU seconds."""
    if not all(lora.is_file() for lora in loras):
        before = cpu_seconds()
        subprocess.run([sys.executable, "-m", "training.distill", *argv], check=True)
        print(f"trained {loras[-1].parent.name} to {loras[-1].stem}: {cpu_seconds() - before:.0f} s CPU", flush=True)
    return loras


def cpu_seconds():
    """User + system CPU seconds of this process's finished children (the training runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load_student(lora=None, teacher="demo"):
    """The teacher (default: the demo one; 'demo-xl' the SDXL-family one; fp32, CPU) with `lora` loaded into its UNet
    by its diffusers pipeline's load_lora_weights, if given."""
    model = load_teacher(demo_teacher(teacher) if teacher in DEMO_NAMES else teacher)
    if lora is not None:
        teacher_pipeline(model).load_lora_weights(str(lora))
    return model


def initial_noise(count, seed, shape):
    """The starting latents every row shares: one generator per seed."""
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def student_images(model, captions, steps, seed, batch=100):
    """uint8 HWC images from the LoRA student (a loaded teacher, load_student): multi-step consistency sampling
    (gamma 1), no CFG, the captions encoded as the trainer encodes them (with the family's size conditioning of an
    uncropped world image)."""
    ab = alphas_cumprod()
    latent = model.unet.config.sample_size
    noise = initial_noise(len(captions), seed, (model.unet.config.in_channels, latent, latent))
    out = []
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        sizes = square_sizes(scenes.SIZE, scenes.SIZE, len(chunk))
        cond = model.family.conditioned(encode_captions(model, chunk), sizes)
        generator = torch.Generator().manual_seed(seed * 7919 + start)
        x0 = consistency_sample(model.unet, cond, noise[start : start + batch], steps, ab, 1.0, generator)
        out.append(decode(model.vae, x0))
    return torch.cat(out)


@torch.no_grad()
def teacher_images(model, captions, seed, batch=100):
    """uint8 HWC images from the teacher: DPM-Solver++ 2M, 25 steps, cfg 7.5, from the shared initial noise, its
    family's pipeline."""
    pipe = teacher_pipeline(model)
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


def mean_std(values):
    """(mean, sample std) of a list; std 0 for one value."""
    v = torch.tensor(values, dtype=torch.float64)
    return v.mean().item(), (v.std().item() if len(values) > 1 else 0.0)


def paired(values, baseline):
    """The per-seed difference values - baseline over the seeds both have ({seed: value} each):
    {mean, se, n, seeds, diffs}; se = sample std of the differences / sqrt(n), None below 2 seeds."""
    seeds = sorted(set(values) & set(baseline), key=int)
    diffs = [values[s] - baseline[s] for s in seeds]
    if not diffs:
        return None
    mean, std = mean_std(diffs)
    se = std / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"mean": mean, "se": se, "n": len(diffs), "seeds": [int(s) for s in seeds], "diffs": diffs}


def is_real(diff):
    """A paired difference counts as real when |mean| > 2 standard errors."""
    return diff is not None and diff["se"] is not None and abs(diff["mean"]) > 2 * diff["se"]


def summarize(raw):
    """{arm: {steps: {metric: {seed: value}}}} -> rows ([mean, std] over seeds) and, for each of BASELINES, the
    paired differences of the student arms after it ({baseline: {arm: {steps: {metric: paired}}}})."""
    rows = {arm: {k: {m: list(mean_std(list(v.values()))) for m, v in by.items()} for k, by in per.items()}
            for arm, per in raw.items()}
    return rows, {baseline: paired_to(raw, baseline) for baseline in BASELINES}


def paired_to(raw, baseline):
    """{arm: {steps: {metric: paired}}} of every student arm but the baselines up to this one, against it."""
    if baseline not in raw:
        return {}
    skip = {*BASELINES[: BASELINES.index(baseline) + 1], *REFERENCES}
    return {arm: {k: {m: paired(v, raw[baseline][k].get(m, {})) for m, v in by.items()}
                  for k, by in per.items() if k in raw[baseline]}
            for arm, per in raw.items() if arm not in skip}


def row_name(arm, steps):
    """'lcm 1 step', 'teacher 25 steps cfg 7.5', 'real images (another draw)'."""
    if arm == "real":
        return "real images (another draw: the floor)"
    if arm == "teacher":
        return f"teacher {TEACHER_STEPS} steps cfg {TEACHER_CFG}"
    name = "teacher, no LoRA," if arm == "nolora" else arm
    return f"{name} {steps} step{'s' if int(steps) > 1 else ''}"


def markdown(rows, diffs, raw):
    """The rows (mean +- std, seeds) and the paired differences to each baseline (mean +- SE, 'real' beyond 2 SE)."""
    head = ["row", "seeds", "FD (lower is better)", *METRICS[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, per in rows.items():
        for steps, metrics in per.items():
            n = len(raw[arm][steps]["fd"])
            cells = [f"{metrics[m][0]:.3f} +- {metrics[m][1]:.3f}" if m in metrics else "-" for m in METRICS]
            lines.append(f"| {row_name(arm, steps)} | {n} | " + " | ".join(cells) + " |")
    for baseline, by_arm in diffs.items():
        if not by_arm:
            continue
        lines += ["", f"Paired difference to {baseline} (arm - {baseline}, same seed): mean +- standard error "
                  "(seeds); **real** where |mean| > 2 SE.", "", lines[0].replace("| seeds ", ""),
                  "|" + "---|" * (len(head) - 1)]
        for arm, per in by_arm.items():
            for steps, metrics in per.items():
                lines.append(f"| {row_name(arm, steps)} | " + " | ".join(diff_cell(metrics.get(m)) for m in METRICS)
                             + " |")
    return "\n".join(lines)


def diff_cell(diff):
    """One paired difference as 'mean +- se (n)', bold 'real' when beyond 2 SE."""
    if diff is None:
        return "-"
    se = "n/a" if diff["se"] is None else f"{diff['se']:.3f}"
    return f"{diff['mean']:+.3f} +- {se} ({diff['n']})" + (" **real**" if is_real(diff) else "")


class Grid:
    """One world, teacher and evaluation set: where its LoRAs, scored sets and strips go, and the real evaluation
    set. A student arm's LoRA is named by the optimiser steps it trained (one run per (arm, seed) saves all of
    them); the reference rows train nothing and are kept under 0 steps."""

    def __init__(self, out, docs, world, train_images, n_eval, teacher="demo"):
        self.out, self.docs, self.world = Path(out), Path(docs), scenes.check_world(world)
        self.train_images, self.n_eval, self.teacher = train_images, n_eval, str(teacher)
        self._real = self._model = None

    @property
    def tag(self):
        """'' for the shapes world and the demo teacher, else the world and/or the teacher's folder name."""
        world = "" if self.world == "shapes" else self.world
        return "_".join(part for part in (world, teacher_tag(self.teacher)) if part)

    @property
    def real(self):
        """The real evaluation folder: images 0..n_eval-1 of world seed EVAL_SEED, with this world's captions."""
        if self._real is None:
            self._real = scenes.write_folder(self.out / f"real_{self.world}_{self.n_eval}", self.n_eval,
                                             seed=EVAL_SEED, world=self.world)
        return self._real

    def captions(self):
        """The evaluation captions, in file order."""
        return [p.read_text(encoding="utf-8").strip() for p in sorted(self.real.glob("*.txt"))]

    def score_file(self, arm, seed, steps, trained):
        """The cached metrics of (arm, seed)'s LoRA after `trained` optimiser steps, sampled at `steps`."""
        trained = 0 if arm in REFERENCES else trained
        return score_path(self.out, self.world, arm, seed, steps, trained, self.train_images, self.n_eval,
                          self.teacher)

    def steps_of(self, arm):
        """The step counts a row is scored at (the teacher: 25; the real draw: 0)."""
        return REFERENCES.get(arm, STUDENT_STEPS)

    def done(self, arm, seed, trained):
        """True when every step count of (arm, seed) after `trained` steps has cached metrics."""
        return all(self.score_file(arm, seed, k, trained).is_file() for k in self.steps_of(arm))

    def lora(self, arm, seed, trained):
        """The (arm, seed) LoRA after `trained` optimiser steps."""
        return lora_path(self.out, self.world, arm, seed, trained, self.train_images, self.teacher)

    def cache(self, arm, seed, steps, trained, folder):
        """Score a folder against the real set and cache its metrics."""
        from .classifier import load_classifier
        from .evaluate import evaluate_folder

        self._model = self._model or load_classifier()
        metrics = evaluate_folder(folder, self.real, model=self._model)
        file = self.score_file(arm, seed, steps, trained)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps({m: float(metrics[m]) for m in METRICS}, indent=1) + "\n")

    def score(self, arm, seed, steps, trained, images, captions, keep_strip=True):
        """Write one generated set, score and cache it, and (keep_strip) keep its strip for generation seed 0."""
        file = self.score_file(arm, seed, steps, trained)
        self.cache(arm, seed, steps, trained, write_set(self.out / "sets" / file.parent.name / file.stem, images,
                                                        captions))
        if seed == 0 and keep_strip:
            name = (f"{self.tag}_" if self.tag else "") + arm
            strip(images, self.docs / "world" / (f"{name}.png" if arm == "teacher" else f"{name}_{steps}step.png"))

    def run(self, arm, seed, checkpoints, train=True, score=True):
        """Train (if `train`: one run to the last checkpoint missing, saving each) and score (if `score`) what is
        missing of (arm, seed) at each of `checkpoints` (optimiser steps; the reference rows train nothing and ignore
        them); False if some of it was left out. Strips are kept for the last checkpoint."""
        todo = [n for n in sorted(set(checkpoints)) if not self.done(arm, seed, n)]
        if not todo:
            return True
        if not score:
            return False
        if arm in REFERENCES:
            self.reference(arm, seed)
            return True
        loras = [self.lora(arm, seed, n) for n in todo]
        if train:  # the run saves every checkpoint on its way, scored (imported) ones too: they can be checked
            folder = curve_folder(self.out, self.world, arm, seed, self.train_images, self.teacher)
            saves = [n for n in checkpoints if n <= todo[-1]]
            distill(loras, distill_argv(self.world, arm, seed, folder, saves, self.train_images, self.teacher))
        for n, lora in zip(todo, loras):
            if lora.is_file():
                self.score_lora(arm, seed, n, lora, keep_strip=n == max(checkpoints))
        return all(lora.is_file() for lora in loras)

    def score_lora(self, arm, seed, trained, lora, keep_strip):
        """Sample the evaluation captions from a LoRA at every student step count missing, and score them."""
        started = time.process_time()
        captions, model = self.captions(), load_student(lora, self.teacher)
        for steps in STUDENT_STEPS:
            if not self.score_file(arm, seed, steps, trained).is_file():
                images = student_images(model, captions, steps, seed)
                self.score(arm, seed, steps, trained, images, captions, keep_strip)
        print(f"scored {arm} seed {seed} after {trained} steps: {time.process_time() - started:.0f} s CPU", flush=True)

    def reference(self, arm, seed):
        """Score a reference row: another real draw, the teacher, or the teacher without a LoRA (nolora)."""
        if arm == "real":  # another draw of real images, with their own captions
            floor = self.out / f"real_{self.world}_{self.n_eval}_s{seed}"
            self.cache(arm, seed, 0, 0, scenes.write_folder(floor, self.n_eval, EVAL_SEED + 1 + seed, self.world))
            return
        captions, model = self.captions(), load_student(None, self.teacher)
        if arm == "teacher":
            self.score(arm, seed, TEACHER_STEPS, 0, teacher_images(model, captions, seed), captions)
            return
        for steps in self.steps_of(arm):
            if not self.score_file(arm, seed, steps, 0).is_file():
                self.score(arm, seed, steps, 0, student_images(model, captions, steps, seed), captions)

    def raw(self, arms, seeds, trained):
        """{arm: {steps: {metric: {seed: value}}}} of every cached scored set among `arms` x `seeds`, each student
        arm's LoRA after trained[arm] optimiser steps (an int: the same for every arm)."""
        raw = {}
        for arm in arms:
            for seed in seeds:
                for steps in self.steps_of(arm):
                    n = trained if isinstance(trained, int) else trained.get(arm, 0)
                    file = self.score_file(arm, seed, steps, n)
                    if file.is_file():
                        for m, v in json.loads(file.read_text()).items():
                            raw.setdefault(arm, {}).setdefault(str(steps), {}).setdefault(m, {})[str(seed)] = v
        return raw

    def write(self, name, numbers, text):
        """<docs>/<name>.json (numbers) and <name>.md (text); prints the text."""
        self.docs.mkdir(parents=True, exist_ok=True)
        (self.docs / f"{name}.json").write_text(json.dumps(numbers, indent=1) + "\n")
        (self.docs / f"{name}.md").write_text(text + "\n")
        print(text)

    def results_name(self, kind="results"):
        """world_results for the shapes world and the demo teacher, world_<tag>_results otherwise (kind 'curves':
        world_curves...)."""
        return f"world_{self.tag}_{kind}" if self.tag else f"world_{kind}"


def check_arms(arms):
    """A ValueError naming any arm that is neither a trained arm nor a reference row."""
    unknown = [a for a in arms if a not in ARMS and a not in REFERENCES]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)}: choose from {', '.join([*ARMS, *REFERENCES])}")


def run_grid(out, docs, arms, world="shapes", seeds=(0, 1, 2), max_steps=300, n_eval=1000, train_images=4000,
             train=True, score=True, teacher="demo"):
    """Every arm at the same optimiser steps: train and score what is missing of arms x seeds (seed by seed, arms in
    the given order), then write <docs>/<results>.json and .md; train=False scores only LoRAs already trained,
    score=False only summarizes cached scores; what is left out is listed as missing. Returns the JSON object."""
    check_arms(arms)
    grid = Grid(out, docs, world, train_images, n_eval, teacher)
    missing = [f"{arm}_seed{seed}" for seed in seeds for arm in arms if not grid.run(arm, seed, [max_steps], train,
                                                                                     score)]
    raw = grid.raw(arms, seeds, max_steps)
    rows, diffs = summarize(raw)
    numbers = {"world": world, "teacher": str(teacher), "max_steps": max_steps, "train_images": train_images,
               "n_eval": n_eval, "seeds": list(seeds), "arms": list(arms), "missing": missing, "rows": rows,
               **{f"paired_to_{b}": d for b, d in diffs.items()}, "raw": raw}
    grid.write(grid.results_name(), numbers, markdown(rows, diffs, raw))
    return numbers


def import_results(path, out, train_images=4000):
    """Cache the per-seed values of a results JSON, this report's (one budget, or the curves' points) or the old
    one's ({"seeds", "max_steps", "n_eval", "raw": {"lcm 1 step": {metric: [per seed]}}}, the shapes world), so the
    grid reuses them instead of rerunning; returns how many scored sets it cached (sets already cached are kept)."""
    data = json.loads(Path(path).read_text())
    world, n_eval = data.get("world", "shapes"), data["n_eval"]
    train_images, teacher = data.get("train_images", train_images), data.get("teacher", "demo")
    count = 0
    for (arm, trained, steps, seed), metrics in per_set(data).items():
        trained = 0 if arm in REFERENCES else trained
        file = score_path(out, world, arm, seed, steps, trained, train_images, n_eval, teacher)
        if not file.is_file() and set(metrics) >= set(METRICS):
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps({m: metrics[m] for m in METRICS}, indent=1) + "\n")
            count += 1
    return count


def per_set(data):
    """{(arm, optimiser steps trained, sampling steps, seed): {metric: value}} from a results JSON of any format."""
    sets = {}
    if "points" in data:  # the curves: every (arm, seed) checkpoint's metrics, and the reference rows
        for arm, by_seed in data["points"].items():
            for seed, points in by_seed.items():
                for point in points:
                    for steps, metrics in point["metrics"].items():
                        sets[(arm, point["step"], int(steps), int(seed))] = metrics
        first = next(iter(data["at_budget"].values()), {"raw": {}})["raw"]
        return sets | raw_sets({arm: per for arm, per in first.items() if arm in REFERENCES}, 0)
    if "rows" in data:
        return raw_sets(data["raw"], data["max_steps"])
    names = {row_name(arm, k): (arm, k) for arm in [*ARMS, *REFERENCES] for k in REFERENCES.get(arm, STUDENT_STEPS)}
    for row, metrics in data["raw"].items():
        for i, seed in enumerate(data["seeds"]):
            arm, steps = names[row]
            sets[(arm, data["max_steps"], steps, seed)] = {m: values[i] for m, values in metrics.items()}
    return sets


def raw_sets(raw, trained):
    """{(arm, trained, sampling steps, seed): {metric: value}} of a raw block ({arm: {steps: {metric: {seed: v}}}})."""
    sets = {}
    for arm, per in raw.items():
        for steps, metrics in per.items():
            for m, by_seed in metrics.items():
                for seed, value in by_seed.items():
                    sets.setdefault((arm, trained, int(steps), int(seed)), {})[m] = value
    return sets


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.world.report", description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=["lcm", "scott", "scott_no_adv"], choices=[*ARMS, *REFERENCES],
                        help="arms to train and score (real, teacher, nolora: reference rows that train nothing)")
    parser.add_argument("--world", default="shapes", choices=scenes.WORLDS, help="shapes: full captions; diverse: "
                        "the same images with captions that name only some attributes")
    parser.add_argument("--out", default="runs/world_grid", help="work folder: LoRAs, generated sets, cached scores")
    parser.add_argument("--docs", default="docs", help="where the results JSON, table and PNG strips go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training and sampling seeds")
    parser.add_argument("--teacher", default="demo", help="the teacher folder every arm distils (default: the demo "
                        "teacher; demo-xl: the SDXL-family demo teacher; the diverse world's: "
                        "experiments/world/assets/diverse_teacher)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, default=300, help="every arm trains this many optimiser steps")
    budget.add_argument("--budgets", type=int, nargs="+", default=None, metavar="LCM_STEPS",
                        help="curves at equal training FLOPs instead: each (arm, seed) trains once, its LoRA saved "
                        "where it has spent each budget, in LCM-step equivalents (experiments/world/curves.py)")
    parser.add_argument("--train-images", type=int, default=4000, help="world images each LoRA trains on")
    parser.add_argument("--n-eval", type=int, default=1000, help="captions (and real images) per evaluation set")
    parser.add_argument("--no-train", action="store_true", help="score only LoRAs already trained; list the rest")
    parser.add_argument("--summary-only", action="store_true", help="train and score nothing: summarize the cache")
    parser.add_argument("--import-results", nargs="+", default=[], metavar="JSON",
                        help="first cache the per-seed values of results JSONs (e.g. docs/world_results.json, "
                        "docs/curves/world_curves.json) so they are not rerun")
    args = parser.parse_args(argv)
    for path in args.import_results:
        print(f"cached {import_results(path, args.out, args.train_images)} scored sets from {path}")
    common = dict(world=args.world, seeds=args.seeds, n_eval=args.n_eval, train_images=args.train_images,
                  train=not (args.no_train or args.summary_only), score=not args.summary_only, teacher=args.teacher)
    if args.budgets:
        from .curves import run_curves

        return run_curves(args.out, args.docs, args.arms, budgets=args.budgets, **common)
    return run_grid(args.out, args.docs, args.arms, max_steps=args.max_steps, **common)


if __name__ == "__main__":
    main()
