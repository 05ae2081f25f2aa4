"""The TOML run file: `--config FILE` read into typed values (every key known, every value of its field's type), and
a config written back as a run file (<output>/config.toml) that reads back to the same run."""

import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from pathlib import Path

from .config import GROUPS, DistillConfig
from .errors import UserError

RUN_FILE = "config.toml"  # the run file every run writes into its output folder (and each checkpoint keeps a copy of)


def _base_type(annotation):
    """str / int / float / bool from a (possibly Optional) annotation."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def field_types():
    """{field name: str / int / float / bool} of DistillConfig."""
    hints = typing.get_type_hints(DistillConfig)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(DistillConfig)}


def read_run_file(path):
    """A TOML run file -> {field name: value}, each key known and each value of its field's type, else UserError."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"run file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UserError(
            f"run file {path} is not valid TOML: {error}; fix that line (a run's own {RUN_FILE} has a copy in each "
            "of its checkpoints/step_N/)"
        ) from None
    kinds, values = field_types(), {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in kinds:
            closest = difflib.get_close_matches(name, list(kinds), n=1, cutoff=0.0)
            raise UserError(f"run file {path}: unknown key {key!r}; the closest valid key is {closest[0]!r}")
        if name in values:
            raise UserError(f"run file {path}: key {key!r} is given twice (dashes and underscores are the same key)")
        values[name] = _typed_value(path, key, value, kinds[name])
    return values


def _typed_value(path, key, value, kind):
    """The run file's value for a field of type kind (an int is a valid float), else a UserError."""
    choices = next(f for f in dataclasses.fields(DistillConfig) if f.name == key.replace("-", "_")).metadata.get(
        "choices"
    )
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
        raise UserError(f"run file {path}: {key} must be {names[kind]}, got {value!r}")
    if choices and value not in choices:
        raise UserError(f"run file {path}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def to_toml(cfg):
    """The config as a TOML run file, one commented section per group; unset (None) options are left out."""
    lines = ["# SCott distillation run: python -m training.distill --config config.toml", ""]
    for group_class in GROUPS:
        lines.append(f"# {group_class.__name__.removesuffix('Options').lower()}: {group_class.__doc__}")
        for f in dataclasses.fields(group_class):
            value = getattr(cfg, f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value):
    """A TOML literal: true/false, an integer, a float (repr round-trips), or a basic string (JSON escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))



def write_run_file(cfg, path):
    """Write the config as a TOML run file (`--config` reads it back to the same run), renamed into place so that a
    kill or a full disk leaves the previous file whole."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(to_toml(cfg), encoding="utf-8")
    os.replace(tmp, path)
