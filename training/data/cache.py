"""The latent and caption-embedding cache under <output>/cache: VAE latent mean and std (and the size conditioning)
per image and the text encoders' hidden states (and SDXL's pooled embedding) per caption, computed once by the
processes together, then read by the loader instead of encoding each step.

An entry's name is a sha256 of what determines it: the encoders (the teacher's sha256 and the dtype they ran in), the
image's bytes and its crop size (the bucket, or resolution x resolution), or the caption's text. A changed image or
caption is a new name (re-encoded, never stale); a teacher, dtype or resolution change likewise. Entries are encoded
in fixed batches (a batch with any entry missing is encoded whole, so a resumed fill writes the bits an uninterrupted
one would), each written to a temporary name and renamed into place, so a killed run keeps what it finished; an entry
that does not load is recomputed with a warning.
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..models.conditioning import Conditioning
from .skips import IO_ERROR, NO_CACHE_ENTRY, Skip, io_error, refuse_io_errors

log = logging.getLogger(__name__)

VERSION = "scott-cache-v3"  # bump when what an entry holds or how it is computed changes
LATENT, TEXT = "latents", "text"
NAMES = {LATENT: ("mean", "std", "sizes"), TEXT: ("hidden",)}  # a text entry may also hold "pooled"


def encoder_id(teacher_sha, *dtypes):
    """What encodes the entries: the teacher's weights and the dtypes its encoders run in (an fp32 run never reads
    bf16 entries)."""
    return "|".join([teacher_sha, *map(str, dtypes)])


def latent_key(encoder, image_bytes, size):
    """The entry name of an image: the encoder (encoder_id), crop size (width, height) and the image's content."""
    content = hashlib.sha256(image_bytes).hexdigest()
    return hashlib.sha256(f"{VERSION}|{encoder}|{LATENT}|{size[0]}x{size[1]}|{content}".encode()).hexdigest()


def text_key(encoder, caption):
    """The entry name of a caption: the encoder (encoder_id) and the caption's text."""
    return hashlib.sha256(f"{VERSION}|{encoder}|{TEXT}|".encode() + caption.encode("utf-8")).hexdigest()


def entry_path(root, kind, key):
    """<root>/<kind>/<key[:2]>/<key>.safetensors."""
    return Path(root) / kind / key[:2] / f"{key}.safetensors"


def shard(keys, rank, world_size):
    """The distinct keys process `rank` computes: every world_size-th in sorted order (no overlap, no gap)."""
    return sorted(set(keys))[rank::world_size]


def save_entry(path, tensors):
    """Write the tensors to a temporary file and rename it into place (a kill leaves no half entry)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_entry(path, kind):
    """The entry's tensors, or None if it is missing, truncated, garbled or lacks a tensor of its kind; an I/O error
    (an OSError other than a missing file: permission denied, EIO) is raised."""
    from safetensors.torch import load

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        tensors = load(data)
    except Exception:  # noqa: BLE001 - bytes in memory: any failure is a truncated or garbled entry
        return None
    return tensors if all(name in tensors for name in NAMES[kind]) else None


def todo(root, kind, keys):
    """The keys without a usable entry; a present entry that does not load is named in a warning, an I/O error stops
    the run naming the entry."""
    missing = []
    for key in keys:
        path = entry_path(root, kind, key)
        try:
            usable = load_entry(path, kind) is not None
        except OSError as error:
            raise io_error(path, error) from None
        if not usable:
            if path.exists():
                log.warning("cache entry %s is corrupt: recomputing it", path)
            missing.append(key)
    return missing


def batches(keys, batch_size):
    """`keys` cut into the fixed batches the fill encodes them in."""
    return [keys[start : start + batch_size] for start in range(0, len(keys), batch_size)]


@dataclass
class Encoders:
    """What filling the cache needs: latents(pixels [B, 3, H, W]) -> (mean, std), text(captions) -> Conditioning."""

    latents: object
    text: object


class Filled(NamedTuple):
    """What fill returns: the entry names of each image and caption, how many entries this process wrote, and the
    Skips of the images in its shard that did not decode (they have no entry)."""

    latent_keys: list
    text_keys: list
    made: int
    unreadable: list


def fill(dataset, encoder, root, encoders, rank=0, world_size=1, batch_size=8):
    """Encode this process's shard of the entries, in fixed batches (per crop size), where a batch lacks an entry."""
    latent_keys = [latent_key(encoder, dataset.image_bytes(i), dataset.targets[i]) for i in range(len(dataset))]
    text_keys = [text_key(encoder, pair.caption) for pair in dataset.pairs]
    first = {key: i for i, key in reversed(list(enumerate(latent_keys)))}
    by_size = {}
    for key in shard(latent_keys, rank, world_size):
        by_size.setdefault(dataset.targets[first[key]], []).append(key)
    made, unreadable = 0, []
    for chunk in (chunk for keys in by_size.values() for chunk in batches(keys, batch_size)):
        if todo(root, LATENT, chunk):
            done, failed = _fill_latents(dataset, [first[k] for k in chunk], chunk, root, encoders)
            made, unreadable = made + done, unreadable + failed
    caption_of = {text_key(encoder, pair.caption): pair.caption for pair in dataset.pairs}
    caption_of[text_key(encoder, "")] = ""
    for chunk in batches(shard(caption_of, rank, world_size), batch_size):
        if todo(root, TEXT, chunk):
            cond = encoders.text([caption_of[k] for k in chunk])
            for i, key in enumerate(chunk):
                pooled = {} if cond.pooled is None else {"pooled": cond.pooled[i]}
                save_entry(entry_path(root, TEXT, key), {"hidden": cond.states[i], **pooled})
            made += len(chunk)
    return Filled(latent_keys, text_keys, made, unreadable)


def _fill_latents(dataset, indices, keys, root, encoders):
    """Encode and save the images among `indices` that decode; returns (entries written, Skips of the others)."""
    samples = [(key, dataset[i]) for i, key in zip(indices, keys)]
    failed = refuse_io_errors([sample for _, sample in samples if isinstance(sample, Skip)])
    good = [(key, sample) for key, sample in samples if not isinstance(sample, Skip)]
    if good:
        mean, std = encoders.latents(torch.stack([sample[0] for _, sample in good]))
        for (key, sample), m, s in zip(good, mean, std):
            save_entry(entry_path(root, LATENT, key), {"mean": m, "std": s, "sizes": sample[2]})
    return len(good), failed


class CachedPairs(torch.utils.data.Dataset):
    """The pairs of a PairDataset served from the cache: {"mean", "std", "sizes", "cond" (a Conditioning),
    "caption"}, or a Skip for an image without a usable entry (unreadable when the cache was filled, or removed or
    damaged since)."""

    def __init__(self, dataset, root, latent_keys, text_keys, uncond_key):
        self.dataset, self.root = dataset, Path(root)
        self.latent_keys, self.text_keys, self.uncond_key = latent_keys, text_keys, uncond_key

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # pairs, bucketed, groups, skips, undrawn: the dataset's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def uncond(self):
        """The empty caption's Conditioning [1, ...] (float32)."""
        return text_conditioning(load_entry(entry_path(self.root, TEXT, self.uncond_key), TEXT))[None].float()

    def __getitem__(self, index):
        pair = self.dataset.pairs[index]
        paths = {
            LATENT: entry_path(self.root, LATENT, self.latent_keys[index]),
            TEXT: entry_path(self.root, TEXT, self.text_keys[index]),
        }
        try:
            entries = {kind: load_entry(path, kind) for kind, path in paths.items()}
        except OSError as error:
            return Skip(str(error.filename), IO_ERROR, error.strerror or str(error))
        missing = [str(paths[kind]) for kind, entry in entries.items() if entry is None]
        if missing:
            return Skip(pair.file, NO_CACHE_ENTRY, f"{missing[0]} is missing or damaged")
        return {**entries[LATENT], "cond": text_conditioning(entries[TEXT]), "caption": pair.caption}

    @staticmethod
    def collate(samples):
        """Stack the served samples; the Skips of the others in 'skipped', as images.collate does."""
        good = [s for s in samples if not isinstance(s, Skip)]
        batch = {k: torch.stack([s[k] for s in good]) if good else torch.zeros(0) for k in ("mean", "std", "sizes")}
        cond = Conditioning.cat([s["cond"][None] for s in good]) if good else None
        skipped = [s for s in samples if isinstance(s, Skip)]
        return {**batch, "cond": cond, "captions": [s["caption"] for s in good], "skipped": skipped}


def text_conditioning(entry):
    """The Conditioning (no batch dimension) of a text entry: its hidden states and pooled embedding if any."""
    return Conditioning(entry["hidden"], entry.get("pooled"))
