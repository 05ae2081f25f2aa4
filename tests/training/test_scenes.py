"""The shapes world: deterministic scenes whose captions say what the pixels show."""

import json

import numpy as np
import pytest
import torch

from training.world import scenes


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
