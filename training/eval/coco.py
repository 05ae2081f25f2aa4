"""The paper's evaluation protocol, `--protocol coco2017-5k`, from a local COCO-2017 validation set.

MSCOCO-2017 5K: the 5,000 images of COCO-2017 val (`val2017/`) and their captions file
(`annotations/captions_val2017.json`, from the COCO 2017 "Train/Val annotations" archive). Each image gives one
prompt, its first caption (lowest annotation id), in image-id order; image i of every generated set uses caption i
and seed + i; generation is at 512 px; FID, PRDC and the CLIP score compare the 5,000 generated images with the
5,000 real ones, each real image center-cropped to a square and resized to 512 px before the clean-fid resize to
299 px that the generated images also go through.
"""

import json
from pathlib import Path

from ..errors import UserError

PROTOCOLS = ("coco2017-5k",)
COCO_N = 5000
COCO_RESOLUTION = 512


def first_captions(annotations):
    """{image_id: caption} with each image's lowest-id caption, whitespace collapsed."""
    captions = {}
    for ann in sorted(annotations, key=lambda a: a["id"]):
        captions.setdefault(ann["image_id"], " ".join(str(ann["caption"]).split()))
    return captions


def read_captions_file(path):
    """The parsed captions JSON; a one-line UserError if it is missing or not a COCO captions file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--captions {path} does not exist; pass COCO-2017's annotations/captions_val2017.json "
                        "(from the COCO 2017 Train/Val annotations archive)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["images"], data["annotations"]  # noqa: B018 - the two keys a COCO captions file has
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"--captions {path} is not a COCO captions file (JSON with 'images' and "
                        "'annotations')") from None
    return data


def coco_pairs(images_folder, captions_file, n=COCO_N):
    """(prompts, real image paths) of the first n COCO images by id, one caption each; UserError on a gap."""
    data = read_captions_file(captions_file)
    captions = first_captions(data["annotations"])
    images = sorted(data["images"], key=lambda image: image["id"])[:n]
    if len(images) < n:
        raise UserError(f"--captions {captions_file} lists {len(images)} images, fewer than the {n} asked for")
    folder = Path(images_folder)
    paths = [folder / image["file_name"] for image in images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"--real {folder} lacks {len(missing)} of the captioned images (first: {missing[0].name}); "
                        "pass COCO-2017's val2017 folder")
    uncaptioned = [image["file_name"] for image in images if image["id"] not in captions]
    if uncaptioned:
        raise UserError(f"--captions {captions_file} has no caption for {uncaptioned[0]}")
    return [captions[image["id"]] for image in images], paths
