"""Image + caption pairs from a folder (.txt / metadata.jsonl / .csv) or webdataset .tar shards (see sources.py)."""

import csv
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import DataError
from . import buckets as bucketing
from .skips import (
    FILE_MISSING,
    NO_CAPTION,
    NO_IMAGE,
    NOT_LISTED,
    SMALL_BUCKET,
    TOO_SMALL,
    Skip,
    io_error,
    read_failure,
    refuse_io_errors,
)
from .sources import ImageFolder, TarShards, parse_source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption", ".json")


@dataclass(frozen=True)
class Pair:
    """One training pair: where its image bytes are, its caption, and its name in skipped.txt and errors."""

    source: str  # a file path, or "tar:<path>"
    image_ref: object  # a Path, or (offset, size) inside the tar
    caption: str
    file: str  # the path, or "<shard>.tar:<member>"


def folder_pairs(folder):
    """Pairs from an image folder (metadata.jsonl / .csv with file_name,text, else same-name .txt captions) and the
    Skips of its other inputs."""
    folder = Path(folder)
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for table in (folder / "metadata.jsonl", folder / "metadata.csv"):
        if table.is_file():
            return _table_pairs(folder, table, images)
    pairs, skips = [], []
    for image in images:
        caption = image.with_suffix(".txt")
        if caption.is_file():
            pairs.append(Pair(str(image), image, _read_text(caption).strip(), str(image)))
        else:
            skips.append(Skip(str(image), NO_CAPTION, f"no {caption.name}"))
    return pairs, skips


def _read_text(path):
    """A caption file's text; an I/O error stops the run naming the file."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise io_error(path, error) from None


def _table_rows(table):
    """The rows of metadata.jsonl (one JSON object a line) or metadata.csv; a bad line stops the run naming it."""
    text = _read_text(table)
    if table.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(dict(json.loads(line)))
            except (ValueError, TypeError) as error:
                raise DataError(f"{table} line {number} is not a JSON object ({error}); fix or remove it") from None
    return rows


def _table_pairs(folder, table, images):
    """Pairs of the table's rows; Skips of rows whose file is missing or whose text is null, and of the folder's
    images the table does not list."""
    pairs, skips, listed = [], [], set()
    for number, row in enumerate(_table_rows(table), 1):
        name, text = row.get("file_name"), row.get("text", row.get("caption"))
        if not name:
            skips.append(Skip(f"{table} row {number}", NO_IMAGE, "no file_name"))
            continue
        path = folder / name
        listed.add(path)
        if not path.is_file():
            skips.append(Skip(str(path), FILE_MISSING, f"named in {table.name} row {number}"))
        elif text is None:
            skips.append(Skip(str(path), NO_CAPTION, f"its text is null in {table.name} row {number}"))
        else:
            pairs.append(Pair(str(path), path, str(text).strip(), str(path)))
    skips += [Skip(str(image), NOT_LISTED, table.name) for image in images if image not in listed]
    return pairs, skips


def tar_pairs(paths):
    """Pairs from webdataset shards (members grouped by key: name up to the first dot) and the Skips of samples with
    no image or no caption (a .json caption without "caption" or "text" is none)."""
    pairs, skips = [], []
    for path in paths:
        try:
            tar = tarfile.open(path)
        except tarfile.ReadError as error:
            raise DataError(f"data shard {path} is not a readable .tar ({error}); replace or remove it") from None
        with tar:
            pairs_, skips_ = _shard_pairs(path, tar)
        pairs += pairs_
        skips += skips_
    return pairs, skips


def _shard_pairs(path, tar):
    """The pairs and skips of one open shard."""
    groups = {}
    for member in tar.getmembers():
        if member.isfile():
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            groups.setdefault(f"{folder}/{stem}", {})["." + ext.lower()] = member
    pairs, skips = [], []
    for key in sorted(groups):
        members = groups[key]
        image = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
        caption = next((members[s] for s in CAPTION_SUFFIXES if s in members), None)
        if image is None:
            skips.append(Skip(f"{path}:{key.lstrip('/')}", NO_IMAGE, "the sample has no image member"))
            continue
        text, why = _sample_caption(tar, caption)
        if text is None:
            skips.append(Skip(f"{path}:{image.name}", NO_CAPTION, why))
            continue
        pairs.append(Pair(f"tar:{path}", (image.offset_data, image.size), text.strip(), f"{path}:{image.name}"))
    return pairs, skips


def _sample_caption(tar, member):
    """(caption, None) of a sample's .txt / .caption / .json member, or (None, why there is none)."""
    if member is None:
        return None, "the sample has no .txt, .caption or .json member"
    text = tar.extractfile(member).read().decode("utf-8", errors="replace")
    if not member.name.endswith(".json"):
        return text, None
    try:
        meta = json.loads(text)
    except ValueError:
        return None, f"{member.name} is not valid JSON"
    caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
    return (None, f'{member.name} has no "caption" or "text"') if caption is None else (str(caption), None)


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of (pixels in [-1, 1] [3, H, W], caption, size conditioning [6] (crop_sizes)), or the Skip
    of an image that fails to read.

    Every image's header is read first (an unreadable one is skipped); then square R x R crops, or with `buckets`
    (BucketRules) each image in its kohya bucket (buckets.py), where rules without upscaling skip an image smaller
    than its bucket. `skips` names every input left out, with its reason."""

    def __init__(self, data, resolution, buckets=None, withhold=None):
        source = parse_source(data)
        source.check()
        if isinstance(source, ImageFolder):
            pairs, skips = folder_pairs(source.path)
        elif isinstance(source, TarShards):
            pairs, skips = tar_pairs(source.paths)
        else:
            raise DataError(f"data {data} is not images: the loop renders or draws it into a folder first")
        # keep-best's share, taken from the listed pairs before any bucketing: training never sees these
        pairs, self.withheld = withhold(pairs) if withhold else (pairs, [])
        self.resolution, self.rules, self.bucketed = resolution, buckets, buckets is not None
        self.pairs, self.targets, self.skips = [], [], skips
        for pair in pairs:
            self._add(pair)
        self._check_not_empty(source)

    def _add(self, pair):
        """Keep `pair` with its crop size (the square, or its bucket), or record why it is skipped."""
        size = self.image_size(pair)
        if isinstance(size, Skip):
            self.skips += refuse_io_errors([size])
            return
        target = bucketing.bucket_of(size, self.resolution, self.rules) if self.bucketed else (self.resolution,) * 2
        if self.bucketed and not self.rules.upscale and (size[0] < target[0] or size[1] < target[1]):
            self.skips.append(Skip(pair.file, TOO_SMALL, f"{size[0]}x{size[1]} under {target[0]}x{target[1]}"))
            return
        self.pairs.append(pair)
        self.targets.append(target)

    def _check_not_empty(self, source):
        if not self.pairs:
            found = Counter(skip.reason for skip in self.skips)
            counts = ", ".join(f"{n} {reason}" for reason, n in found.items()) or "no images"
            raise DataError(
                f"data {source} has no usable image + caption pairs ({counts}); give each image a same-name .txt, "
                "or a metadata.jsonl / metadata.csv with file_name,text (with --buckets and --no-bucket-upscale, "
                "images at least their bucket's size)"
            )

    def groups(self):
        """{(width, height): [indices]} of the buckets, in bucket order (one square group without buckets)."""
        return bucketing.group(self.targets)

    def undrawn(self, span):
        """The Skips of the images in buckets holding fewer than a global batch of `span` images (never drawn)."""
        if not self.bucketed:
            return []
        return [
            Skip(self.pairs[i].file, SMALL_BUCKET, f"{w}x{h} holds {len(indices)}, a batch is {span}")
            for (w, h), indices in bucketing.small_buckets(self.groups(), span).items()
            for i in indices
        ]

    def image_size(self, pair):
        """(width, height) from the image's header (PIL reads it lazily), or the Skip saying why it cannot be read."""
        try:
            with self._open(pair) as f, Image.open(f) as image:
                return image.size
        except Exception as error:  # noqa: BLE001 - read_failure sorts it: missing, I/O error (stops), not an image
            return read_failure(pair.file, error)

    def __len__(self):
        return len(self.pairs)

    def image_bytes(self, index):
        """The raw bytes of image `index` (what the latent cache's key hashes); an I/O error stops the run."""
        try:
            return self._bytes(self.pairs[index])
        except OSError as error:
            raise io_error(self.pairs[index].file, error) from None

    def _open(self, pair):
        return io.BytesIO(self._bytes(pair)) if pair.source.startswith("tar:") else open(pair.image_ref, "rb")

    def _bytes(self, pair):
        return pair_bytes(pair)

    def __getitem__(self, index):
        pair = self.pairs[index]
        image = open_image(pair, read=self._bytes)
        if isinstance(image, Skip):
            return image
        target = self.targets[index]
        return resize_center_crop(image, *target), pair.caption, crop_sizes(image.size, *target)


def pair_bytes(pair):
    """The raw bytes of a pair's image (a file, or a member of a .tar)."""
    if pair.source.startswith("tar:"):
        offset, size = pair.image_ref
        with open(pair.source[4:], "rb") as f:
            f.seek(offset)
            return f.read(size)
    return Path(pair.image_ref).read_bytes()


def open_image(pair, read=pair_bytes):
    """A pair's image in RGB (its bytes from read(pair)), or the Skip of one that fails to read (read_failure:
    missing, an I/O error, not an image)."""
    try:
        image = Image.open(io.BytesIO(read(pair)))
        return image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - read_failure sorts it: missing, I/O error (stops), not an image
        return read_failure(pair.file, error)


def load_pixels(pair, width, height, read=pair_bytes):
    """A pair's image (open_image) resized and center-cropped to width x height ([3, H, W] in [-1, 1]), or the Skip
    of one that fails to read."""
    image = open_image(pair, read)
    return image if isinstance(image, Skip) else resize_center_crop(image, width, height)


def cover_crop(size, width, height):
    """(resized (w, h), left, top): an image of `size` (w, h) resized to cover width x height (kohya's sizes), then
    center-cropped from (left, top) of the resized image."""
    resized = bucketing.cover_size(*size, (width, height))
    return resized, (resized[0] - width) // 2, (resized[1] - height) // 2


def crop_sizes(size, width, height):
    """The size conditioning of an image of `size` (w, h) cropped to width x height: [original height, width, crop
    top, left, target height, width], SDXL's time-id order; the crop offset in the resized image, as diffusers'
    SDXL training scripts record it."""
    _, left, top = cover_crop(size, width, height)
    return torch.tensor([size[1], size[0], top, left, height, width])


def resize_center_crop(image, width, height=None):
    """Resize to cover width x height (square without height; kohya's sizes), center-crop, to a [3, H, W] tensor in
    [-1, 1]."""
    height = width if height is None else height
    size, left, top = cover_crop(image.size, width, height)
    image = image.resize(size, Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


def collate(samples):
    """Stack the read samples (pixels, captions, sizes); the Skips of the others in 'skipped'."""
    good = [s for s in samples if not isinstance(s, Skip)]
    pixels = torch.stack([s[0] for s in good]) if good else torch.zeros(0)
    sizes = torch.stack([s[2] for s in good]) if good else torch.zeros(0, 6, dtype=torch.long)
    skipped = [s for s in samples if isinstance(s, Skip)]
    return {"pixels": pixels, "captions": [s[1] for s in good], "sizes": sizes, "skipped": skipped}


def batch_indices(num_items, batch_size, rank, world_size, seed, start_batch=0):
    """Endless per-rank batches of indices: each epoch a seeded shuffle split across ranks (drop last);
    starts at this rank's batch `start_batch` (for exact resume)."""
    per_rank = num_items // world_size
    if per_rank < batch_size:
        raise DataError(
            f"{num_items} usable pairs cannot fill a batch of {batch_size} on each of {world_size} processes"
        )
    batches_per_epoch = per_rank // batch_size
    batch = start_batch
    while True:
        epoch, within = divmod(batch, batches_per_epoch)
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        mine = order[rank * per_rank : (rank + 1) * per_rank]
        for b in range(within, batches_per_epoch):
            yield mine[b * batch_size : (b + 1) * batch_size].tolist()
            batch += 1


def epoch_batches(dataset, batch_size, world_size):
    """How many micro-batches one process draws in an epoch (each bucket's full global batches, or its share)."""
    if getattr(dataset, "bucketed", False):
        return sum(len(indices) // (batch_size * world_size) for indices in dataset.groups().values())
    return len(dataset) // world_size // batch_size


def make_loader(dataset, batch_size, rank, world_size, seed, start_batch=0, num_workers=0):
    """DataLoader over batch_indices, or bucket_batch_indices for a bucketed dataset (a resume at batch k reads
    what a straight run would); the dataset's own `collate` if it has one (the latent cache's)."""
    if getattr(dataset, "bucketed", False):
        groups = list(dataset.groups().values())
        sampler = bucketing.bucket_batch_indices(groups, batch_size, rank, world_size, seed, start_batch)
    else:
        sampler = batch_indices(len(dataset), batch_size, rank, world_size, seed, start_batch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_Iterable(sampler),
        collate_fn=getattr(dataset, "collate", collate),
        num_workers=num_workers,
        persistent_workers=False,
    )


class _Iterable:
    """Wrap a generator as a batch_sampler (DataLoader wants an iterable, len is not needed)."""

    def __init__(self, generator):
        self.generator = generator

    def __iter__(self):
        return self.generator
