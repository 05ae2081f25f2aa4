"""The latent and caption-embedding cache: hits on a rerun without touching the encoders, a changed image or caption
re-encoded, a corrupt entry recomputed with a warning, a killed fill resumed, ranks split with no overlap or gap,
the step's z0 from the cache equal to the z0 encoded on the fly for the same generator, and fp32 entries apart from
bf16 ones."""

import errno
import logging
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel

from training.data import cache
from training.data.cache import LATENT, TEXT, CachedPairs, Encoders, entry_path, fill, shard, text_key
from training.data.images import PairDataset, collate
from training.data.skips import IO_ERROR, Skip, Skipped
from training.encode import batch_latents
from training.errors import DataError
from training.loop import build, train
from training.models.conditioning import Conditioning
from training.models.teacher import encode_captions


def test_shards_split_the_keys_with_no_overlap_and_no_gap():
    keys = [f"{i:03x}" for i in range(11)] * 2  # duplicates (the same image twice) are one entry
    shards = [shard(keys, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == sorted(set(keys))
    assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1 :])
    assert [len(s) for s in shards] == [4, 4, 3]


def fake_encoders():
    """Encoders that need no model: mean = pixel means, std = 1, hidden = caption length."""
    return Encoders(
        latents=lambda pixels: (pixels[:, :, ::2, ::2].mean(1, keepdim=True), torch.ones(len(pixels), 1, 8, 8)),
        text=lambda captions: Conditioning(torch.tensor([[[float(len(c))] * 4] for c in captions])),
    )


def entries(root):
    return {p.relative_to(root) for p in root.rglob("*.safetensors")}


def test_two_ranks_fill_every_entry_once(tmp_path, images):
    dataset = PairDataset(images(tmp_path / "d", 7), 16)
    done = []
    for rank in (0, 1):
        root = tmp_path / f"rank{rank}"
        made = fill(dataset, "teacher-sha", root, fake_encoders(), rank, 2, batch_size=3).made
        done.append(entries(root))
        assert made == len(done[-1])
    assert not done[0] & done[1]
    together = tmp_path / "one"
    latent_keys, text_keys, made, unreadable = fill(dataset, "teacher-sha", together, fake_encoders())
    assert unreadable == []
    assert done[0] | done[1] == entries(together) and made == 7 + 8  # 7 images, 7 captions and the empty one
    assert {entry_path(together, LATENT, k).relative_to(together) for k in latent_keys} | {
        entry_path(together, TEXT, k).relative_to(together) for k in text_keys
    } < entries(together)


def test_an_io_error_reading_a_cache_entry_stops_the_run_naming_it(tmp_path, images, monkeypatch):
    dataset = PairDataset(images(tmp_path / "d", 2), 16)
    root = tmp_path / "cache"
    filled = fill(dataset, "teacher-sha", root, fake_encoders())
    served = CachedPairs(dataset, root, filled.latent_keys, filled.text_keys, text_key("teacher-sha", ""))
    entry, real_read = entry_path(root, LATENT, filled.latent_keys[1]), Path.read_bytes

    def denied(path):
        if path == entry:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    batch = served.collate([served[0], served[1]])  # in a loader worker: no exception, a Skip the loop refuses
    assert batch["captions"] == ["a picture number 0"]
    assert batch["skipped"] == [Skip(str(entry), IO_ERROR, "Permission denied")]
    message = (
        f"cannot read {entry}: Permission denied; fix the file's permissions or the disk and rerun (--resume latest "
        "continues from the last checkpoint)"
    )
    with pytest.raises(DataError) as caught:
        Skipped().add(batch["skipped"])
    assert str(caught.value) == message
    with pytest.raises(DataError) as caught:  # a rerun's fill, looking for missing entries
        fill(dataset, "teacher-sha", root, fake_encoders())
    assert str(caught.value) == message


class Counts:
    """Patch the VAE's encode and CLIP's forward to count what they encode (or to fail)."""

    def __init__(self, monkeypatch, fail=False):
        self.images = self.captions = 0
        real_encode, real_forward = AutoencoderKL.encode, CLIPTextModel.forward

        def encode(vae, pixels, *args, **kwargs):
            assert not fail, "the VAE encoded on a cache hit"
            self.images += len(pixels)
            return real_encode(vae, pixels, *args, **kwargs)

        def forward(model, ids, *args, **kwargs):
            assert not fail, "the text encoder ran on a cache hit"
            self.captions += len(ids)
            return real_forward(model, ids, *args, **kwargs)

        monkeypatch.setattr(AutoencoderKL, "encode", encode)
        monkeypatch.setattr(CLIPTextModel, "forward", forward)


def test_a_rerun_hits_the_cache_and_never_calls_the_encoders(tiny_teacher, tiny_data, tmp_path, tiny_config,
                                                             monkeypatch):
    cfg = tiny_config(tiny_teacher, tiny_data, tmp_path / "out", mode="lcm")
    counts = Counts(monkeypatch)
    build(cfg)
    assert (counts.images, counts.captions) == (8, 9)  # 8 images, 8 captions and the empty caption, once each
    monkeypatch.undo()
    Counts(monkeypatch, fail=True)
    path = train(cfg)  # builds, trains 2 steps and exports with both encoders patched to fail
    assert path.is_file()


def test_a_changed_image_or_caption_is_reencoded(tiny_teacher, tiny_data, tmp_path, tiny_config, monkeypatch):
    cfg = tiny_config(tiny_teacher, tiny_data, tmp_path / "out")
    build(cfg)
    Image.new("RGB", (20, 20), (250, 10, 10)).save(tiny_data / "img003.png")
    (tiny_data / "img005.txt").write_text("a changed caption")
    counts = Counts(monkeypatch)
    run = build(cfg)
    assert (counts.images, counts.captions) == (2, 2)  # each in its batch of 2 (--batch-size), encoded whole
    served = run.dataset[3]
    pixels = collate([run.dataset.dataset[3]])["pixels"]
    # Encoded in a batch of 2, here alone: equal to float rounding (the old image's entry is a different latent).
    torch.testing.assert_close(served["mean"], run.teacher.vae.encode(pixels).latent_dist.mean[0], rtol=1e-5, atol=1e-6)
    assert run.dataset[5]["caption"] == "a changed caption"
    ids = run.teacher.tokenizers[0](["a changed caption"], padding="max_length", max_length=77, return_tensors="pt")
    (encoder,) = run.teacher.text_encoders
    torch.testing.assert_close(run.dataset[5]["cond"].states, encoder(ids.input_ids)[0][0], rtol=1e-5, atol=1e-6)


def test_a_corrupt_entry_is_recomputed_with_a_warning(tiny_teacher, tiny_data, tmp_path, tiny_config, monkeypatch,
                                                      caplog):
    cfg = tiny_config(tiny_teacher, tiny_data, tmp_path / "out")
    run = build(cfg)
    path = entry_path(run.dataset.root, LATENT, run.dataset.latent_keys[2])
    good = {k: v.clone() for k, v in load_file(str(path)).items()}  # load_file maps the file: copy before damage
    path.write_bytes(path.read_bytes()[:40])  # truncated, as a crash of the disk might leave it
    counts = Counts(monkeypatch)
    with caplog.at_level(logging.WARNING):
        build(cfg)
    assert f"cache entry {path} is corrupt: recomputing it" in caplog.text
    assert counts.images == 2 and counts.captions == 0  # its batch of 2 again, so its bits are the first fill's
    assert torch.equal(load_file(str(path))["mean"], good["mean"])


def test_a_killed_fill_keeps_its_finished_entries(tiny_teacher, tiny_data, tmp_path, tiny_config, monkeypatch):
    cfg = tiny_config(tiny_teacher, tiny_data, tmp_path / "out")
    real_save, saved = cache.save_entry, []

    def dies_on_the_fourth(path, tensors):
        if len(saved) == 3:
            raise KeyboardInterrupt("killed while caching")
        saved.append(path)
        real_save(path, tensors)

    monkeypatch.setattr(cache, "save_entry", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        build(cfg)
    monkeypatch.undo()
    assert not list((tmp_path / "out" / "cache").rglob("*.tmp"))
    counts = Counts(monkeypatch)
    build(cfg)
    assert (counts.images, counts.captions) == (8 - 2, 9)  # the first batch of 2 was finished, the second is redone


def test_the_cached_z0_and_captions_equal_the_encoded_ones(family_teacher, tiny_data, tmp_path, tiny_config,
                                                           same_conditioning):
    run = build(tiny_config(family_teacher, tiny_data, tmp_path / "out", mixed_precision="bf16"))
    assert run.teacher.vae.dtype == torch.bfloat16  # the cache stores what the bf16 VAE gives, as training used
    indices = [6, 1, 4]
    cached = run.dataset.collate([run.dataset[i] for i in indices])
    encoded = collate([run.dataset.dataset[i] for i in indices])
    z_cached, c_cached = batch_latents(run, cached, torch.Generator().manual_seed(11))
    z_encoded, c_encoded = batch_latents(run, encoded, torch.Generator().manual_seed(11))
    assert z_cached.dtype == z_encoded.dtype == torch.float32 and z_cached.shape == (3, 4, 8, 8)
    torch.testing.assert_close(z_cached, z_encoded, rtol=1e-6, atol=1e-6)
    same_conditioning(c_cached, c_encoded, rtol=0, atol=0)
    # SDXL: the pooled embedding is cached too and the time ids are the images' sizes (20 px, resized to 16)
    expected = encode_captions(run.teacher, encoded["captions"]).float()
    same_conditioning(c_cached, run.teacher.family.conditioned(expected, encoded["sizes"]), rtol=0, atol=0)
    if run.teacher.family.time_ids:
        assert c_cached.time_ids.tolist() == [[20, 20, 0, 0, 16, 16]] * 3 and c_cached.pooled.shape == (3, 32)
    z_other, _ = batch_latents(run, cached, torch.Generator().manual_seed(12))
    assert (z_other - z_cached).abs().max() > 1e-3  # the latent is drawn from mean and std each time


def test_training_from_the_cache_matches_training_without_it(tiny_teacher, tiny_data, tmp_path, tiny_config):
    from training.checkpoint import WEIGHTS

    for name, cached in (("cached", True), ("encoded", False)):
        train(tiny_config(tiny_teacher, tiny_data, tmp_path / name, cache_latents=cached, checkpoint_every=2))
    a, b = (load_file(str(tmp_path / n / "checkpoints" / "step_0000002" / WEIGHTS)) for n in ("cached", "encoded"))
    assert a.keys() == b.keys()
    # The cache encodes in other batches than training does, so z0 differs in the last float bits (see the test
    # above), which AdamW's first normalised steps amplify a little; a wrong mean, std, noise or scaling would move
    # the student LoRA's B (zero at the start, so all of it is training's update) by its whole size.
    for key in (k for k in a if ".lora_B.student." in k):
        assert (a[key] - b[key]).abs().max() <= 0.05 * a[key].abs().max(), key
    assert not (tmp_path / "encoded" / "cache").exists()


def test_an_fp32_run_after_a_bf16_run_on_one_cache_encodes_its_own_entries(tiny_teacher, tiny_data, tmp_path,
                                                                           tiny_config, monkeypatch):
    from accelerate.state import AcceleratorState

    from training.checkpoint import WEIGHTS

    out = tmp_path / "out"
    run = build(tiny_config(tiny_teacher, tiny_data, out, mixed_precision="bf16"))
    bf16 = entries(run.dataset.root)
    assert load_file(str(entry_path(run.dataset.root, LATENT, run.dataset.latent_keys[0])))["mean"].dtype == (
        torch.bfloat16
    )
    AcceleratorState._reset_state(reset_partial_state=True)  # a new run in this process, at another precision
    counts = Counts(monkeypatch)
    train(tiny_config(tiny_teacher, tiny_data, out, mixed_precision="no", checkpoint_every=2))
    assert (counts.images, counts.captions) == (8, 9)  # nothing of the bf16 run was read
    monkeypatch.undo()
    assert bf16 < entries(out / "cache") and len(entries(out / "cache")) == 2 * len(bf16)
    fresh = tmp_path / "fresh"
    train(tiny_config(tiny_teacher, tiny_data, fresh, mixed_precision="no", checkpoint_every=2))
    a, b = (load_file(str(o / "checkpoints" / "step_0000002" / WEIGHTS)) for o in (out, fresh))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
