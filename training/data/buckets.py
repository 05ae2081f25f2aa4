"""Aspect-ratio buckets by kohya sd-scripts' rules (library/model_util.py `make_bucket_resolutions`, library/
train_util.py `BucketManager.select_bucket`): bucket sizes of at most resolution^2 pixels with sides in multiples of 64
between --min-bucket-reso and --max-bucket-reso; each image goes to the bucket nearest its aspect ratio (linear ratio
error), is resized to cover it and center-cropped; a batch holds one bucket. docs/data.md says where we differ."""

import math
from dataclasses import dataclass

import torch

from scott_core import families

from ..errors import DataError, UserError
from .sources import ImageFolder, TarShards

STEP = 64
# kohya's --min_bucket_reso / --max_bucket_reso defaults, at any resolution: SD1.5's bucket range in scott_core's
# family table; the config's unset values take the teacher family's (SDXL: 512..2048).
BUCKET_DEFAULTS = dict(zip(("min_bucket_reso", "max_bucket_reso"), families.SD15.bucket_range))


@dataclass(frozen=True)
class BucketRules:
    """How images go to buckets: the range of bucket sides and whether an image smaller than its bucket is resized up
    to it (kohya's default) or skipped (--no-bucket-upscale)."""

    min_reso: int = BUCKET_DEFAULTS["min_bucket_reso"]
    max_reso: int = BUCKET_DEFAULTS["max_bucket_reso"]
    upscale: bool = True


def bucketable(source):
    """Only the user's own images are bucketed; generated (data-free) and world data stay square."""
    return isinstance(source, ImageFolder | TarShards)


def bucket_sizes(resolution, min_reso=BUCKET_DEFAULTS["min_bucket_reso"], max_reso=BUCKET_DEFAULTS["max_bucket_reso"]):
    """kohya's make_bucket_resolutions: the square of side resolution (floored to 64), and for each width from
    min_reso to max_reso in steps of 64 the tallest height (a multiple of 64, at most max_reso) with width x height <=
    resolution^2, and its transpose, where that height is >= min_reso; sorted by (width, height)."""
    area = resolution * resolution
    square = int(math.sqrt(area) // STEP) * STEP
    sizes = {(square, square)}
    for width in range(min_reso, max_reso + 1, STEP):
        height = min(max_reso, area // width // STEP * STEP)
        if height >= min_reso:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def nearest_bucket(width, height, sizes):
    """kohya's select_bucket: the image's own size if it is a bucket, else the bucket of least |bucket w/h - image w/h|
    (linear ratio error; of equals the first in `sizes`, which bucket_sizes orders by (width, height))."""
    if (width, height) in sizes:
        return width, height
    ratio = width / height
    return min(sizes, key=lambda size: abs(size[0] / size[1] - ratio))


def cover_size(width, height, bucket):
    """kohya's resized size: the image scaled, keeping its aspect ratio, to cover the bucket; sides rounded half up."""
    scale = bucket[1] / height if width / height > bucket[0] / bucket[1] else bucket[0] / width
    return max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5))


def bucket_of(size, resolution, rules):
    """The bucket of an image of `size` (width, height) under `rules` (BucketRules) at `resolution`."""
    return nearest_bucket(*size, bucket_sizes(resolution, rules.min_reso, rules.max_reso))


def group(buckets):
    """{bucket: [indices]} in bucket order (a deterministic order for the sampler)."""
    groups = {}
    for index, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).append(index)
    return dict(sorted(groups.items(), key=lambda item: (item[0][0] / item[0][1], item[0][0])))


def small_buckets(groups, span):
    """The buckets of `groups` holding fewer images than a global batch of `span` (never drawn), with their indices."""
    return {bucket: indices for bucket, indices in groups.items() if len(indices) < span}


def bucket_report(groups):
    """'images per bucket (width x height): 448x576: 31, 512x512: 120, ...'."""
    return "images per bucket (width x height): " + ", ".join(f"{w}x{h}: {len(i)}" for (w, h), i in groups.items())


def bucket_batch_indices(groups, batch_size, rank, world_size, seed, start_batch=0):
    """Endless per-rank batches of one bucket each: every epoch each bucket is shuffled and cut into global batches
    of batch_size * world_size (drop last), the global batches are shuffled, and rank r takes slice r of each (so
    ranks never overlap and a step's ranks share a bucket); starts at this rank's batch `start_batch` (exact resume)."""
    span = batch_size * world_size
    per_epoch = sum(len(indices) // span for indices in groups)
    if per_epoch == 0:
        largest = max(len(indices) for indices in groups)
        raise DataError(
            f"no bucket holds a batch of {span} images (the fullest has {largest}); lower --batch-size, "
            "or train square crops with --no-buckets"
        )
    batch = start_batch
    while True:
        epoch, within = divmod(batch, per_epoch)
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        chunks = []
        for indices in groups:
            order = torch.randperm(len(indices), generator=generator).tolist()
            chunks += [[indices[i] for i in order[k * span : (k + 1) * span]] for k in range(len(indices) // span)]
        shuffle = torch.randperm(len(chunks), generator=generator).tolist()
        for b in range(within, per_epoch):
            yield chunks[shuffle[b]][rank * batch_size : (rank + 1) * batch_size]
            batch += 1


def uses_buckets(cfg):
    """Whether this run buckets its images: --buckets and the user's own images (not world or data-free)."""
    return cfg.buckets and bucketable(cfg.source)


def bucket_rules(cfg):
    """This run's BucketRules, or None where it trains square crops (--no-buckets, world or data-free data); as kohya
    asserts, --min-bucket-reso <= --resolution <= --max-bucket-reso, else one line."""
    if not uses_buckets(cfg):
        return None
    if cfg.min_bucket_reso > cfg.resolution:
        raise UserError(
            f"--min-bucket-reso {cfg.min_bucket_reso} is over --resolution {cfg.resolution}: give --min-bucket-reso "
            f"{cfg.resolution} or lower"
        )
    if cfg.max_bucket_reso < cfg.resolution:
        raise UserError(
            f"--max-bucket-reso {cfg.max_bucket_reso} is under --resolution {cfg.resolution}: give --max-bucket-reso "
            f"{cfg.resolution} or higher"
        )
    return BucketRules(cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_upscale)
