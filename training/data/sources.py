"""What `--data` means, decided once: the user's string -> a typed data source, with its one-line errors.

`parse_source` only looks at the string (and whether a folder exists), so a config resolves without touching data;
`check()` does the file-system checks before any model loads; the loop turns the source into a dataset.
A new kind of source is one dataclass here and, if it has a prefix, one entry in PREFIXES.
"""

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, UserError

WORLD_PREFIX = "world:"
PROMPTS_PREFIX = "prompts:"
METAVAR = f"PATH|{PROMPTS_PREFIX}FILE|{WORLD_PREFIX}N"


@dataclass(frozen=True)
class ImageFolder:
    """A folder of images with same-name .txt captions, or metadata.jsonl / .csv (file_name, text)."""

    path: Path
    data_free = False

    def __str__(self):
        return str(self.path)

    def check(self):
        """The folder must exist (its pairs are counted when the dataset is built)."""
        if not self.path.is_dir():
            raise DataError(f"data {self.path} is neither an image folder nor .tar shards")


@dataclass(frozen=True)
class TarShards:
    """webdataset .tar shards (a brace pattern such as 'shards/{000..099}.tar' already expanded)."""

    pattern: str
    paths: tuple[Path, ...]
    data_free = False

    def __str__(self):
        return self.pattern

    def check(self):
        """Every shard must exist; the first three missing ones are named."""
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise DataError(f"data shards not found: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")


@dataclass(frozen=True)
class World:
    """'world:N': the first N shapes-world scenes, rendered once into <output>/world."""

    count: int
    data_free = False
    world = "shapes"  # training.data.scenes' world, rendered into <output>/<folder>
    folder = "world"

    def check(self):
        """Nothing to check: the renderer writes the folder."""


@dataclass(frozen=True)
class DiverseWorld(World):
    """'diverse:N': the same N images with captions that under-specify them ("a red shape"), in <output>/diverse."""

    world = "diverse"
    folder = "diverse"


@dataclass(frozen=True)
class PromptFile:
    """'prompts:FILE': data-free distillation from the user's prompts, one a line."""

    path: Path
    data_free = True

    def check(self):
        """The file must hold at least one prompt (read now, so a bad file fails before any model loads)."""
        self.prompts()

    def prompts(self):
        """The file's non-empty lines."""
        from .synth_prompts import read_prompt_file

        return read_prompt_file(self.path)


@dataclass(frozen=True)
class BuiltinPrompts:
    """No --data: data-free distillation from the built-in prompt list."""

    data_free = True

    def check(self):
        """The built-in list is always there."""

    def prompts(self):
        """The built-in list (training/data/synth_prompts.py)."""
        from .synth_prompts import builtin_prompts

        return builtin_prompts()


DataSource = ImageFolder | TarShards | World | PromptFile | BuiltinPrompts


def _world(spec, rest, kind=World):
    if not rest.isdigit() or int(rest) < 1:
        prefix = spec[: len(spec) - len(rest)]
        raise UserError(f"--data {spec}: give {prefix}N with N >= 1 images, e.g. {prefix}4000")
    return kind(int(rest))


def _prompt_file(spec, rest):
    if not rest:
        raise UserError(f"--data {spec}: give {PROMPTS_PREFIX}FILE with a text file of prompts, one a line")
    return PromptFile(Path(rest))


PREFIXES = {WORLD_PREFIX: _world, PROMPTS_PREFIX: _prompt_file, "diverse:": lambda s, r: _world(s, r, DiverseWorld)}


def _files(spec):
    """An existing folder -> ImageFolder; a .tar path or brace pattern of them -> TarShards; else ImageFolder."""
    from braceexpand import braceexpand

    if Path(spec).is_dir():
        return ImageFolder(Path(spec))
    paths = tuple(Path(p) for p in braceexpand(spec))
    if paths and all(p.suffix == ".tar" for p in paths):
        return TarShards(spec, paths)
    return ImageFolder(Path(spec))


def parse_source(data):
    """The user's --data (a str, a Path, None or an already parsed source) -> its DataSource."""
    if isinstance(data, DataSource):
        return data
    if data is None:
        return BuiltinPrompts()
    spec = str(data)
    for prefix, parse in PREFIXES.items():
        if spec.startswith(prefix):
            return parse(spec, spec[len(prefix) :])
    return _files(spec)
