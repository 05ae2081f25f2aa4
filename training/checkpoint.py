"""Resumable checkpoints on accelerate's save_state: only the LoRA weights (student, target,
disc) and the disc head are stored beside accelerate's optimizer and RNG state and a copy of the run file; written to a
temp folder and renamed into place, so a kill or a full disk leaves the previous checkpoint whole."""

import json
import os
import re
import shutil
from pathlib import Path

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .config import flag_name
from .data.buckets import bucketable
from .data.skips import SKIPPED
from .errors import UserError
from .runfile import RUN_FILE

NAME = re.compile(r"^step_(\d+)$")
WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.json"
BUCKET_FIELDS = ("min_bucket_reso", "max_bucket_reso", "bucket_upscale")  # what decides the buckets, with --buckets


class CheckpointNotWritten(UserError):
    """A checkpoint could not be written (a full disk, an I/O error): the run stops, the previous one stays."""


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


def save(accelerator, folder, step, keep, skips=None):
    """Write step_N.tmp (accelerator.save_state, the step, the run file, the Skipped `skips`), then rename it to step_N
    and delete all but the newest `keep`; a write that fails (a full disk) removes step_N.tmp and stops the run with
    one line."""
    folder = Path(folder)
    final, tmp = folder / f"step_{step:07d}", folder / f"step_{step:07d}.tmp"
    from safetensors import SafetensorError

    previous = checkpoints(folder)[-1:]
    try:
        _write(accelerator, tmp, step, skips)
    except (OSError, RuntimeError, SafetensorError) as error:  # how Python, torch.save and safetensors fail a write
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointNotWritten(not_written(final, error, previous[0] if previous else None)) from None
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for stale in folder.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write(accelerator, tmp, step, skips=None):
    """accelerator.save_state into the fresh folder tmp, then (main process) the step, a copy of the run file and the
    skipped list."""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps({"step": step}) + "\n")
        run_file = tmp.parent.parent / RUN_FILE
        if run_file.is_file():
            shutil.copyfile(run_file, tmp / RUN_FILE)
        if skips is not None:
            skips.write(tmp / SKIPPED)  # the list at this step: a resume keeps what its draws met


def not_written(final, error, previous):
    """The one line of a checkpoint write that failed: what, why (the error, the disk's free space), what is kept,
    what to do."""
    why = f"{error.strerror} ({error.filename})" if isinstance(error, OSError) and error.strerror else str(error)
    free = shutil.disk_usage(final.parent).free / 2**20
    return (
        f"checkpoint {final} not written: {why}; {free:.0f} MiB free on its disk; the last finished checkpoint is "
        f"kept ({previous or 'none written yet'}): free space (or fix the disk) and rerun with --resume latest"
    )


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


# A run file from before a setting existed: the value that run trained with.
OLDER = {"buckets": False, "validation_split": "0", "validation_data": None}  # square crops, nothing withheld


def kept_settings(cfg, before):
    """The settings a resume of the run whose run file is `before` must keep, or the data or its order would change
    under it: the buckets (the user's images only; their rules where both bucket), keep-best's split or data."""
    names = []
    if bucketable(cfg.source):
        names.append("buckets")
        if cfg.buckets and before.get("buckets", OLDER["buckets"]):
            names += [name for name in BUCKET_FIELDS if name in before]
    return [*names, "validation_split", "validation_data"]


def setting_flag(name, value):
    """How a data setting reads on the command line: --buckets / --no-buckets, --validation-split 0, ..."""
    flag = flag_name(name)
    if isinstance(value, bool):
        return flag if value else flag_name(f"no_{name}")
    return f"no {flag}" if value is None else f"{flag} {value}"


def setting_advice(name, value):
    """What to give to keep a data setting: its flag, or 'leave out --validation-data' for an unset one."""
    return f"leave out {flag_name(name)}" if value is None else f"give {setting_flag(name, value)}"


def check_resume_data(cfg):
    """A resume must keep the data settings of the run it resumes (its <output>/config.toml says which): else one
    line saying which flag to give."""
    if cfg.resume is None:
        return
    found = resolve(cfg.resume, Path(cfg.output) / "checkpoints")
    saved = Path(found).resolve().parent.parent / RUN_FILE if found else None
    if saved is None or not saved.is_file():
        return
    before = saved_run_file(saved, found)
    for name in kept_settings(cfg, before):
        was, now = before.get(name, OLDER.get(name)), getattr(cfg, name)
        if was != now:
            raise UserError(
                f"--resume {found}: that run trained with {setting_flag(name, was)} and this one with "
                f"{setting_flag(name, now)}; {setting_advice(name, was)} to resume it, or start a new --output"
            )


def saved_run_file(path, found):
    """The run file of the run being resumed, as a dict; a damaged one stops with one line naming it and the fix."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        copy = Path(found) / RUN_FILE
        fix = (
            f"copy {copy} over it (the run file that checkpoint was written with)"
            if copy.is_file()
            else "delete it to resume with the flags you give (they must be the run's own)"
        )
        raise UserError(f"--resume: the run file {path} is damaged ({error}): {fix}") from None
