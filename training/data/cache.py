"""The latent and caption-embedding cache under <output>/cache: VAE latent mean and std (and the size conditioning)
per image and the text encoders' hidden states (and SDXL's pooled embedding) per caption, computed once by the
processes together, then read by the loader instead of encoding each step.

An entry's name is a sha256 of what determines it: the teacher's sha256, the image's bytes and its crop size (the
bucket, or resolution x resolution), or the caption's text. A changed image or caption is a new name (re-encoded,
never stale); a teacher or resolution change likewise. Entries are written to a temporary name and renamed into
place, so a killed run keeps what it finished; an entry that does not load is recomputed with a warning.
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.conditioning import Conditioning

log = logging.getLogger(__name__)

VERSION = "scott-cache-v2"  # bump when what an entry holds or how it is computed changes
LATENT, TEXT = "latents", "text"
NAMES = {LATENT: ("mean", "std", "sizes"), TEXT: ("hidden",)}  # a text entry may also hold "pooled"


def latent_key(teacher_sha, image_bytes, size):
    """The entry name of an image: teacher, crop size (width, height) and the image's content."""
    content = hashlib.sha256(image_bytes).hexdigest()
    return hashlib.sha256(f"{VERSION}|{teacher_sha}|{LATENT}|{size[0]}x{size[1]}|{content}".encode()).hexdigest()


def text_key(teacher_sha, caption):
    """The entry name of a caption: teacher and the caption's text."""
    return hashlib.sha256(f"{VERSION}|{teacher_sha}|{TEXT}|".encode() + caption.encode("utf-8")).hexdigest()


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
    """The entry's tensors, or None if it is missing, unreadable or lacks a tensor of its kind."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception:  # noqa: BLE001 - a missing, truncated or garbled file is simply not a usable entry
        return None
    return tensors if all(name in tensors for name in NAMES[kind]) else None


def todo(root, kind, keys):
    """The keys without a usable entry; a present entry that does not load is named in a warning."""
    missing = []
    for key in keys:
        path = entry_path(root, kind, key)
        if load_entry(path, kind) is None:
            if path.exists():
                log.warning("cache entry %s is corrupt: recomputing it", path)
            missing.append(key)
    return missing


@dataclass
class Encoders:
    """What filling the cache needs: latents(pixels [B, 3, H, W]) -> (mean, std), text(captions) -> Conditioning."""

    latents: object
    text: object


def fill(dataset, teacher_sha, root, encoders, rank=0, world_size=1, batch_size=8):
    """Encode this process's shard of the missing entries; returns (latent keys, text keys per index, made)."""
    latent_keys = [latent_key(teacher_sha, dataset.image_bytes(i), dataset.targets[i]) for i in range(len(dataset))]
    captions = [pair.caption for pair in dataset.pairs]
    text_keys = [text_key(teacher_sha, c) for c in captions]
    first = {key: i for i, key in reversed(list(enumerate(latent_keys)))}
    latents = todo(root, LATENT, shard(latent_keys, rank, world_size))
    by_size = {}
    for key in latents:
        by_size.setdefault(dataset.targets[first[key]], []).append(key)
    made = 0
    for keys in by_size.values():
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            made += _fill_latents(dataset, [first[k] for k in chunk], chunk, root, encoders)
    caption_of = {text_key(teacher_sha, c): c for c in [*captions, ""]}
    texts = todo(root, TEXT, shard(caption_of, rank, world_size))
    for start in range(0, len(texts), batch_size):
        keys = texts[start : start + batch_size]
        cond = encoders.text([caption_of[k] for k in keys])
        for i, key in enumerate(keys):
            pooled = {} if cond.pooled is None else {"pooled": cond.pooled[i]}
            save_entry(entry_path(root, TEXT, key), {"hidden": cond.states[i], **pooled})
        made += len(keys)
    return latent_keys, text_keys, made


def _fill_latents(dataset, indices, keys, root, encoders):
    """Encode and save the readable images among `indices` (an unreadable one gets no entry: skipped later)."""
    samples = [(key, dataset[i]) for i, key in zip(indices, keys)]
    samples = [(key, s) for key, s in samples if s is not None]
    if not samples:
        return 0
    mean, std = encoders.latents(torch.stack([sample[0] for _, sample in samples]))
    for (key, sample), m, s in zip(samples, mean, std):
        save_entry(entry_path(root, LATENT, key), {"mean": m, "std": s, "sizes": sample[2]})
    return len(samples)


class CachedPairs(torch.utils.data.Dataset):
    """The pairs of a PairDataset served from the cache: {"mean", "std", "sizes", "cond" (a Conditioning),
    "caption"}, or None (skipped) for an image without a usable entry (unreadable when the cache was filled, or
    damaged since)."""

    def __init__(self, dataset, root, latent_keys, text_keys, uncond_key):
        self.dataset, self.root = dataset, Path(root)
        self.latent_keys, self.text_keys, self.uncond_key = latent_keys, text_keys, uncond_key

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # pairs, bucketed, groups, missing_captions, scan_skipped: the dataset's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def uncond(self):
        """The empty caption's Conditioning [1, ...] (float32)."""
        return text_conditioning(load_entry(entry_path(self.root, TEXT, self.uncond_key), TEXT))[None].float()

    def __getitem__(self, index):
        latent = load_entry(entry_path(self.root, LATENT, self.latent_keys[index]), LATENT)
        text = load_entry(entry_path(self.root, TEXT, self.text_keys[index]), TEXT)
        if latent is None or text is None:
            log.debug("no usable cache entry for %s: skipped", self.dataset.pairs[index].source)
            return None
        return {**latent, "cond": text_conditioning(text), "caption": self.dataset.pairs[index].caption}

    @staticmethod
    def collate(samples):
        """Stack the served samples; count the skipped ones ('skipped'), as data.collate does."""
        good = [s for s in samples if s is not None]
        batch = {k: torch.stack([s[k] for s in good]) if good else torch.zeros(0) for k in ("mean", "std", "sizes")}
        cond = Conditioning.cat([s["cond"][None] for s in good]) if good else None
        return {**batch, "cond": cond, "captions": [s["caption"] for s in good], "skipped": len(samples) - len(good)}


def text_conditioning(entry):
    """The Conditioning (no batch dimension) of a text entry: its hidden states and pooled embedding if any."""
    return Conditioning(entry["hidden"], entry.get("pooled"))
