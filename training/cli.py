"""`python -m training.distill`'s command line, generated from DistillConfig: one --flag per field in one group per
concern, over a --config run file, over the demo's defaults for `--teacher demo`."""

import argparse
import dataclasses

from scott_core.families import FAMILIES
from scott_core.solvers import KNOBS, SOLVERS, knob_owners

from .config import DEMO_NAMES, GROUPS, MODE_DEFAULTS, MODES, DistillConfig, demo_defaults, flag_name
from .data.buckets import BUCKET_DEFAULTS
from .data.sources import METAVAR as DATA_METAVAR
from .runfile import field_types, read_run_file


def _metavar(name, kind):
    if name == "data":
        return DATA_METAVAR
    if name in ("teacher", "output", "validation_prompts"):
        return "PATH"
    return "PATH|latest" if name == "resume" else kind.__name__.upper()


def _default_text(f):
    if f.metadata.get("required"):
        return " (required)"
    if f.name == "gradient_checkpointing":
        return " (default: auto)"
    if f.default is None and f.name == "data":
        return " (default: the built-in prompt list, data-free)"
    if f.name in KNOBS:
        owners = knob_owners(f.name)
        return f" (default: {SOLVERS[owners[0]].knobs[f.name]:g} with --solver {' / '.join(owners)}; unset otherwise)"
    if f.name in BUCKET_DEFAULTS or f.name == "resolution":
        by_family = (f"{family.display_name} {family_default(family, f.name)}" for family in FAMILIES.values())
        return " (default: by the teacher's family: " + ", ".join(by_family) + ")"
    if f.name in MODE_DEFAULTS["scott"]:
        return " (default: by --mode: " + ", ".join(f"{m} {MODE_DEFAULTS[m][f.name]}" for m in MODES) + ")"
    return f" (default: {f.default})"


def family_default(family, name):
    """A scott_core Family's default of 'resolution', 'min_bucket_reso' or 'max_bucket_reso'."""
    return dict(resolution=family.default_resolution, **dict(zip(BUCKET_DEFAULTS, family.bucket_range)))[name]


def build_parser():
    """argparse generated from DistillConfig: one --flag per field (in one group per concern), plus --config."""
    parser = argparse.ArgumentParser(
        prog="python -m training.distill",
        description="Distill a SCott (or LCM) LoRA from an SD1.5- or SDXL-family checkpoint. Flags left out take the "
        "defaults shown.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML run file whose keys are these flags' names (dashes or underscores); flags on the command "
        "line override it. Every run writes its resolved configuration to <output>/config.toml",
    )
    parser.add_argument(
        "--estimate-memory",
        action="store_true",
        help="print this run's estimated GPU peak (its largest crop, batch, ranks, disc features, precision, "
        "checkpointing, latent cache) and the flags that would lower it, then exit: the loop's own build and step on "
        "fake tensors, without loading weights or data (docs/memory.md)",
    )
    kinds = field_types()
    for group_class in GROUPS:
        group = parser.add_argument_group(group_class.__name__.removesuffix("Options").lower(), group_class.__doc__)
        for f in dataclasses.fields(group_class):
            kind = kinds[f.name]
            help_text = f.metadata["help"] + _default_text(f)
            if kind is bool:
                group.add_argument(
                    flag_name(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=help_text
                )
                continue
            group.add_argument(
                flag_name(f.name),
                type=kind,
                default=f.default,
                help=help_text,
                choices=f.metadata.get("choices"),
                metavar=None if f.metadata.get("choices") else _metavar(f.name, kind),
            )
    return parser


def parse_config(argv=None):
    """CLI arguments (over a --config run file, over the demo defaults for `--teacher demo` / `demo-xl`) -> resolved
    DistillConfig."""
    return parse_command(argv)[0]


def parse_command(argv=None):
    """CLI arguments -> (resolved DistillConfig, whether --estimate-memory asks for the estimate only)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run_file = read_run_file(args.config) if args.config else {}
    parser.set_defaults(**run_file)
    args = parser.parse_args(argv)
    if args.teacher in DEMO_NAMES:
        parser.set_defaults(**{**demo_defaults(args.teacher), **run_file})
        args = parser.parse_args(argv)
    if args.teacher is None:
        parser.error("the following arguments are required: --teacher")
    values = vars(args)
    del values["config"]
    estimate_memory = values.pop("estimate_memory")
    return DistillConfig(**values).resolved(), estimate_memory

