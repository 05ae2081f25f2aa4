"""The shapes world: captioned 64 px scenes of one or two coloured shapes, drawn deterministically from a seed.

A scene is one shape at a position ("a large red circle on the left on a grey background") or two shapes in a
relation ("a small blue square above a large yellow triangle on a white background"). Relations are only "above"
and "left of", so the first shape named is always the top (or left) one: every attribute of a caption can be read
back from the image alone, which is what the evaluator's classifier does.

The diverse world (`world="diverse"`) has the same images with captions that under-specify them: each attribute is
named or left out at random ("a shape on a white background", "a red shape", "a large circle in the center", "two
shapes", "a red shape above a small circle"), so many images fit one caption. `parse_partial` reads both kinds of
caption back, with None for every attribute a caption leaves out.
"""

import json
import multiprocessing
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .synth import save_pair

SIZE = 64
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 35),
    "purple": (140, 55, 185),
}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (238, 238, 238), "black": (22, 22, 22)}
SIZES = {"small": 7.0, "large": 12.0}  # half-width in pixels at 64 px
POSITIONS = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
RELATIONS = {"above": ((0.5, 0.27), (0.5, 0.73)), "left of": ((0.27, 0.5), (0.73, 0.5))}
JITTER = 0.06  # of the image size, uniform in each axis
LAYOUTS = tuple(POSITIONS) + tuple(RELATIONS)
WORLDS = ("shapes", "diverse")
NAMED = 0.5  # the diverse world names each attribute (background, position, shape, colour, size) with this chance
DIVERSE_SALT = 10**12  # the diverse caption's rng is apart from the scene's, so its images are the shapes world's


@dataclass(frozen=True)
class Shape:
    """One shape's attributes."""

    shape: str
    colour: str
    size: str

    def words(self):
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A background, a layout (a position for one shape, a relation for two) and the shapes, top/left first."""

    background: str
    layout: str
    shapes: tuple

    @property
    def caption(self):
        first = self.shapes[0].words()
        where = f"{first} {self.layout}" if len(self.shapes) == 1 else f"{first} {self.layout} {self.shapes[1].words()}"
        return f"{where} on a {self.background} background"


def random_scene(rng):
    """A scene drawn from `rng` (random.Random): one shape or two with equal probability."""

    def shape():
        return Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))

    background = rng.choice(list(BACKGROUNDS))
    if rng.random() < 0.5:
        return Scene(background, rng.choice(list(POSITIONS)), (shape(),))
    return Scene(background, rng.choice(list(RELATIONS)), (shape(), shape()))


def parse_caption(caption):
    """The Scene a caption describes (the inverse of Scene.caption); ValueError if it is not a world caption."""
    text = caption.strip()
    body, sep, background = text.rpartition(" on a ")
    background = background.removesuffix(" background")
    if not sep or background not in BACKGROUNDS:
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    for layout in LAYOUTS:
        first, found, rest = body.partition(f" {layout}")
        if found and (layout in POSITIONS) == (rest == ""):
            shapes = (_parse_shape(first, caption),)
            if rest:
                shapes += (_parse_shape(rest.strip(), caption),)
            return Scene(background, layout, shapes)
    raise ValueError(f"not a shapes-world caption: {caption!r}")


def _parse_shape(words, caption):
    parts = words.split()
    if len(parts) != 4 or parts[0] != "a" or parts[1] not in SIZES or parts[2] not in COLOURS or parts[3] not in SHAPES:
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    return Shape(parts[3], parts[2], parts[1])


def diverse_caption(scene, rng):
    """A caption that names each attribute of `scene` with chance NAMED (a two-shape scene: "two shapes" or both
    shapes in their relation); the number of shapes is always said."""

    def named(value):
        return value if rng.random() < NAMED else None

    def words(shape):
        parts = ["a", named(shape.size), named(shape.colour), named(shape.shape) or "shape"]
        return " ".join(p for p in parts if p)

    if len(scene.shapes) == 1:
        body = " ".join(p for p in (words(scene.shapes[0]), named(scene.layout)) if p)
    elif rng.random() < NAMED:
        body = f"{words(scene.shapes[0])} {scene.layout} {words(scene.shapes[1])}"
    else:
        body = "two shapes"
    background = named(scene.background)
    return f"{body} on a {background} background" if background else body


def parse_partial(caption):
    """The Scene a shapes-world or diverse-world caption describes, None for what it leaves out (a "two shapes"
    caption: layout None and two blank shapes); ValueError if it is neither."""
    body, sep, background = caption.strip().rpartition(" on a ")
    if sep and background.endswith(" background"):
        background = background.removesuffix(" background")
        if background not in BACKGROUNDS:
            raise ValueError(f"not a shapes-world caption: {caption!r}")
    else:
        body, background = caption.strip(), None
    if body == "two shapes":
        return Scene(background, None, (Shape(None, None, None), Shape(None, None, None)))
    for relation in RELATIONS:
        first, found, second = body.partition(f" {relation} ")
        if found:
            return Scene(background, relation, (_partial_shape(first, caption), _partial_shape(second, caption)))
    for position in POSITIONS:
        if body.endswith(f" {position}"):
            return Scene(background, position, (_partial_shape(body.removesuffix(f" {position}"), caption),))
    return Scene(background, None, (_partial_shape(body, caption),))


def _partial_shape(words, caption):
    """'a [size] [colour] shape|circle|...' -> Shape with None for what is left out."""
    parts = words.split()
    if len(parts) < 2 or parts[0] != "a" or parts[-1] not in (*SHAPES, "shape"):
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    middle = parts[1:-1]
    size = middle.pop(0) if middle and middle[0] in SIZES else None
    colour = middle.pop(0) if middle and middle[0] in COLOURS else None
    if middle:
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    return Shape(None if parts[-1] == "shape" else parts[-1], colour, size)


def centres(scene, rng):
    """Pixel centres of the scene's shapes: the layout's anchor points plus uniform jitter from `rng`."""
    anchors = [POSITIONS[scene.layout]] if scene.layout in POSITIONS else list(RELATIONS[scene.layout])
    return [((x + rng.uniform(-JITTER, JITTER)) * SIZE, (y + rng.uniform(-JITTER, JITTER)) * SIZE) for x, y in anchors]


def render(scene, rng):
    """The scene as a SIZE x SIZE RGB PIL image (drawn at 4x, then downsampled: antialiased edges)."""
    scale = SUPERSAMPLE
    image = Image.new("RGB", (SIZE * scale, SIZE * scale), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape, (x, y) in zip(scene.shapes, centres(scene, rng)):
        r = SIZES[shape.size] * scale
        x, y = x * scale, y * scale
        fill = COLOURS[shape.colour]
        if shape.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape.shape == "square":
            draw.rectangle((x - r * 0.9, y - r * 0.9, x + r * 0.9, y + r * 0.9), fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r * 1.05, y + r * 0.8), (x + r * 1.05, y + r * 0.8)], fill=fill)
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


def _rng(index, seed):
    return random.Random(seed * 1_000_003 + index)


def sample(index, seed=0):
    """Scene and image number `index` of the world with `seed`: a pure function of (seed, index)."""
    rng = _rng(index, seed)
    scene = random_scene(rng)
    return scene, render(scene, rng)


def caption_at(index, seed=0, world="shapes"):
    """Image `index`'s caption in `world` with `seed`, without rendering the image (sample's scene, caption_of's
    words)."""
    return caption_of(random_scene(_rng(index, seed)), index, seed, world)


def check_world(world):
    """`world` if it is one of WORLDS, else a ValueError naming them."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}, got {world!r}")
    return world


def caption_of(scene, index, seed=0, world="shapes"):
    """Image `index`'s caption in `world`: the full caption, or the diverse world's (a pure function of seed, index)."""
    if check_world(world) == "shapes":
        return scene.caption
    return diverse_caption(scene, random.Random(DIVERSE_SALT + seed * 1_000_003 + index))


def _sample_array(job):
    scene, image = sample(*job)
    return scene, np.asarray(image, dtype=np.uint8)


def sample_batch(count, seed=0, processes=1):
    """Images 0..count-1 of the world with `seed` as a uint8 [N, 3, SIZE, SIZE] tensor, and their Scenes
    (drawn by `processes` forked workers when there are 1000 or more)."""
    jobs = [(index, seed) for index in range(count)]
    if processes > 1 and count >= 1000:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            rows = pool.map(_sample_array, jobs, chunksize=500)
    else:
        rows = [_sample_array(job) for job in jobs]
    images = torch.from_numpy(np.stack([pixels for _, pixels in rows])).permute(0, 3, 1, 2).contiguous()
    return images, [scene for scene, _ in rows]


def write_folder(folder, count, seed=0, world="shapes"):
    """Write images 0..count-1 of `world` ("shapes" or "diverse": the same images, vaguer captions) as
    NNNNNN.png + NNNNNN.txt (skipping existing ones) and a metadata.jsonl naming exactly those `count` pairs, so a
    folder left from a larger run still reads as `count` pairs."""
    folder = Path(folder)
    check_world(world)  # before any file is written
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        png = folder / f"{index:06d}.png"
        if png.is_file():
            continue
        scene, image = sample(index, seed)
        save_pair(folder, f"{index:06d}", caption_of(scene, index, seed, world), image)
    rows = [{"file_name": f"{i:06d}.png", "text": sample_caption(folder, i)} for i in range(count)]
    tmp = folder / f"metadata.jsonl.{os.getpid()}.tmp"  # its own name: two processes may write one folder at once
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(folder / "metadata.jsonl")
    return folder


def sample_caption(folder, index):
    return (Path(folder) / f"{index:06d}.txt").read_text(encoding="utf-8").strip()
