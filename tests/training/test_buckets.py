"""Aspect-ratio buckets by kohya sd-scripts' rules: its bucket lists at 512, 768 and 1024, its nearest-bucket rule and
resized sizes, small images upscaled or (--no-bucket-upscale) skipped and named, one bucket a batch, seeded order that
survives resume, ranks without overlap, the run-start report, a changed setting refused on resume."""

import itertools
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import DistillConfig
from training.data.buckets import (
    BucketRules,
    bucket_batch_indices,
    bucket_of,
    bucket_rules,
    bucket_sizes,
    cover_size,
    nearest_bucket,
)
from training.data.images import PairDataset, crop_sizes
from training.data.skips import SMALL_BUCKET, TOO_SMALL, Skip
from training.distill import main
from training.encode import batch_latents
from training.errors import DataError, UserError
from training.loop import build, data_batches, train

# kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb, library/model_util.py:
# make_bucket_resolutions((R, R), min_size=256, max_size=1024, divisible=64), its output at R = 512, 768, 1024 (the
# defaults of --min_bucket_reso / --max_bucket_reso, library/train_util.py).
KOHYA_BUCKETS = {
    512: [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
          (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)],
    768: [(256, 1024), (320, 1024), (384, 1024), (448, 1024), (512, 1024), (576, 960), (576, 1024), (640, 896),
          (704, 832), (768, 768), (832, 704), (896, 640), (960, 576), (1024, 256), (1024, 320), (1024, 384),
          (1024, 448), (1024, 512), (1024, 576)],
    1024: [(256, 1024), (320, 1024), (384, 1024), (448, 1024), (512, 1024), (576, 1024), (640, 1024), (704, 1024),
           (768, 1024), (832, 1024), (896, 1024), (960, 1024), (1024, 256), (1024, 320), (1024, 384), (1024, 448),
           (1024, 512), (1024, 576), (1024, 640), (1024, 704), (1024, 768), (1024, 832), (1024, 896), (1024, 960),
           (1024, 1024)],
}


@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_bucket_sizes_are_kohyas(resolution):
    assert bucket_sizes(resolution) == KOHYA_BUCKETS[resolution]


def test_bucket_range_is_a_setting():
    assert bucket_sizes(128, 64, 1024) == [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]
    assert bucket_sizes(64, 64, 64) == [(64, 64)]


def kohya_select(width, height, resos):
    """BucketManager.select_bucket (library/train_util.py, same commit), upscaling on: the bucket and resized size."""
    aspect_ratio = width / height
    reso = (width, height)
    if reso not in set(resos):
        reso = resos[np.abs(np.array([w / h for w, h in resos]) - aspect_ratio).argmin()]
    scale = reso[1] / height if aspect_ratio > reso[0] / reso[1] else reso[0] / width
    return reso, (int(width * scale + 0.5), int(height * scale + 0.5))


@pytest.mark.parametrize(
    "image, bucket",
    [
        ((1140, 1000), (512, 512)),  # ratio 1.14: linear error picks 512x512, log ratio would pick 576x448
        ((885, 1000), (448, 576)),  # 0.885: linear picks 448x576, log 512x512
        ((3874, 1000), (960, 256)),  # 3.874: linear picks 960x256, log 1024x256
        ((1000, 1000), (512, 512)),
        ((600, 400), (640, 384)),
        ((5000, 300), (1024, 256)),
        ((448, 576), (448, 576)),  # an image of a bucket's own size takes it
    ],
)
def test_each_image_goes_to_the_bucket_of_least_linear_ratio_error(image, bucket):
    assert nearest_bucket(*image, bucket_sizes(512)) == bucket == kohya_select(*image, KOHYA_BUCKETS[512])[0]


def test_selection_and_resized_size_match_kohyas_on_many_ratios():
    generator = torch.Generator().manual_seed(0)
    for sizes in KOHYA_BUCKETS.values():
        for width, height in (torch.randint(40, 3000, (300, 2), generator=generator)).tolist():
            bucket, resized = kohya_select(width, height, sizes)
            assert nearest_bucket(width, height, sizes) == bucket
            assert cover_size(width, height, bucket) == resized, (width, height, bucket)


def test_resized_size_covers_the_bucket_rounding_half_up():
    assert cover_size(1000, 500, (640, 384)) == (768, 384)  # wider than the bucket: the height fits
    assert cover_size(300, 1000, (384, 640)) == (384, 1280)  # taller: the width fits
    assert cover_size(3, 2, (64, 64)) == (96, 64)  # upscaled
    assert cover_size(250, 90, (192, 64)) == (192, 69)  # 69.12


def write_sized(folder, sizes):
    """One image + caption per (width, height): left half black, right half white."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (0, 0, 0))
        image.paste((255, 255, 255), (w // 2, 0, w, h))
        image.save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"image {i} of {w}x{h}")
    return folder


AT_128 = BucketRules(min_reso=64)  # at 128 px: 64x192, 64x256, 128x128, 192x64, 256x64
SIZES = [(300, 100), (100, 300), (200, 200), (60, 200), (250, 90)]


def test_dataset_crops_each_image_to_its_bucket_and_upscales_small_ones(tmp_path):
    folder = write_sized(tmp_path / "d", SIZES)
    dataset = PairDataset(folder, 128, buckets=AT_128)
    assert len(dataset) == 5 and dataset.skips == []
    assert dataset.groups() == {(64, 192): [1, 3], (128, 128): [2], (192, 64): [0, 4]}
    shapes = [tuple(dataset[i][0].shape) for i in range(5)]
    assert shapes == [(3, 64, 192), (3, 192, 64), (3, 128, 128), (3, 192, 64), (3, 64, 192)]
    pixels = dataset[0][0]  # the centre crop keeps both halves: black on the left, white on the right
    assert pixels[:, :, :80].max() < -0.9 and pixels[:, :, -80:].min() > 0.9


def test_without_upscaling_an_image_smaller_than_its_bucket_is_skipped_and_named(tmp_path):
    folder = write_sized(tmp_path / "d", SIZES)
    dataset = PairDataset(folder, 128, buckets=BucketRules(min_reso=64, upscale=False))
    assert dataset.groups() == {(64, 192): [1], (128, 128): [2], (192, 64): [0, 3]}
    assert dataset.skips == [Skip(str(folder / "img003.png"), TOO_SMALL, "60x200 under 64x192")]
    assert dataset.undrawn(2) == [Skip(str(folder / "img001.png"), SMALL_BUCKET, "64x192 holds 1, a batch is 2"),
                                  Skip(str(folder / "img002.png"), SMALL_BUCKET, "128x128 holds 1, a batch is 2")]


def test_without_buckets_every_image_is_a_square(tmp_path):
    folder = write_sized(tmp_path / "d", [(300, 100), (100, 300), (60, 200)])
    dataset = PairDataset(folder, 64)
    assert len(dataset) == 3 and dataset.skips == [] and dataset.undrawn(4) == []
    assert all(dataset[i][0].shape == (3, 64, 64) for i in range(3))


def test_no_image_fits_a_bucket_is_one_line(tmp_path):
    folder = write_sized(tmp_path / "d", [(20, 20), (30, 40)])
    with pytest.raises(DataError, match=r"has no usable image \+ caption pairs \(2 smaller than its bucket\)"):
        PairDataset(folder, 128, buckets=BucketRules(min_reso=64, upscale=False))


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(resolution=128), "--min-bucket-reso 256 is over --resolution 128: give --min-bucket-reso 128 or lower"),
        (dict(resolution=768, max_bucket_reso=512),
         "--max-bucket-reso 512 is under --resolution 768: give --max-bucket-reso 768 or higher"),
        (dict(min_bucket_reso=200), "--min-bucket-reso must be a multiple of 64, >= 64, got 200"),
    ],
)
def test_the_bucket_range_is_checked_as_kohya_asserts(flags, message):
    with pytest.raises(UserError) as caught:
        bucket_rules(DistillConfig(teacher="t", data="images/", **flags).resolved())
    assert str(caught.value) == message


def test_square_crops_and_world_data_need_no_bucket_range():
    assert bucket_rules(DistillConfig(teacher="t", data="images/", resolution=128, buckets=False).resolved()) is None
    assert bucket_rules(DistillConfig(teacher="t", data="world:8", resolution=64).resolved()) is None
    assert bucket_rules(DistillConfig(teacher="t", data="images/", resolution=768).resolved()) == BucketRules(256, 1024)


GROUPS = [list(range(0, 7)), list(range(7, 10)), list(range(10, 22))]  # three buckets of 7, 3 and 12 images


def take(generator, n):
    return [next(generator) for _ in range(n)]


def test_bucket_batches_hold_one_bucket_follow_the_seed_and_resume_exactly():
    straight = take(bucket_batch_indices(GROUPS, 2, 0, 1, seed=5), 22)  # 3 + 1 + 6 = 10 batches an epoch
    bucket_of = {i: b for b, group in enumerate(GROUPS) for i in group}
    assert all(len({bucket_of[i] for i in batch}) == 1 and len(batch) == 2 for batch in straight)
    epoch = straight[:10]
    assert len({i for b in epoch for i in b}) == 20  # every full batch once an epoch (one left over in 7 and 3)
    assert [sum(bucket_of[b[0]] == k for b in epoch) for k in range(3)] == [3, 1, 6]
    assert straight[:10] != straight[10:20]  # a new shuffle each epoch
    assert take(bucket_batch_indices(GROUPS, 2, 0, 1, seed=5), 22) == straight
    assert take(bucket_batch_indices(GROUPS, 2, 0, 1, seed=6), 10) != epoch
    assert take(bucket_batch_indices(GROUPS, 2, 0, 1, seed=5, start_batch=7), 15) == straight[7:22]


def test_bucket_batches_split_ranks_without_overlap():
    ranks = [take(bucket_batch_indices(GROUPS, 2, r, 2, seed=1), 4) for r in (0, 1)]  # 1 + 0 + 3 global batches
    bucket_of = {i: b for b, group in enumerate(GROUPS) for i in group}
    for a, b in zip(*ranks):
        assert not set(a) & set(b)
        assert {bucket_of[i] for i in a + b} == {bucket_of[a[0]]}  # a step's ranks share one bucket
    assert len({i for r in ranks for b in r for i in b}) == 16
    with pytest.raises(DataError, match="no bucket holds a batch of 16 images"):
        next(bucket_batch_indices(GROUPS, 8, 0, 2, seed=0))


def bucket_data(tmp_path):
    sizes = [(300, 100)] * 4 + [(100, 300)] * 4 + [(200, 200)] * 2 + [(40, 200)] + [(900, 100)]
    return write_sized(tmp_path / "data", sizes)


BUCKET_RUN = dict(resolution=128, buckets=True, min_bucket_reso=64, bucket_upscale=False, mode="lcm", batch_size=2,
                  checkpoint_every=1)


def test_a_bucketed_run_reports_its_buckets_and_skips_and_resumes_exactly(family_teacher, tmp_path, tiny_config,
                                                                           caplog):
    data = bucket_data(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    tiny_teacher = family_teacher
    with caplog.at_level(logging.INFO, logger="training"):
        train(tiny_config(tiny_teacher, data, straight, max_steps=2, **BUCKET_RUN))
    assert "images per bucket (width x height): 64x192: 4, 128x128: 2, 192x64: 4, 256x64: 1" in caplog.text
    listed = straight / "skipped.txt"
    assert (
        f"10 image + caption pairs train; 2 inputs skipped (1 smaller than its bucket, 1 in a bucket under a batch), "
        f"listed in {listed}; keep-best: off; fresh run" in caplog.text
    )
    assert "2 steps in" in caplog.text and f"; 2 inputs skipped, listed in {listed}; LoRA written to" in caplog.text
    assert listed.read_text().splitlines()[1:] == [
        f"{data / 'img010.png'}\tsmaller than its bucket: 40x200 under 64x256",
        f"{data / 'img011.png'}\tin a bucket under a batch: 256x64 holds 1, a batch is 2",
    ]
    train(tiny_config(tiny_teacher, data, split, max_steps=1, **BUCKET_RUN))
    train(tiny_config(tiny_teacher, data, split, max_steps=2, resume="latest", **BUCKET_RUN))
    from safetensors.torch import load_file

    a, b = (load_file(str(o / "checkpoints" / "step_0000002" / "trainable.safetensors")) for o in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if ".lora_B.student." in k)


@pytest.mark.parametrize(
    "saved, flags, then, now",
    [
        ("buckets = false", dict(buckets=True), "--no-buckets", "--buckets"),
        ("buckets = true", dict(buckets=False), "--buckets", "--no-buckets"),
        ("", dict(buckets=True), "--no-buckets", "--buckets"),  # a run file from before buckets: square crops
        ("buckets = true\nmin_bucket_reso = 128", dict(buckets=True), "--min-bucket-reso 128", "--min-bucket-reso 64"),
        ("buckets = true\nbucket_upscale = false", dict(buckets=True), "--no-bucket-upscale", "--bucket-upscale"),
    ],
)
def test_a_resume_with_a_changed_bucket_setting_is_refused(tmp_path, tiny_teacher, tiny_args, capsys, saved, flags,
                                                           then, now):
    data, out = bucket_data(tmp_path), tmp_path / "out"
    step = out / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (out / "config.toml").write_text(saved + "\n")
    argv = tiny_args(tiny_teacher, data, out, resolution=128, min_bucket_reso=64, resume="latest", **flags)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --resume {step}: that run trained with {then} and this one with {now}; give {then} to resume "
        "it, or start a new --output"
    ]



def test_shards_are_bucketed_from_their_headers_too(tmp_path):
    import io
    import tarfile

    with tarfile.open(tmp_path / "s-000.tar", "w") as tar:
        for name, size in [("wide", (300, 100)), ("tall", (100, 300)), ("tiny", (50, 50))]:
            buffer = io.BytesIO()
            Image.new("RGB", size, (9, 9, 9)).save(buffer, format="PNG")
            for suffix, data in ((".png", buffer.getvalue()), (".txt", name.encode())):
                info = tarfile.TarInfo(name + suffix)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    dataset = PairDataset(str(tmp_path / "s-{000..000}.tar"), 128, buckets=BucketRules(min_reso=64, upscale=False))
    assert dataset.groups() == {(64, 192): [0], (192, 64): [1]}
    assert dataset.skips == [Skip(f"{tmp_path / 's-000.tar'}:tiny.png", TOO_SMALL, "50x50 under 128x128")]
    assert [dataset[i][1] for i in range(2)] == ["tall", "wide"] and dataset[1][0].shape == (3, 64, 192)


@pytest.mark.parametrize("data, bucketed", [("images/", True), ("world:8", False), (None, False)])
def test_only_the_users_images_are_bucketed(data, bucketed):
    from training.data.buckets import uses_buckets

    assert uses_buckets(DistillConfig(teacher="t", data=data, resolution=64).resolved()) is bucketed
    assert not uses_buckets(DistillConfig(teacher="t", data=data, resolution=64, buckets=False).resolved())


@pytest.mark.parametrize("cache", [True, False])
def test_bucketed_sdxl_batches_carry_each_images_original_size_and_crop(tiny_xl_teacher, tmp_path, tiny_config, cache):
    # 5:2 images in the 3:1 buckets (resized to 192 x 77, 6 rows cropped off the top), squares uncropped
    data = write_sized(tmp_path / "data", [(250, 100)] * 2 + [(100, 250)] * 2 + [(200, 200)] * 2)
    run = build(tiny_config(tiny_xl_teacher, data, tmp_path / "out", cache_latents=cache, **BUCKET_RUN))
    seen, crops = 0, set()
    for batch in itertools.islice(data_batches(run, 0), 6):
        z0, cond = batch_latents(run, batch, torch.Generator().manual_seed(0))
        for caption, time_ids in zip(batch["captions"], cond.time_ids.tolist()):
            width, height = (int(v) for v in caption.rsplit(" ", 1)[1].split("x"))  # "image 3 of 300x100"
            bucket = bucket_of((width, height), 128, bucket_rules(run.cfg))
            assert time_ids == crop_sizes((width, height), *bucket).tolist()  # original h, w, crop, target h, w
            assert z0.shape[2:] == (bucket[1] // 2, bucket[0] // 2)
            seen, crops = seen + 1, crops | {tuple(time_ids)}
    assert seen == 12 and crops == {(100, 250, 6, 0, 64, 192), (250, 100, 0, 6, 192, 64), (200, 200, 0, 0, 128, 128)}
