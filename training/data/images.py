"""Image + caption pairs from a folder (.txt / metadata.jsonl / .csv) or webdataset .tar shards (see sources.py)."""

import csv
import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import DataError
from . import buckets as bucketing
from .sources import ImageFolder, TarShards, parse_source

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption", ".json")


@dataclass(frozen=True)
class Pair:
    """One training pair: where its image bytes are and its caption (None: to be read from caption_ref)."""

    source: str  # a file path, or "tar:<path>"
    image_ref: object  # a Path, or (offset, size) inside the tar
    caption: str


def folder_pairs(folder):
    """Pairs from an image folder: metadata.jsonl / .csv (file_name, text) or .txt captions."""
    folder = Path(folder)
    for table in (folder / "metadata.jsonl", folder / "metadata.csv"):
        if table.is_file():
            return _table_pairs(folder, table), 0
    pairs, missing = [], 0
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            missing += 1
            continue
        pairs.append(Pair(str(image), image, caption.read_text(encoding="utf-8", errors="replace").strip()))
    return pairs, missing


def _table_pairs(folder, table):
    if table.suffix == ".jsonl":
        rows = [json.loads(line) for line in table.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with open(table, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    pairs = []
    for row in rows:
        name, text = row.get("file_name"), row.get("text", row.get("caption"))
        if name and text is not None and (folder / name).is_file():
            pairs.append(Pair(str(folder / name), folder / name, str(text).strip()))
    return pairs


def tar_pairs(paths):
    """Pairs from webdataset shards: members grouped by key (name up to the first dot)."""
    pairs, missing = [], 0
    for path in paths:
        with tarfile.open(path) as tar:
            groups = {}
            for member in tar.getmembers():
                if member.isfile():
                    folder, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    groups.setdefault(f"{folder}/{stem}", {})["." + ext.lower()] = member
            for key in sorted(groups):
                members = groups[key]
                image = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
                caption = next((members[s] for s in CAPTION_SUFFIXES if s in members), None)
                if image is None:
                    continue
                if caption is None:
                    missing += 1
                    continue
                text = tar.extractfile(caption).read().decode("utf-8", errors="replace")
                if caption.name.endswith(".json"):
                    meta = json.loads(text)
                    text = meta.get("caption", meta.get("text", ""))
                pairs.append(Pair(f"tar:{path}", (image.offset_data, image.size), text.strip()))
    return pairs, missing


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of (pixels in [-1, 1] [3, H, W], caption); unreadable image -> None (skipped).

    Square R x R crops, or with buckets=True each image in the aspect-ratio bucket nearest its own (buckets.py);
    images whose header is unreadable or with a side under the smallest bucket's are then dropped and counted."""

    def __init__(self, data, resolution, buckets=False, withhold=None):
        source = parse_source(data)
        source.check()
        if isinstance(source, ImageFolder):
            self.pairs, self.missing_captions = folder_pairs(source.path)
        elif isinstance(source, TarShards):
            self.pairs, self.missing_captions = tar_pairs(source.paths)
        else:
            raise DataError(f"data {data} is not images: the loop renders or draws it into a folder first")
        # keep-best's share, taken from the listed pairs before any bucketing: training never sees these
        self.pairs, self.withheld = withhold(self.pairs) if withhold else (self.pairs, [])
        self.resolution, self.bucketed = resolution, buckets
        self.unreadable = self.too_small = 0
        self._check_not_empty(source)
        self.targets = [(resolution, resolution)] * len(self.pairs)
        if buckets:
            self._bucket(source)

    def _check_not_empty(self, source):
        if not self.pairs:
            raise DataError(
                f"data {source} has no usable image + caption pairs "
                f"({self.missing_captions} images without a caption); "
                "give each image a same-name .txt, or a metadata.jsonl / metadata.csv with file_name,text"
            )

    def _bucket(self, source):
        """Read each image's size from its header, keep the pairs that fit a bucket, and record their buckets."""
        targets, self.unreadable, self.too_small = bucketing.assign(
            [self.image_size(pair) for pair in self.pairs], self.resolution
        )
        kept = [(pair, target) for pair, target in zip(self.pairs, targets) if target is not None]
        self.pairs, self.targets = [p for p, _ in kept], [t for _, t in kept]
        if not self.pairs:
            low = bucketing.smallest_side(bucketing.bucket_sizes(self.resolution))
            raise DataError(
                f"data {source} has no image that fits a bucket at --resolution {self.resolution} "
                f"({self.too_small} with a side under {low} px, {self.unreadable} unreadable); "
                "give larger images or a lower --resolution"
            )

    @property
    def scan_skipped(self):
        """Images dropped before training (unreadable header, under the smallest bucket): counted as skipped."""
        return self.unreadable + self.too_small

    def groups(self):
        """{(width, height): [indices]} of the buckets, in bucket order (one square group without buckets)."""
        return bucketing.group(self.targets)

    def image_size(self, pair):
        """(width, height) from the image's header (PIL opens lazily), None if it cannot be read."""
        try:
            source = pair.image_ref if not pair.source.startswith("tar:") else io.BytesIO(pair_bytes(pair))
            with Image.open(source) as image:
                return image.size
        except Exception as exc:  # noqa: BLE001 - any header failure is a corrupt image: skip and count
            log.debug("skipping %s: %s", pair.source, exc)
            return None

    def __len__(self):
        return len(self.pairs)

    def image_bytes(self, index):
        """The raw bytes of image `index` (what the latent cache's key hashes)."""
        return pair_bytes(self.pairs[index])

    def __getitem__(self, index):
        pixels = load_pixels(self.pairs[index], *self.targets[index])
        return None if pixels is None else (pixels, self.pairs[index].caption)


def pair_bytes(pair):
    """The raw bytes of a pair's image (a file, or a member of a .tar)."""
    if pair.source.startswith("tar:"):
        offset, size = pair.image_ref
        with open(pair.source[4:], "rb") as f:
            f.seek(offset)
            return f.read(size)
    return Path(pair.image_ref).read_bytes()


def load_pixels(pair, width, height):
    """A pair's image resized and center-cropped to width x height ([3, H, W] in [-1, 1]); None if unreadable."""
    try:
        image = Image.open(io.BytesIO(pair_bytes(pair)))
        image = image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decode failure is a corrupt image: skip and count
        log.debug("skipping %s: %s", pair.source, exc)
        return None
    return resize_center_crop(image, width, height)


def resize_center_crop(image, width, height=None):
    """Resize to cover width x height (square without height), center-crop, to a [3, H, W] tensor in [-1, 1]."""
    height = width if height is None else height
    scale = max(width / image.size[0], height / image.size[1])
    size = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


def collate(samples):
    """Stack the readable samples; count the skipped ones in the batch ('skipped')."""
    good = [s for s in samples if s is not None]
    pixels = torch.stack([s[0] for s in good]) if good else torch.zeros(0)
    return {"pixels": pixels, "captions": [s[1] for s in good], "skipped": len(samples) - len(good)}


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
