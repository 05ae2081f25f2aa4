"""Resumable checkpoints on accelerate's save_state: only the LoRA weights (student, target,
disc) and the disc head are stored beside accelerate's optimizer and RNG state; written to a temp folder
and renamed into place."""

import json
import os
import re
import shutil
from pathlib import Path

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .data.buckets import bucketable
from .errors import UserError

NAME = re.compile(r"^step_(\d+)$")
WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.json"


def trainable_state(model):
    """The adapter weights (all three adapters) and the head: everything a checkpoint must restore."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if _is_trainable_key(k)}


def _is_trainable_key(key):
    return ".lora_" in key or key.startswith("head.")


def register_hooks(accelerator):
    """Make accelerate's save_state/load_state keep only the trainable part of the SCott model."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_file(trainable_state(accelerator.unwrap_model(model)), os.path.join(output_dir, WEIGHTS))
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            state = load_file(os.path.join(input_dir, WEIGHTS))
            expected = set(trainable_state(model))
            if set(state) != expected:
                raise UserError(
                    f"checkpoint {input_dir} does not match this run's adapters "
                    "(other rank, --adv-weight or --disc-features?)"
                )
            model.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoints(folder):
    """Finished checkpoints (step_N folders) under `folder`, oldest first; temp folders are never listed."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("step_*") if p.is_dir() and (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save(accelerator, folder, step, keep):
    """accelerator.save_state into step_N.tmp, then rename to step_N and delete all but the newest `keep`."""
    folder = Path(folder)
    final, tmp = folder / f"step_{step:07d}", folder / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps({"step": step}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for stale in folder.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve(resume, folder):
    """--resume PATH|latest -> a finished checkpoint folder (None for a fresh run)."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(folder)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise UserError(f"--resume {resume} is not a finished checkpoint folder (no {STATE})")
    return path


def load(accelerator, path):
    """accelerator.load_state(path); returns the step it was saved at."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE).read_text())["step"]


def check_resume_buckets(cfg):
    """A resume must keep the bucket setting of the run it resumes (its <output>/config.toml says which), or the
    data order would change under it: else one line saying which flag to give."""
    if cfg.resume is None or not bucketable(cfg.source):
        return
    found = resolve(cfg.resume, Path(cfg.output) / "checkpoints")
    saved = Path(found).resolve().parent.parent / "config.toml" if found else None
    if saved is None or not saved.is_file():
        return
    before = tomllib.loads(saved.read_text(encoding="utf-8")).get("buckets", False)  # older runs: square crops
    if before != cfg.buckets:
        flag = "--buckets" if before else "--no-buckets"
        raise UserError(
            f"--resume {found}: that run trained with {flag} and this one with "
            f"{'--buckets' if cfg.buckets else '--no-buckets'}; give {flag} to resume it, or start a new --output"
        )
