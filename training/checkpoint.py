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


# The settings that decide what a run trains on, each with its value in runs written before it existed, and whether it
# applies to a source (a resume must keep them, or the data or its order would change under it).
RESUME_KEEPS = {
    "buckets": (False, bucketable),  # older runs: square crops
    "validation_split": ("0", lambda source: True),  # older runs: nothing withheld
    "validation_data": (None, lambda source: True),
}


def setting_flag(name, value):
    """How a data setting reads on the command line: --buckets / --no-buckets, --validation-split 0, ..."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"no {flag}" if value is None else f"{flag} {value}"


def setting_advice(name, value):
    """What to give to keep a data setting: its flag, or 'leave out --validation-data' for an unset one."""
    return f"leave out --{name.replace('_', '-')}" if value is None else f"give {setting_flag(name, value)}"


def check_resume_data(cfg):
    """A resume must keep the data settings of the run it resumes (its <output>/config.toml says which): else one
    line saying which flag to give."""
    if cfg.resume is None:
        return
    found = resolve(cfg.resume, Path(cfg.output) / "checkpoints")
    saved = Path(found).resolve().parent.parent / "config.toml" if found else None
    if saved is None or not saved.is_file():
        return
    before = tomllib.loads(saved.read_text(encoding="utf-8"))
    for name, (older, applies) in RESUME_KEEPS.items():
        was, now = before.get(name, older), getattr(cfg, name)
        if applies(cfg.source) and was != now:
            raise UserError(
                f"--resume {found}: that run trained with {setting_flag(name, was)} and this one with "
                f"{setting_flag(name, now)}; {setting_advice(name, was)} to resume it, or start a new --output"
            )
