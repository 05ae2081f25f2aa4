"""Data: folder / metadata.jsonl / .csv / webdataset shards; every input left out named with its reason."""

import errno
import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import images as images_module
from training.data.images import PairDataset, batch_indices, collate, crop_sizes, resize_center_crop
from training.data.skips import FILE_MISSING, NO_CAPTION, NO_IMAGE, NOT_LISTED, UNREADABLE, Skip
from training.errors import DataError


def test_folder_with_txt_captions_names_the_uncaptioned(tmp_path, images):
    folder = images(tmp_path / "d", 4)
    (folder / "img001.txt").unlink()
    dataset = PairDataset(folder, 16)
    assert len(dataset) == 3
    assert dataset.skips == [Skip(str(folder / "img001.png"), NO_CAPTION, "no img001.txt")]
    pixels, caption, sizes = dataset[0]
    assert pixels.shape == (3, 16, 16) and -1 <= pixels.min() and pixels.max() <= 1
    assert caption == "a picture number 0"
    assert sizes.tolist() == [20, 20, 0, 0, 16, 16]  # original h, w, crop top, left, target h, w


def test_an_image_with_an_unreadable_header_is_named_at_the_start(tmp_path, images):
    folder = images(tmp_path / "d", 3)
    (folder / "img001.png").write_bytes(b"not a png at all")
    dataset = PairDataset(folder, 16)
    assert [p.caption for p in dataset.pairs] == ["a picture number 0", "a picture number 2"]
    assert dataset.skips == [Skip(str(folder / "img001.png"), UNREADABLE, "not an image Pillow can read")]


def truncate(path):
    """Keep the first half of the file: the header still reads, the pixels do not."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_an_image_truncated_behind_its_header_is_a_named_skip_when_drawn(tmp_path, images):
    folder = images(tmp_path / "d", 3)
    truncate(folder / "img001.png")
    dataset = PairDataset(folder, 16)
    assert len(dataset) == 3 and dataset.skips == []  # the header reads
    batch = collate([dataset[i] for i in range(3)])
    assert batch["pixels"].shape == (2, 3, 16, 16)
    assert batch["captions"] == ["a picture number 0", "a picture number 2"]
    assert batch["skipped"] == [Skip(str(folder / "img001.png"), UNREADABLE, "image file is truncated")]


@pytest.mark.parametrize("table", ["jsonl", "csv"])
def test_metadata_tables_name_missing_files_null_texts_and_unlisted_images(tmp_path, images, table):
    folder = images(tmp_path / "d", 4)
    for txt in folder.glob("*.txt"):
        txt.unlink()
    rows = [{"file_name": f"img{i:03d}.png", "text": f"caption {i}"} for i in (0, 2)]
    rows += [{"file_name": "gone.png", "text": "a file that is not there"}, {"file_name": "img003.png", "text": None}]
    if table == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:  # csv has no null: a row without the text column is one
        (folder / "metadata.csv").write_text(
            "file_name,text\n" + "".join(f"{r['file_name']},{r['text'] or ''}\n" for r in rows[:3]) + "img003.png\n"
        )
    dataset = PairDataset(folder, 16)
    assert [dataset[i][1] for i in range(len(dataset))] == ["caption 0", "caption 2"]
    name = f"metadata.{table}"
    assert dataset.skips == [
        Skip(str(folder / "gone.png"), FILE_MISSING, f"named in {name} row 3"),
        Skip(str(folder / "img003.png"), NO_CAPTION, f"its text is null in {name} row 4"),
        Skip(str(folder / "img001.png"), NOT_LISTED, name),
    ]


def test_a_garbled_metadata_line_is_one_line(tmp_path, images):
    folder = images(tmp_path / "d", 2)
    (folder / "metadata.jsonl").write_text('{"file_name": "img000.png", "text": "ok"}\n{"file_name": \n')
    with pytest.raises(DataError, match=r"metadata.jsonl line 2 is not a JSON object \(.*\); fix or remove it$"):
        PairDataset(folder, 16)


def write_shard(path, items):
    with tarfile.open(path, "w") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_bytes(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_webdataset_shards_with_brace_pattern_name_samples_without_caption_or_image(tmp_path):
    green = png_bytes((0, 255, 0))
    write_shard(
        tmp_path / "s-000.tar",
        [("a.png", png_bytes((255, 0, 0))), ("a.txt", b"red"), ("b.png", green), ("d.txt", b"no image")],
    )  # b has no caption, d no image
    write_shard(
        tmp_path / "s-001.tar",
        [("c.jpg", png_bytes((0, 0, 255))), ("c.json", b'{"caption": "blue"}'), ("e.png", green),
         ("e.json", b'{"url": "no caption here"}')],
    )
    dataset = PairDataset(str(tmp_path / "s-{000..001}.tar"), 8)
    assert len(dataset) == 2
    shards = [tmp_path / f"s-00{i}.tar" for i in (0, 1)]
    assert dataset.skips == [
        Skip(f"{shards[0]}:b.png", NO_CAPTION, "the sample has no .txt, .caption or .json member"),
        Skip(f"{shards[0]}:d", NO_IMAGE, "the sample has no image member"),
        Skip(f"{shards[1]}:e.png", NO_CAPTION, 'e.json has no "caption" or "text"'),
    ]
    (red, cap_red, _), (blue, cap_blue, _) = dataset[0], dataset[1]
    assert (cap_red, cap_blue) == ("red", "blue")
    assert red[0].mean() > 0.9 and red[2].mean() < -0.9 and blue[2].mean() > 0.9


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "has no usable image + caption pairs (no images)"),
        (lambda p: (p.mkdir(), Image.new("RGB", (8, 8)).save(p / "x.png")), "(1 no caption)"),
    ],
)
def test_empty_source_is_a_clear_error(tmp_path, make, message):
    make(tmp_path / "d")
    with pytest.raises(DataError, match=re.escape(message)):
        PairDataset(tmp_path / "d", 16)


def test_a_permission_error_reading_a_header_stops_naming_the_file(tmp_path, images, monkeypatch):
    folder = images(tmp_path / "d", 3)
    denied = folder / "img001.png"

    def open_denied(path, *args, **kwargs):
        if path == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(images_module, "open", open_denied, raising=False)
    with pytest.raises(DataError) as caught:
        PairDataset(folder, 16)
    assert str(caught.value) == (
        f"cannot read {denied}: Permission denied; fix the file's permissions or the disk and rerun "
        "(--resume latest continues from the last checkpoint)"
    )


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(DataError, match="s-001.tar"):
        PairDataset(str(tmp_path / "s-{000..001}.tar"), 16)


def test_resize_center_crop_keeps_the_centre():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (5, 0, 35, 20))  # white around the centre square, black at the sides
    pixels = resize_center_crop(image, 10)
    assert pixels.shape == (3, 10, 10) and pixels.min() > 0.9


@pytest.mark.parametrize("size, target", [((40, 20), (10, 10)), ((30, 90), (16, 24)), ((64, 48), (32, 32))])
def test_crop_sizes_name_where_the_crop_was_taken(size, target):
    generator = torch.Generator().manual_seed(1)
    noise = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(noise)
    original_h, original_w, top, left, height, width = crop_sizes(size, *target).tolist()
    assert (original_h, original_w, height, width) == (size[1], size[0], target[1], target[0])
    # the reference: PIL's own resize to cover the target (the shorter side scaled to it), cropped at (left, top)
    scale = max(target[0] / size[0], target[1] / size[1])
    resized = image.resize((round(size[0] * scale), round(size[1] * scale)), Image.Resampling.BICUBIC)
    expected = resized.crop((left, top, left + target[0], top + target[1]))
    reference = torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(resize_center_crop(image, *target), reference)
    assert (left, top) != (0, 0) or size[0] * target[1] == size[1] * target[0]  # a crop where the ratios differ


def test_batches_split_ranks_and_resume_mid_epoch():
    def take(gen, n):
        return [next(gen) for _ in range(n)]

    straight = take(batch_indices(10, 2, 0, 1, seed=3), 12)  # 5 batches an epoch: crosses two epochs
    assert sorted(i for b in straight[:5] for i in b) == list(range(10))
    assert straight[:5] != straight[5:10]  # a new shuffle each epoch
    assert take(batch_indices(10, 2, 0, 1, seed=3, start_batch=7), 5) == straight[7:12]
    ranks = [take(batch_indices(10, 2, r, 2, seed=3), 2) for r in (0, 1)]
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))
    with pytest.raises(DataError, match="cannot fill a batch"):
        next(batch_indices(3, 2, 0, 2, seed=0))
    assert torch.equal(
        torch.tensor(straight[0]), torch.tensor(take(batch_indices(10, 2, 0, 1, seed=3), 1)[0])
    )
