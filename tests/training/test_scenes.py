"""The shapes world: deterministic scenes whose captions say what the pixels show."""

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import torch

from training.data import scenes

SHAPES_40_DIGEST = "07a8417b51922a1b2ba7ace2bc5a695e710ed293d59ae91462d9854890cd1adf"


def test_captions_round_trip_and_cover_every_attribute():
    drawn = [scenes.sample(i, seed=3)[0] for i in range(600)]
    for scene in drawn:
        assert scenes.parse_caption(scene.caption) == scene
    shapes = [s for scene in drawn for s in scene.shapes]
    assert {s.shape for s in shapes} == set(scenes.SHAPES)
    assert {s.colour for s in shapes} == set(scenes.COLOURS)
    assert {s.size for s in shapes} == set(scenes.SIZES)
    assert {scene.layout for scene in drawn} == set(scenes.LAYOUTS)
    assert {scene.background for scene in drawn} == set(scenes.BACKGROUNDS)


def test_a_scene_is_a_pure_function_of_seed_and_index():
    a, b = scenes.sample(11, seed=5), scenes.sample(11, seed=5)
    assert a[0] == b[0] and a[1].tobytes() == b[1].tobytes()
    others = {scenes.sample(11, seed=s)[1].tobytes() for s in range(6)}
    assert len(others) == 6


def colour_centroid(image, colour):
    """Mean (x, y) of the pixels within 10 of an exact shape colour (the antialiased rim excluded)."""
    pixels = np.asarray(image).astype(int)
    mask = np.abs(pixels - np.array(colour)).max(axis=-1) <= 10
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean(), mask.sum()


def test_pixels_show_what_the_caption_says():
    checked = 0
    for index in range(300):
        scene, image = scenes.sample(index, seed=1)
        first = scene.shapes[0]
        x, y, area = colour_centroid(image, scenes.COLOURS[first.colour])
        if len(scene.shapes) == 1:
            anchor_x, anchor_y = scenes.POSITIONS[scene.layout]
            assert abs(x - anchor_x * 64) <= 6 and abs(y - anchor_y * 64) <= 6, scene.caption
            assert (area > 200) == (first.size == "large"), (scene.caption, area)
            checked += 1
        elif first.colour != scene.shapes[1].colour:
            x2, y2, _ = colour_centroid(image, scenes.COLOURS[scene.shapes[1].colour])
            assert (y < y2 - 10) if scene.layout == "above" else (x < x2 - 10), scene.caption
            checked += 1
    assert checked > 200


@pytest.mark.parametrize(
    "caption",
    ["a red circle on the left on a grey background", "a large red circle on the left", "a photo of a cat",
     "a large red circle above on a grey background", "a large red circle on the left a small blue square on a "
     "grey background", "a huge red circle on the left on a grey background"],
)
def test_parse_caption_rejects_what_is_not_a_world_caption(caption):
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        scenes.parse_caption(caption)


def test_write_folder_writes_pairs_and_keeps_existing_files(tmp_path):
    folder = scenes.write_folder(tmp_path / "w", 5, seed=2)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([f"{i:06d}.{ext}" for i in range(5) for ext in ("png", "txt")] + ["metadata.jsonl"])
    assert (folder / "000003.txt").read_text().strip() == scenes.sample(3, seed=2)[0].caption
    (folder / "000001.png").write_bytes(b"kept")
    scenes.write_folder(folder, 6, seed=2)
    assert (folder / "000001.png").read_bytes() == b"kept" and (folder / "000005.png").is_file()
    scenes.write_folder(folder, 2, seed=2)  # a smaller run in the same folder reads as 2 pairs
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": f"{i:06d}.png", "text": scenes.sample(i, seed=2)[0].caption} for i in range(2)]


def test_sample_batch_is_the_per_index_samples_stacked_with_or_without_workers():
    images, drawn = scenes.sample_batch(1000, seed=4)
    assert images.dtype == torch.uint8 and images.shape == (1000, 3, scenes.SIZE, scenes.SIZE)
    for index in (0, 1, 517, 999):
        scene, image = scenes.sample(index, seed=4)
        assert drawn[index] == scene
        assert np.array_equal(images[index].permute(1, 2, 0).numpy(), np.asarray(image))
    forked, forked_scenes = scenes.sample_batch(1000, seed=4, processes=2)
    assert torch.equal(forked, images) and forked_scenes == drawn


def folder_digest(folder):
    """sha256 of a world folder's metadata.jsonl and every image's decoded pixels (PNG-encoder independent)."""
    from PIL import Image

    digest = hashlib.sha256((folder / "metadata.jsonl").read_bytes())
    for png in sorted(folder.glob("*.png")):
        digest.update(np.asarray(Image.open(png)).tobytes())
    return digest.hexdigest()


def test_shapes_world_folder_is_unchanged_by_the_diverse_option(tmp_path):
    # the digest of write_folder(..., 40) before the diverse world existed (commit 04fea40)
    folder = scenes.write_folder(tmp_path / "w", 40)
    assert folder_digest(folder) == SHAPES_40_DIGEST
    assert folder_digest(scenes.write_folder(tmp_path / "s", 40, world="shapes")) == SHAPES_40_DIGEST


def test_diverse_captions_under_specify_the_same_images_and_parse_back():
    drawn = [(scenes.sample(i, seed=0)[0], scenes.caption_of(scenes.sample(i, seed=0)[0], i, 0, "diverse"))
             for i in range(2000)]
    granularities = Counter()
    for scene, caption in drawn:
        partial = scenes.parse_partial(caption)
        assert len(partial.shapes) == len(scene.shapes), caption
        named = [partial.background, partial.layout] + [v for s in partial.shapes for v in (s.shape, s.colour, s.size)]
        truth = [scene.background, scene.layout] + [v for s in scene.shapes for v in (s.shape, s.colour, s.size)]
        assert all(n in (None, t) for n, t in zip(named, truth)), caption  # what it names is what the image shows
        granularities[sum(n is not None for n in named)] += 1
    captions = Counter(caption for _, caption in drawn)
    assert {"a shape", "two shapes", "a red shape"} <= set(captions)
    assert captions["two shapes"] > 100 and len(captions) < len(drawn) / 1.5  # many images fit one caption
    assert set(granularities) == set(range(9)) and max(granularities.values()) < 0.3 * len(drawn)
    assert sum(c != scene.caption for scene, c in drawn) > 0.9 * len(drawn)


def test_diverse_folder_has_the_shapes_images_and_a_caption_that_fits_each(tmp_path):
    shapes = scenes.write_folder(tmp_path / "s", 12, seed=3)
    diverse = scenes.write_folder(tmp_path / "d", 12, seed=3, world="diverse")
    for i in range(12):
        assert (shapes / f"{i:06d}.png").read_bytes() == (diverse / f"{i:06d}.png").read_bytes()
        caption = scenes.sample_caption(diverse, i)
        assert caption == scenes.caption_of(scenes.sample(i, 3)[0], i, 3, "diverse")
    with pytest.raises(ValueError, match="world must be one of shapes, diverse"):
        scenes.write_folder(tmp_path / "x", 2, world="vague")
    assert not (tmp_path / "x").exists()


def test_parse_partial_reads_full_captions_as_parse_caption_and_names_nothing_else():
    for index in range(300):
        scene = scenes.sample(index, seed=5)[0]
        assert scenes.parse_partial(scene.caption) == scenes.parse_caption(scene.caption) == scene
    blank = scenes.Shape(None, None, None)
    assert scenes.parse_partial("a shape") == scenes.Scene(None, None, (blank,))
    assert scenes.parse_partial("two shapes on a black background") == scenes.Scene("black", None, (blank, blank))
    assert scenes.parse_partial("a large circle in the center") == scenes.Scene(
        None, "in the center", (scenes.Shape("circle", None, "large"),))
    assert scenes.parse_partial("a red shape above a small shape on a white background") == scenes.Scene(
        "white", "above", (scenes.Shape(None, "red", None), scenes.Shape(None, None, "small")))
    for bad in ("a photo of a cat", "a red large circle", "a shape on a pink background", "three shapes", "shape"):
        with pytest.raises(ValueError, match="not a shapes-world caption"):
            scenes.parse_partial(bad)
