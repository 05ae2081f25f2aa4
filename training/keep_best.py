"""Keep-best: at every validation the student samples the withheld captions (data/holdout.py) from fixed noises at
each --validation-steps count, and a score compares those samples with what they should look like, in a feature
space of the teacher's own networks (eval/features.py): the teacher's many-step samples from the same noise and
caption, or the withheld images. The lowest score's LoRA is <output>/<name>_best.safetensors, recorded in best.json.
With --inception / --clip weights, FID and CLIP score of the same samples are logged too (training.eval).
docs/keep_best.md: which score ranks checkpoints like a quality judge, measured.
"""

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.skips import Skip, refuse_io_errors
from .data.synth import teacher_pipeline
from .encode import encode_text
from .eval import features, metrics, scorers
from .eval.evaluation import consistency_latents, latent_shape, per_image_noise
from .eval.scores import SCORES
from .models.adapters import STUDENT, using
from .models.conditioning import Conditioning
from .models.family import square_sizes
from .models.teacher import on_device, vae_scale
from .validation import decode

log = logging.getLogger("training")

SAMPLE_SALT = 0x7A11D  # sample i's noise: seed --seed * 1_000_003 + this + i
REFERENCE_VERSION = "keep-best-reference-v1"  # bump when what the reference file holds changes


def paired_distance(a, b):
    """Mean over samples of the squared Euclidean distance between a[i] and b[i]."""
    return (a - b).square().sum(dim=1).mean().item()


DISTANCES = {"fd": metrics.frechet_distance, "paired": paired_distance}


@dataclass
class ValidationSet:
    """The samples keep-best scores: sample i takes captions[i] (embedded: cond[i]) and the noise of seeds[i]; the
    references' latents ('teacher': one per sample, 'images': one per withheld image); images: the withheld images
    as uint8 HWC (for FID), None without."""

    captions: list
    cond: Conditioning  # with the size conditioning of an uncropped image at the run's resolution
    uncond: Conditioning  # one row: the family's unconditional embedding
    seeds: list
    shape: tuple
    references: dict
    images: list | None
    origin: str


def sample_plan(captions, samples, seed):
    """(caption per sample, seed per sample): every caption len(captions) apart, each at least once, at least
    `samples` in all (a whole number of rounds)."""
    n = len(captions) * math.ceil(samples / len(captions))
    return [captions[i % len(captions)] for i in range(n)], [seed * 1_000_003 + SAMPLE_SALT + i for i in range(n)]


@torch.no_grad()
def teacher_latents(teacher, cond, uncond, seeds, shape, steps, cfg, batch_size):
    """The teacher's samples (clean latents) from each sample's start noise: DPM-Solver++ 2M (the synthesis sampler),
    `steps` steps, guidance `cfg`; the UNet as it is (the caller makes the bare teacher active)."""
    pipe, scale = teacher_pipeline(teacher), vae_scale(teacher.vae)
    out = []
    for start in range(0, len(seeds), batch_size):
        c = cond[start : start + batch_size]
        z, _ = per_image_noise(seeds[start : start + batch_size], shape, c.states.device)
        result = pipe(**c.pipeline_kwargs(uncond.like(c)), latents=z, num_inference_steps=steps, guidance_scale=cfg,
                      height=shape[1] * scale, width=shape[2] * scale, output_type="latent")
        out.append(result.images.float())
    return torch.cat(out)


@torch.no_grad()
def image_latents(vae, pixels, batch_size):
    """The VAE posterior means of pixel tensors [N, 3, R, R], times the scaling factor."""
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].to(vae.device, vae.dtype)
        out.append(vae.encode(batch).latent_dist.mean.float() * vae.config.scaling_factor)
    return torch.cat(out)


def reference_key(teacher_sha, captions, seeds, shape, steps, cfg, image_count):
    """What decides the references' latents, hashed: a cached file with another key is recomputed."""
    record = [REFERENCE_VERSION, teacher_sha, captions, seeds, list(shape), steps, cfg, image_count]
    return hashlib.sha256(json.dumps(record).encode("utf-8")).hexdigest()


def cached_references(path, key, make):
    """The reference latents in `path` if its key matches, else make() written there (temp + rename)."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(str(path))
    references = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in references.items()}, str(tmp), metadata={"key": key})
    os.replace(tmp, path)
    return references


def score_values(sample, features_of, validation, score, step_counts):
    """{steps: score} of the samples sample(steps) -> clean latents, against the score's reference, in
    features_of(latents) -> [N, D]."""
    reference = features_of(validation.references[score.reference])
    return {k: DISTANCES[score.distance](features_of(sample(k)), reference) for k in step_counts}


def prepare(run, holdout):
    """The ValidationSet of a run's Holdout (main process): captions embedded, sample noises, and the references'
    latents, computed once and cached in <output>/validation/reference.safetensors."""
    cfg, teacher, device = run.cfg, run.teacher, run.accelerator.device
    captions, seeds = sample_plan(holdout.captions, cfg.validation_samples, cfg.seed)
    shape = latent_shape(teacher, cfg.resolution)
    sizes = square_sizes(cfg.resolution, cfg.resolution, len(captions))
    cond = teacher.family.conditioned(encode_text(run, captions), sizes)
    pixels = readable(holdout.images or [])

    def make():
        out = {}
        with run.accelerator.autocast(), using(teacher.unet, None), on_device(teacher.vae, device):
            out["teacher"] = teacher_latents(teacher, cond, run.uncond, seeds, shape, cfg.synth_steps, cfg.synth_cfg,
                                             cfg.batch_size)
            if pixels is not None:
                out["images"] = image_latents(teacher.vae, pixels, cfg.batch_size)
        return out

    key = reference_key(teacher.sha256, captions, seeds, shape, cfg.synth_steps, cfg.synth_cfg,
                        0 if pixels is None else len(pixels))
    references = cached_references(Path(cfg.output) / "validation" / "reference.safetensors", key, make)
    images = None if pixels is None else list(((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                                              .permute(0, 2, 3, 1))
    return ValidationSet(captions, cond, run.uncond, seeds, shape, {k: v.to(device) for k, v in references.items()},
                         images, holdout.origin)


def readable(loaders):
    """The withheld images that read, stacked ([N, 3, R, R]; None if none): an unreadable one is left out, an I/O
    error stops the run naming the file."""
    loaded = [load() for load in loaders]
    refuse_io_errors([p for p in loaded if isinstance(p, Skip)])
    pixels = [p for p in loaded if isinstance(p, torch.Tensor)]
    return torch.stack(pixels) if pixels else None


def student_sampler(run, validation):
    """sample(steps) -> the student's clean latents of every validation sample (its LoRA active), batch by batch."""
    cfg, unet = run.cfg, run.unet

    def sample(steps):
        out = []
        with using(unet, STUDENT):
            for start in range(0, len(validation.seeds), cfg.batch_size):
                stop = start + cfg.batch_size
                out.append(consistency_latents(unet, validation.cond[start:stop], validation.uncond,
                                               validation.seeds[start:stop], steps, cfg.recommended_gamma,
                                               cfg.recommended_cfg, validation.shape).float())
        return torch.cat(out)

    return sample


def teacher_features(run, name):
    """features_of(latents) -> [N, D]: FEATURES[name] with the bare teacher active."""

    def features_of(latents):
        with using(run.unet, None), on_device(run.teacher.vae, run.accelerator.device):
            return features.features(name, run.teacher, latents, run.uncond, run.cfg.batch_size)

    return features_of


def student_scores(run, validation, judges):
    """({steps: keep-best score}, {steps: {fid, clip_score}}) of the run's student on the ValidationSet at each
    --validation-steps count (the judges' only where their weights were given)."""
    cfg, score = run.cfg, SCORES[run.cfg.keep_best_score]
    counts = cfg.validation_step_counts()
    with run.accelerator.autocast():
        sample = student_sampler(run, validation)
        latents = {k: sample(k) for k in counts}
        values = score_values(latents.get, teacher_features(run, score.feature), validation, score, counts)
        judged = {k: judge(run, validation, judges, latents[k]) for k in counts}
    return values, judged


def steps_text(count):
    """'1 step', '4 steps'."""
    return f"{count} step{'s' if count != 1 else ''}"


def score_line(cfg, validation, value, values, judged, keeper):
    """'keep-best score 0.73 (mean squared distance of vae features to ...; 256 samples on the captions of ...;
    1 step 1.1, ...); best 0.71 at step 400'."""
    per_count = ", ".join(f"{steps_text(k)} {v:.5g}" for k, v in values.items())
    extras = "".join(f"; {name} {steps_text(k)} {v:.4g}" for k, found in judged.items() for name, v in found.items())
    what = SCORES[cfg.keep_best_score].describe(cfg.synth_steps)
    return (f"keep-best score {value:.5g} ({what}; {len(validation.seeds)} samples on the captions of "
            f"{validation.origin}; {per_count}{extras}); best {keeper.score:.5g} at step {keeper.step}")


def check_judges(cfg):
    """--inception / --clip must name usable files before any model loads (validation logs FID / CLIP score)."""
    if cfg.validate_every and cfg.inception:
        scorers.check_inception_file(cfg.inception)
    if cfg.validate_every and cfg.clip:
        scorers.check_clip_folder(cfg.clip)


@dataclass
class KeepBest:
    """The lowest score so far and its step, with the score's name, kept in a small JSON file a resumed run reads."""

    path: Path
    name: str
    score: float = math.inf
    step: int | None = None

    @classmethod
    def open(cls, path, name, resume):
        """The record at `path` when resuming with the same score; a fresh run (or another score) starts with none."""
        path = Path(path)
        if resume and path.is_file():
            record = json.loads(path.read_text())
            if record.get("name") == name:
                return cls(path, name, float(record["score"]), int(record["step"]))
            log.warning("%s holds the best of another score (%s): keep-best starts afresh", path, record.get("name"))
        return cls(path, name)

    def improves(self, score):
        """Whether `score` is below the best so far (NaN never is)."""
        return score < self.score

    def record(self, step, score):
        """Make (step, score) the best and write the file (temp + rename)."""
        self.score, self.step = score, step
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"step": step, "score": score, "name": self.name}) + "\n")
        os.replace(tmp, self.path)


@dataclass
class Judges:
    """The optional networks of training.eval: Inception (FID) and CLIP (CLIP score), None when not given."""

    inception: object = None
    clip: object = None

    @classmethod
    def load(cls, cfg):
        return cls(scorers.load_inception(cfg.inception) if cfg.inception else None,
                   scorers.load_clip(cfg.clip) if cfg.clip else None)


def judge(run, validation, judges, latents):
    """{fid, clip_score} of decoded student latents (those given weights for): FID against the withheld images, or
    the teacher's samples decoded, in Inception features; CLIP score against each sample's caption (judges None:
    neither)."""
    from PIL import Image

    out = {}
    if judges is None or (judges.inception is None and judges.clip is None):
        return out
    device = run.accelerator.device
    with on_device(run.teacher.vae, device):
        images = [Image.fromarray(x.numpy()) for x in decode(run.teacher.vae, latents)]
        if judges.inception is not None:
            real = validation.images or list(decode(run.teacher.vae, validation.references["teacher"]))
            real_feats = scorers.inception_features(judges.inception, [Image.fromarray(x.numpy()) for x in real],
                                                    device)
            fake_feats = scorers.inception_features(judges.inception, images, device)
            out["fid"] = metrics.frechet_distance(real_feats, fake_feats)
    if judges.clip is not None:
        out["clip_score"] = scorers.clip_score(*judges.clip, images, validation.captions, device)
    return out
