"""What keep-best scores and training never sees (--validation-split, --validation-data): a seeded share of the
user's image pairs taken before bucketing, a folder of its own, shapes-world scenes whose captions no training scene
has, or prompts the data-free synthesis never draws.

The default share ('auto') is 5 % of the pairs (or prompts), at least 2 and at most 64: a 20-image set gives 2 and
keeps 18; 1,280 pairs and more give 64, so a 100,000-image set loses 0.06 %. Keep-best scores a fixed number of
samples (--validation-samples) whatever the count, each caption from several noises, so more withheld captions cost
training data, not validation time; at least 2, so that the score sees more than one caption.
"""

import functools
from dataclasses import dataclass

from ..errors import UserError
from .sources import BuiltinPrompts

AUTO = "auto"
AUTO_SHARE, AUTO_MIN, AUTO_MAX = 0.05, 2, 64
SPLIT_SALT = 0x5EED  # the split's permutation: --seed + this
WORLD_SEED = 11  # validation scenes come from this world seed: training renders seed 0, the world report scores 7


@dataclass
class Holdout:
    """The validation set: its captions, and for each a loader of its image ([3, R, R] pixels in [-1, 1], or the
    Skip of an unreadable one) where there is one (None for prompts); `origin` says where they come from, for the
    log."""

    captions: list
    images: list | None
    origin: str


def parse_split(text):
    """'auto' | a count (int >= 0) | a fraction (float in (0, 1)) from --validation-split's text, else a UserError."""
    text = str(text).strip().lower()
    if text == AUTO:
        return AUTO
    try:
        if text.isdigit():
            return int(text)
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1:
        raise UserError(
            f"--validation-split must be auto, a count (e.g. 50) or a fraction in (0, 1) (e.g. 0.05), got {text!r}"
        )
    return value


def withheld_count(spec, total):
    """How many of `total` items --validation-split `spec` withholds (auto: 5 %, at least 2, at most 64)."""
    spec = parse_split(spec)
    if spec == AUTO:
        return min(AUTO_MAX, max(AUTO_MIN, round(AUTO_SHARE * total)))
    if isinstance(spec, float):
        return max(1, round(spec * total))
    return spec


def split(items, count, seed):
    """(kept, withheld): `count` of the items chosen by a permutation seeded from `seed`, each list in item order."""
    import torch

    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + SPLIT_SALT))
    chosen = set(order[:count].tolist())
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]


def split_counted(items, spec, seed, what):
    """split() by --validation-split `spec`; a UserError when it would leave nothing to train on."""
    count = withheld_count(spec, len(items))
    if count >= len(items):
        raise UserError(
            f"--validation-split {spec} withholds {count} of {len(items)} {what}, leaving none to train on: give a "
            "smaller --validation-split, --validation-split 0 (no keep-best), or --validation-data PATH"
        )
    return split(items, count, seed)


def pair_splitter(spec, seed):
    """pairs -> (kept, withheld) for PairDataset, or None when nothing is withheld (spec '0')."""
    if parse_split(spec) == 0:
        return None
    return functools.partial(split_counted, spec=spec, seed=seed, what="image pairs")


def from_pairs(pairs, resolution, origin):
    """The Holdout of image pairs: their captions, their images center-cropped to resolution x resolution."""
    from .images import load_pixels

    loaders = [functools.partial(load_pixels, pair, resolution, resolution) for pair in pairs]
    return Holdout([pair.caption for pair in pairs], loaders, origin)


def from_data(path, resolution):
    """--validation-data PATH: every pair of that folder or those shards."""
    from .images import PairDataset

    dataset = PairDataset(path, resolution)
    return from_pairs(dataset.pairs, resolution, f"the {len(dataset)} image pairs of --validation-data {path}")


def split_prompts(source, prompts, spec, seed):
    """Data-free: (prompts to synthesize, Holdout of prompts never drawn): the built-in list's are the shuffled
    prompts after it; a prompt file's, a seeded share of its lines, which synthesis then leaves out."""
    from .synth_prompts import builtin_prompts

    if withheld_count(spec, len(prompts)) == 0:
        return prompts, None
    if isinstance(source, BuiltinPrompts):
        held = builtin_prompts(withheld_count(spec, len(prompts)), start=len(prompts))
        return prompts, Holdout(held, None, f"{len(held)} built-in prompts past the list synthesis draws from")
    kept, held = split_counted(prompts, spec, seed, "prompts")
    origin = f"{len(held)} of the {len(prompts)} prompts of {source.path}, withheld from synthesis"
    return kept, Holdout(held, None, origin)


def world_scenes(world, spec, resolution):
    """'world:N' / 'diverse:N': scenes of world seed WORLD_SEED whose captions none of the N training scenes has, each
    caption once, as many as --validation-split withholds of N."""
    from . import scenes
    from .images import resize_center_crop

    count = withheld_count(spec, world.count)
    if count == 0:
        return None
    seen = {scenes.caption_at(i, 0, world.world) for i in range(world.count)}
    captions, loaders, index = [], [], 0
    while len(captions) < count:
        caption = scenes.caption_at(index, WORLD_SEED, world.world)
        if caption not in seen:
            seen.add(caption)
            image = scenes.sample(index, WORLD_SEED)[1]
            captions.append(caption)
            loaders.append(functools.partial(resize_center_crop, image, resolution))
        index += 1
    origin = f"{count} {world.world}-world scenes of seed {WORLD_SEED} whose captions no training scene has"
    return Holdout(captions, loaders, origin)
