"""Does keep-best's score rank checkpoints as the world's judge does? Every --save-every LoRA of one shapes-world run is
scored with each of keep-best's scores (training.eval.scores.SCORES, computed by training.keep_best on the run's own
validation set, as the trainer computes them) and with the world judge's FD (experiments/world/report.py's scoring of
a LoRA: the classifier's Frechet distance on the report's evaluation captions, world seed 7); the script prints
Spearman's rank correlation of each score with the judge's FD, over the checkpoints.

    OMP_NUM_THREADS=1 python -m training.distill --teacher demo --max-steps 1000 --save-every 100 \\
        --validate-every 0 --output runs/kb1000
    OMP_NUM_THREADS=1 python -m experiments.world.keep_best --run runs/kb1000 --json docs/keep_best_world.json
    (--samples 64: keep-best with --validation-samples 64; --seed 1: other noises for the samples; --judge-seed 1:
    other noises for the judge's images)

Resumable: each LoRA's scores are cached under <run>/keep_best_scores/.
"""

import argparse
import functools
import json
import re
from pathlib import Path

import torch

from training.cli import parse_config
from training.data import scenes
from training.eval.scores import SCORES
from training.keep_best import prepare, score_values, student_sampler, teacher_features
from training.loop import build
from training.models.adapters import load_student

from . import report
from .classifier import load_classifier
from .evaluate import real_images, score

STEP_COUNTS = (1, 2, 4)


def step_loras(folder, name):
    """{step: path} of the run's --save-every LoRAs (<name>_stepNNNNNNN.safetensors) and its final LoRA."""
    found = {int(m.group(1)): p for p in Path(folder).glob(f"{name}_step*.safetensors")
             if (m := re.fullmatch(rf"{re.escape(name)}_step(\d+)\.safetensors", p.name))}
    final = Path(folder) / f"{name}.safetensors"
    if final.is_file():
        from safetensors import safe_open

        with safe_open(str(final), framework="pt") as f:
            found[int(f.metadata()["scott.step"])] = final
    return dict(sorted(found.items()))


def run_config(folder, samples, seed=None):
    """The run's own config (its config.toml), with keep-best on as the trainer's defaults have it, scoring
    `samples` samples; `seed` (the run's if None) draws their noises."""
    extra = [] if seed is None else ["--seed", str(seed)]
    return parse_config(["--config", str(Path(folder) / "config.toml"), "--validate-every", "100",
                         "--validation-split", "auto", "--validation-samples", str(samples), "--output", str(folder),
                         *extra])


def keep_best_scores(run, validation, lora):
    """{score name: {steps: value}} of one LoRA loaded into the run's student adapter."""
    load_student(run.unet, lora)
    sample = student_sampler(run, validation)
    latents = {k: sample(k) for k in STEP_COUNTS}
    return {name: score_values(latents.get, teacher_features(run, s.feature), validation, s, STEP_COUNTS)
            for name, s in SCORES.items()}


def judge_fd(lora, captions, real, model, seed=0):
    """{steps: FD} of the world judge for one LoRA: report.py's student images on the evaluation captions."""
    student = report.load_student(lora)
    out = {}
    for k in STEP_COUNTS:
        fake = report.student_images(student, captions, k, seed).permute(0, 3, 1, 2).float() / 127.5 - 1
        out[k] = score(model, fake, captions, real)["fd"]
    return out


def cached(path, make):
    """The JSON at `path`, or make() written there (keys of the inner dicts become strings)."""
    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(make(), indent=1) + "\n")
    return json.loads(path.read_text())


def ranks(values):
    """Ranks 0..n-1 of the values (no ties among real-valued scores)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0] * len(values)
    for rank, index in enumerate(order):
        out[index] = rank
    return out


def spearman(a, b):
    """Spearman's rank correlation: the Pearson correlation of the ranks."""
    ra, rb = (torch.tensor(ranks(v), dtype=torch.float64) for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def mean(values):
    return sum(values.values()) / len(values)


def correlations(scores, fds):
    """{score name: {"mean": rho of the mean over step counts, "<k>": rho at k steps}} over the checkpoints."""
    steps = sorted(scores)
    out = {}
    for name in SCORES:
        per = {"mean": spearman([mean(scores[s][name]) for s in steps], [mean(fds[s]) for s in steps])}
        for k in STEP_COUNTS:
            per[str(k)] = spearman([scores[s][name][str(k)] for s in steps], [fds[s][str(k)] for s in steps])
        out[name] = per
    return out


def kept(scores):
    """{score name: the checkpoint keep-best keeps by it} (the lowest mean over step counts)."""
    return {name: min(scores, key=lambda s: mean(scores[s][name])) for name in SCORES}


def scorer(cfg):
    """score(lora) -> keep_best_scores of the LoRA, and origin() -> the validation set's origin; the run is built
    and its validation set prepared once, on the first call (a run whose caches are all there builds nothing)."""
    @functools.cache
    def setup():
        run = build(cfg)
        return run, prepare(run, run.holdout)

    return (lambda lora: keep_best_scores(*setup(), lora)), (lambda: {"origin": setup()[1].origin})


def judge(n_eval, seed):
    """fd(lora) -> judge_fd of the LoRA on the first `n_eval` evaluation captions, its noises drawn from `seed`; the
    captions, real images and classifier are made on the first call."""
    @functools.cache
    def setup():
        captions = [scenes.caption_at(i, report.EVAL_SEED) for i in range(n_eval)]
        return captions, real_images(n_eval, report.EVAL_SEED), load_classifier()

    return lambda lora: judge_fd(lora, *setup(), seed=seed)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.world.keep_best", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the run's --output folder (with --save-every LoRAs)")
    parser.add_argument("--n-eval", type=int, default=1000, help="the judge's evaluation captions (report: 1000)")
    parser.add_argument("--samples", type=int, default=256, help="keep-best's samples (--validation-samples; "
                        "default: the trainer's)")
    parser.add_argument("--seed", type=int, default=None, help="another --seed for the samples' noises (default: "
                        "the run's)")
    parser.add_argument("--judge-seed", type=int, default=0, help="the judge's student noises (another one: the "
                        "judge's own noise)")
    parser.add_argument("--steps", default=None, help="only these checkpoints, comma-separated (default: all)")
    parser.add_argument("--json", default=None, help="write the scores, FDs and correlations here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = run_config(args.run, args.samples, args.seed)
    tag = f"s{args.samples}" + ("" if args.seed is None else f"_seed{args.seed}")
    judge_tag = f"n{args.n_eval}" + ("" if args.judge_seed == 0 else f"_seed{args.judge_seed}")
    loras = step_loras(args.run, cfg.name)
    if args.steps:
        loras = {s: loras[s] for s in map(int, args.steps.split(","))}
    work = Path(args.run) / "keep_best_scores"
    score_of, origin = scorer(cfg)
    fd_of = judge(args.n_eval, args.judge_seed)
    scores, fds = {}, {}
    for step, lora in loras.items():
        scores[step] = cached(work / f"step{step}_scores_{tag}.json", lambda lora=lora: score_of(lora))
        fds[step] = cached(work / f"step{step}_fd_{judge_tag}.json", lambda lora=lora: fd_of(lora))
        print(f"step {step}: judge FD {mean(fds[step]):.2f}, " + ", ".join(
            f"{name} {mean(v):.4g}" for name, v in scores[step].items()), flush=True)
    rho, keeps = correlations(scores, fds), kept(scores)
    best = min(fds, key=lambda s: mean(fds[s]))
    print(f"the judge's best: step {best} (FD {mean(fds[best]):.2f})")
    for name, per in sorted(rho.items(), key=lambda item: -item[1]["mean"]):
        print(f"{name:<22} Spearman with the judge's FD: mean {per['mean']:+.3f}; "
              + ", ".join(f"{k} step {per[str(k)]:+.3f}" for k in STEP_COUNTS)
              + f"; keeps step {keeps[name]} (judge FD {mean(fds[keeps[name]]):.2f})")
    if args.json:
        validation = cached(work / f"validation_{tag}.json", origin)["origin"]
        Path(args.json).write_text(json.dumps({"run": str(args.run), "validation": validation,
                                               "samples": args.samples, "n_eval": args.n_eval,
                                               "judge_seed": args.judge_seed, "scores": scores, "judge_fd": fds,
                                               "spearman": rho, "kept": keeps}, indent=1) + "\n")


if __name__ == "__main__":
    main()
