"""Aspect-ratio buckets: the sizes, nearest-ratio assignment, one bucket a batch, seeded order that survives resume,
ranks without overlap, small images skipped and counted, the run-start report, a changed setting refused on resume."""

import itertools
import json
import logging
import math

import pytest
import torch
from PIL import Image

from training.data.buckets import bucket_batch_indices, bucket_sizes, nearest_bucket
from training.data.images import PairDataset, crop_sizes
from training.distill import main
from training.encode import batch_latents
from training.errors import DataError
from training.loop import build, data_batches, train


def test_sizes_at_512_are_kohyas():
    sizes = bucket_sizes(512)
    for size in [(512, 512), (448, 576), (576, 448), (384, 640), (640, 384), (320, 768), (256, 1024)]:
        assert size in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)
    assert all((h, w) in sizes for w, h in sizes)
    assert min(min(s) for s in sizes) == 256 and max(max(s) for s in sizes) == 1024
    # Each bucket is the largest for one of its sides: 64 more on the other would exceed resolution^2 (or 1024).
    assert all(w * (h + 64) > 512 * 512 or (w + 64) * h > 512 * 512 or max(w, h) == 1024 for w, h in sizes)
    assert bucket_sizes(64) == [(64, 64)]


@pytest.mark.parametrize(
    "image, bucket",
    [((1000, 1000), (512, 512)), ((600, 400), (640, 384)), ((400, 600), (384, 640)), ((1300, 1000), (576, 448)),
     ((5000, 300), (1024, 256))],
)
def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio(image, bucket):
    sizes = bucket_sizes(512)
    assert nearest_bucket(*image, sizes) == bucket
    ratio = math.log(image[0] / image[1])
    assert all(abs(math.log(bucket[0] / bucket[1]) - ratio) <= abs(math.log(w / h) - ratio) + 1e-12 for w, h in sizes)


def write_sized(folder, sizes):
    """One image + caption per (width, height): left half black, right half white."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (0, 0, 0))
        image.paste((255, 255, 255), (w // 2, 0, w, h))
        image.save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"image {i} of {w}x{h}")
    return folder


def test_dataset_crops_each_image_to_its_bucket_and_skips_small_ones(tmp_path):
    # At 128 px the buckets are 64x256, 64x192, 128x128, 192x64, 256x64; the smallest side is 64.
    folder = write_sized(tmp_path / "d", [(300, 100), (100, 300), (200, 200), (60, 200), (250, 90)])
    (folder / "img005.png").write_bytes(b"not an image")
    (folder / "img005.txt").write_text("broken")
    dataset = PairDataset(folder, 128, buckets=True)
    assert (len(dataset), dataset.too_small, dataset.unreadable, dataset.scan_skipped) == (4, 1, 1, 2)
    assert dataset.groups() == {(64, 192): [1], (128, 128): [2], (192, 64): [0, 3]}
    shapes = [tuple(dataset[i][0].shape) for i in range(4)]
    assert shapes == [(3, 64, 192), (3, 192, 64), (3, 128, 128), (3, 64, 192)]
    pixels = dataset[0][0]  # the centre crop keeps both halves: black on the left, white on the right
    assert pixels[:, :, :80].max() < -0.9 and pixels[:, :, -80:].min() > 0.9


def test_without_buckets_every_image_is_a_square(tmp_path):
    folder = write_sized(tmp_path / "d", [(300, 100), (100, 300), (60, 200)])
    dataset = PairDataset(folder, 64)
    assert len(dataset) == 3 and dataset.scan_skipped == 0
    assert all(dataset[i][0].shape == (3, 64, 64) for i in range(3))


def test_no_image_fits_a_bucket_is_one_line(tmp_path):
    folder = write_sized(tmp_path / "d", [(20, 20), (30, 40)])
    with pytest.raises(DataError, match=r"no image that fits a bucket at --resolution 128 \(2 with a side under 64"):
        PairDataset(folder, 128, buckets=True)


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
    sizes = [(300, 100)] * 4 + [(100, 300)] * 4 + [(200, 200)] * 2 + [(40, 200)]
    return write_sized(tmp_path / "data", sizes)


BUCKET_RUN = dict(resolution=128, buckets=True, mode="lcm", batch_size=2, checkpoint_every=1)


def test_a_bucketed_run_reports_its_buckets_and_resumes_exactly(family_teacher, tmp_path, tiny_config, caplog):
    data = bucket_data(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    tiny_teacher = family_teacher
    with caplog.at_level(logging.INFO, logger="training"):
        train(tiny_config(tiny_teacher, data, straight, max_steps=2, **BUCKET_RUN))
    assert (
        "images per bucket (width x height): 64x192: 4, 128x128: 2, 192x64: 4; "
        "1 images with a side under 64 px (the smallest bucket's) skipped" in caplog.text
    )
    assert "; 1 unreadable images skipped;" in caplog.text  # the small image counts with the corrupt ones
    train(tiny_config(tiny_teacher, data, split, max_steps=1, **BUCKET_RUN))
    train(tiny_config(tiny_teacher, data, split, max_steps=2, resume="latest", **BUCKET_RUN))
    from safetensors.torch import load_file

    a, b = (load_file(str(o / "checkpoints" / "step_0000002" / "trainable.safetensors")) for o in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if ".lora_B.student." in k)


@pytest.mark.parametrize("before, after", [(False, True), (True, False)])
def test_a_resume_with_a_changed_bucket_setting_is_refused(tmp_path, tiny_teacher, tiny_args, capsys, before, after):
    data, out = bucket_data(tmp_path), tmp_path / "out"
    step = out / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (out / "config.toml").write_text(f"buckets = {str(before).lower()}\n")
    argv = tiny_args(tiny_teacher, data, out, resolution=128, buckets=after, resume="latest")
    assert main(argv) == 2
    flag = "--buckets" if before else "--no-buckets"
    other = "--no-buckets" if before else "--buckets"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --resume {step}: that run trained with {flag} and this one with {other}; give {flag} to resume "
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
    dataset = PairDataset(str(tmp_path / "s-{000..000}.tar"), 128, buckets=True)
    assert dataset.groups() == {(64, 192): [0], (192, 64): [1]} and dataset.too_small == 1
    assert [dataset[i][1] for i in range(2)] == ["tall", "wide"] and dataset[1][0].shape == (3, 64, 192)


@pytest.mark.parametrize("data, bucketed", [("images/", True), ("world:8", False), (None, False)])
def test_only_the_users_images_are_bucketed(data, bucketed):
    from training.config import DistillConfig
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
            bucket = nearest_bucket(width, height, bucket_sizes(128))
            assert time_ids == crop_sizes((width, height), *bucket).tolist()  # original h, w, crop, target h, w
            assert z0.shape[2:] == (bucket[1] // 2, bucket[0] // 2)
            seen, crops = seen + 1, crops | {tuple(time_ids)}
    assert seen == 12 and crops == {(100, 250, 6, 0, 64, 192), (250, 100, 0, 6, 192, 64), (200, 200, 0, 0, 128, 128)}
