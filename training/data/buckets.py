"""Aspect-ratio buckets (kohya sd-scripts style): sizes of about resolution^2 pixels with sides in multiples of 64;
each image goes to the bucket nearest its aspect ratio, and a batch holds one bucket."""

import math

import torch

from ..errors import DataError
from .sources import ImageFolder, TarShards

STEP = 64


def bucketable(source):
    """Only the user's own images are bucketed; generated (data-free) and world data stay square."""
    return isinstance(source, ImageFolder | TarShards)


def bucket_sizes(resolution):
    """(width, height) buckets of at most resolution^2 pixels, sides multiples of 64 from about resolution / 2 to
    2 * resolution (at 512: 256..1024), the longest other side for each side, both orientations, by aspect ratio."""
    area = resolution * resolution
    low = max(STEP, math.ceil(resolution / 2 / STEP) * STEP)
    high = max(low, 2 * resolution // STEP * STEP)
    sizes = set()
    for side in range(low, high + 1, STEP):
        other = min(high, area // side // STEP * STEP)
        if other >= low:
            sizes.update({(side, other), (other, side)})
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def smallest_side(sizes):
    """The shortest side of any bucket: an image with a side under it is skipped."""
    return min(min(size) for size in sizes)


def nearest_bucket(width, height, sizes):
    """The bucket whose aspect ratio is nearest the image's (in log ratio; the first of equals)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - ratio))


def assign(image_sizes, resolution):
    """Each image's bucket, or None where it is unreadable (size None) or has a side under the smallest bucket's;
    returns (buckets, unreadable count, too-small count)."""
    sizes = bucket_sizes(resolution)
    low = smallest_side(sizes)
    buckets, unreadable, too_small = [], 0, 0
    for size in image_sizes:
        if size is None:
            unreadable += 1
            buckets.append(None)
        elif min(size) < low:
            too_small += 1
            buckets.append(None)
        else:
            buckets.append(nearest_bucket(*size, sizes))
    return buckets, unreadable, too_small


def group(buckets):
    """{bucket: [indices]} in bucket order (a deterministic order for the sampler)."""
    groups = {}
    for index, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).append(index)
    return dict(sorted(groups.items(), key=lambda item: (item[0][0] / item[0][1], item[0][0])))


def report(groups, batch_size, world_size, unreadable=0, too_small=0, low=None):
    """'buckets (W x H: images): 512x512: 120, 448x576: 31, ...' plus what was skipped and what never fills a batch."""
    parts = [f"{w}x{h}: {len(indices)}" for (w, h), indices in groups.items()]
    text = "images per bucket (width x height): " + ", ".join(parts)
    short = [f"{w}x{h}" for (w, h), indices in groups.items() if len(indices) < batch_size * world_size]
    if short:
        text += f"; too few to fill a batch of {batch_size * world_size}, never drawn: {', '.join(short)}"
    if too_small:
        text += f"; {too_small} images with a side under {low} px (the smallest bucket's) skipped"
    if unreadable:
        text += f"; {unreadable} unreadable images skipped"
    return text


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


def bucket_report(dataset, cfg, world_size):
    """The run-start line of how many images fell in each bucket (and what was skipped)."""
    low = smallest_side(bucket_sizes(cfg.resolution))
    return report(dataset.groups(), cfg.batch_size, world_size, dataset.unreadable, dataset.too_small, low)
