"""Score a folder of generated shapes-world images (+ same-name .txt captions) against real world images.

A small classifier trained on the world (experiments/world/classifier.py, weights in
experiments/world/assets/demo_classifier.safetensors) gives:

- fd: the Frechet distance between its 128-d penultimate features on the generated and the real set (FID analog);
- prompt_acc / exact_match: its predicted attributes vs the caption of each generated image, per attribute and
  all-attributes-right (CLIP-score analog);
- precision, recall, density, coverage: Naeem et al. 2020 on the same features (k = 5), the paper's diversity measure.

    python -m experiments.world.evaluate score FAKE_FOLDER [--real REAL_FOLDER] [--json out.json]
    python -m experiments.world.evaluate train-classifier --out experiments/world/assets/demo_classifier.safetensors

Without --real, 1000 real images are rendered in memory from world seed 7 (the report's evaluation seed).

Real FID / CLIP score: `python -m training.evaluate` (the product's evaluator, local Inception and CLIP weights)
computes them for any LoRA, with the same Frechet / PRDC code (training.eval.metrics). 64 px shapes are far from
ImageNet, so the world's own classifier is the primary measure here and real FID/CLIP a cross-check only.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from training.data import scenes

from . import classifier, metrics

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REAL_SEED = 7
REAL_COUNT = 1000


def image_files(folder):
    """The sorted image files of `folder`; ValueError if it is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: pass a folder of images with same-name .txt captions")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}: pass a folder of images with "
                         "same-name .txt captions (e.g. one written by training.data.scenes.write_folder)")
    return files


def read_captions(files):
    """The caption beside each image (same name, .txt), each checked to be a shapes-world caption."""
    missing = [f.name for f in files if not f.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(f"{len(missing)} image(s) in {files[0].parent} have no same-name .txt caption "
                         f"(first: {missing[0]}): write each image's prompt next to it as NAME.txt")
    captions = [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in files]
    for file, caption in zip(files, captions):
        try:
            scenes.parse_partial(caption)
        except ValueError:
            raise ValueError(f"{file.with_suffix('.txt')} holds {caption!r}, not a shapes-world caption: the "
                             "evaluator only scores shapes-world prompts such as 'a large red circle on the left "
                             "on a grey background'") from None
    return captions


def read_images(files):
    """(N, 3, 64, 64) float in [-1, 1] from image files (RGB, resized to 64 px if needed)."""
    size = (scenes.SIZE, scenes.SIZE)
    images = []
    for file in files:
        with Image.open(file) as image:
            image = image.convert("RGB")
            images.append(image if image.size == size else image.resize(size, Image.Resampling.BICUBIC))
    return classifier.to_tensor(images)


def read_folder(folder, captions=True):
    """Images of a folder as a [-1, 1] tensor, and their captions (None when `captions` is False)."""
    files = image_files(folder)
    return read_images(files), (read_captions(files) if captions else None)


def real_images(count=REAL_COUNT, seed=REAL_SEED):
    """`count` real world images of world `seed`, rendered in memory, as a [-1, 1] tensor."""
    return scenes.sample_batch(count, seed)[0].float() / 127.5 - 1


def score(model, fake, captions, real, k=5):
    """All metrics of a fake [-1, 1] batch with captions against a real batch."""
    preds, fake_feats = classifier.predict(model, fake)
    _, real_feats = classifier.predict(model, real)
    out = {"fd": metrics.frechet_distance(fake_feats, real_feats)}
    out.update(metrics.prompt_accuracy(preds, captions))
    out.update(metrics.prdc(real_feats, fake_feats, k=k))
    return {**out, "n": fake.shape[0], "n_real": real.shape[0]}


def evaluate_folder(fake_folder, real_folder=None, model=None, k=5, n_real=REAL_COUNT):
    """{fd, prompt_acc, exact_match, precision, recall, density, coverage, n, ...} of a folder vs real images."""
    model = model or classifier.load_classifier()
    fake, captions = read_folder(fake_folder)
    real = real_images(n_real) if real_folder is None else read_folder(real_folder, captions=False)[0]
    return score(model, fake, captions, real, k=k)


def train_main(args):
    """Train the classifier, print held-out per-head accuracy, save the weights."""
    torch.set_num_threads(args.threads)
    start = time.time()
    model = classifier.train_classifier(args.steps, args.seed, args.batch_size, args.n_images)
    print(f"trained in {time.time() - start:.0f}s")
    images, target = classifier.render(args.held_out, classifier.HELD_OUT_SEED)
    accuracy = classifier.head_accuracy(model, images, target)
    for name, value in accuracy.items():
        print(f"  {name:<10} {value:.4f}")
    print(f"mean held-out accuracy {sum(accuracy.values()) / len(accuracy):.4f}")
    print(f"saved {classifier.save_classifier(model, args.out)}")


def score_main(args):
    """Score a folder and print (and optionally write) the metrics."""
    torch.set_num_threads(args.threads)
    model = classifier.load_classifier(args.classifier)
    result = evaluate_folder(args.fake, args.real, model=model, k=args.k, n_real=args.n_real)
    for name, value in result.items():
        print(f"{name:<14} {value:.4f}" if isinstance(value, float) else f"{name:<14} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def parser():
    """The CLI: `score` and `train-classifier`."""
    p = argparse.ArgumentParser(prog="python -m experiments.world.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score a folder of generated images + captions")
    s.add_argument("fake", help="folder of generated images with same-name .txt captions")
    s.add_argument("--real", default=None, help="folder of real world images (default: render --n-real in memory)")
    s.add_argument("--n-real", type=int, default=REAL_COUNT, help="real images rendered when --real is omitted")
    s.add_argument("--k", type=int, default=5, help="nearest neighbours for precision/recall/density/coverage")
    s.add_argument("--classifier", default=classifier.DEFAULT_PATH, help="classifier weights (.safetensors)")
    s.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    s.set_defaults(run=score_main)
    t = sub.add_parser("train-classifier", help="train the evaluator's classifier on rendered world images")
    t.add_argument("--out", default=classifier.DEFAULT_PATH, help="where to write the weights (.safetensors)")
    t.add_argument("--steps", type=int, default=1500, help="AdamW steps")
    t.add_argument("--batch-size", type=int, default=128, help="images per step")
    t.add_argument("--n-images", type=int, default=20000, help="pre-rendered training images")
    t.add_argument("--seed", type=int, default=0, help="training seed (world seed 1000 + seed)")
    t.add_argument("--held-out", type=int, default=2000, help="held-out images for the accuracy printout")
    t.set_defaults(run=train_main)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
