"""Every input the trainer does not train on, with its reason: counted in one run-start line and on the progress bar,
named in <output>/skipped.txt. An I/O error that is not "this is not an image" (permission denied, EIO) is no skip:
it stops the run with one line naming the file."""

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

# Why an input is not trained on: the reason column of skipped.txt.
NO_CAPTION = "no caption"
NO_IMAGE = "no image"
NOT_LISTED = "not in the metadata table"
FILE_MISSING = "file missing"
UNREADABLE = "unreadable"
TOO_SMALL = "smaller than its bucket"
SMALL_BUCKET = "in a bucket under a batch"
NO_CACHE_ENTRY = "no cache entry"
IO_ERROR = "I/O error"  # never recorded as a skip: the run stops naming the file
DRAWN = (FILE_MISSING, UNREADABLE, NO_CACHE_ENTRY)  # what a draw during training can meet
SKIPPED = "skipped.txt"  # <output>/skipped.txt, and its copy in each checkpoint


@dataclass(frozen=True)
class Skip:
    """One input not trained on: the file (a path, 'shard.tar:member', 'metadata.jsonl row N') and why."""

    file: str
    reason: str
    detail: str = ""

    def why(self):
        """'<reason>[: <detail>]'."""
        return self.reason + (f": {self.detail}" if self.detail else "")

    def line(self):
        """'<file>\\t<reason>[: <detail>]', a line of skipped.txt."""
        return f"{self.file}\t{self.why()}"

    @classmethod
    def parse(cls, line):
        """The Skip of a line() of skipped.txt."""
        file, _, why = line.partition("\t")
        reason, _, detail = why.partition(": ")
        return cls(file, reason, detail)


def read_failure(file, error):
    """The Skip of an exception met reading `file`: a missing file, an I/O error (an OSError with an errno: permission
    denied, EIO, ...; it stops the run), else an image that does not decode."""
    from PIL import UnidentifiedImageError

    if isinstance(error, FileNotFoundError):
        return Skip(file, FILE_MISSING)
    if isinstance(error, OSError) and error.errno is not None:
        return Skip(file, IO_ERROR, error.strerror or str(error))
    if isinstance(error, UnidentifiedImageError):
        return Skip(file, UNREADABLE, "not an image Pillow can read")
    return Skip(file, UNREADABLE, str(error) or type(error).__name__)


def io_error(file, error):
    """The one-line DataError of an I/O error reading `file` (error: an OSError, or its strerror)."""
    reason = error if isinstance(error, str) else error.strerror or str(error)
    return DataError(
        f"cannot read {file}: {reason}; fix the file's permissions or the disk and rerun "
        "(--resume latest continues from the last checkpoint)"
    )


def refuse_io_errors(skips):
    """The skips, unless one is an I/O error: that stops the run with one line naming the file."""
    for skip in skips:
        if skip.reason == IO_ERROR:
            raise io_error(skip.file, skip.detail)
    return skips


class Skipped:
    """A run's skipped inputs, each file once (with the first reason met), in the order met; written to `path`."""

    def __init__(self, path=None, skips=()):
        self.path, self.by_file = path, {}
        self.add(skips)

    def add(self, skips):
        """Record skips; an I/O error is none: it stops the run with one line naming the file."""
        for skip in refuse_io_errors(skips):
            self.by_file.setdefault(skip.file, skip)

    def __len__(self):
        return len(self.by_file)

    def __contains__(self, file):
        return file in self.by_file

    def __iter__(self):
        return iter(self.by_file.values())

    def counts(self):
        """'3 no caption, 2 unreadable' (reasons in the order first met)."""
        return ", ".join(f"{n} {reason}" for reason, n in Counter(s.reason for s in self).items())

    def report(self, trained):
        """The run-start line: how many pairs train, how many inputs are skipped and why, where they are listed."""
        if not self.by_file:
            return f"{trained} image + caption pairs train; no input skipped"
        skipped = f"{len(self)} inputs skipped ({self.counts()})"
        return f"{trained} image + caption pairs train; {skipped}, listed in {self.path}"

    def stuck(self, draws):
        """The one line of a run that drew `draws` empty micro-batches in a row, naming the first unreadable files."""
        first = ", ".join(f"{s.file} ({s.why()})" for s in [s for s in self if s.reason in DRAWN][:3])
        return (
            f"no image could be read in {draws} micro-batches in a row ({len(self)} inputs skipped; first unreadable: "
            f"{first or 'none named'}); all are listed in {self.path}: replace or remove them and rerun (--resume "
            "latest continues from the last checkpoint)"
        )

    def write(self, path=None):
        """<output>/skipped.txt (or `path`): a header, then one '<file>\\t<reason>[: <detail>]' line per skipped input
        (renamed into place, so a kill leaves the previous list)."""
        path = Path(path or self.path)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        lines = ["# every input this run does not train on: file<TAB>reason", *(s.line() for s in self)]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def read_drawn(path):
    """The skips a list written by Skipped.write met in training draws (DRAWN reasons): what a checkpoint's copy of
    the list carries into the resumed run, whose scan finds the rest again. [] if there is no such file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    except FileNotFoundError:
        return []
    return [skip for skip in map(Skip.parse, lines) if skip.reason in DRAWN]
