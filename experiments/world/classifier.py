"""The evaluator's classifier: a small CNN that reads every caption attribute of a shapes-world image back.

`labels(scene)` maps a scene to one class index per head (HEADS); `Classifier` has one linear head per attribute
on a 128-d penultimate feature (`features(x)`, the FID-analog's embedding); `train_classifier` fits it on freshly
rendered world images with blur/noise augmentation so that slightly imperfect generated images still read right.
"""

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from training.data import scenes

DEFAULT_PATH = Path(__file__).resolve().parent / "assets" / "demo_classifier.safetensors"
NONE = "none"
CLASSES = {
    "background": tuple(scenes.BACKGROUNDS),
    "layout": scenes.LAYOUTS,
    "shape_a": scenes.SHAPES,
    "colour_a": tuple(scenes.COLOURS),
    "size_a": tuple(scenes.SIZES),
    "shape_b": (NONE, *scenes.SHAPES),
    "colour_b": (NONE, *scenes.COLOURS),
    "size_b": (NONE, *scenes.SIZES),
}
HEADS = {name: len(values) for name, values in CLASSES.items()}
FEATURES = 128
TRAIN_SEED = 1000  # training images: world seed TRAIN_SEED + seed; held-out: HELD_OUT_SEED (evaluation uses 7)
HELD_OUT_SEED = 2000


def labels(scene):
    """{head: class index} for a Scene; the second shape's heads are "none" for a one-shape scene."""
    a = scene.shapes[0]
    b = scene.shapes[1] if len(scene.shapes) > 1 else scenes.Shape(NONE, NONE, NONE)
    values = {"background": scene.background, "layout": scene.layout, "shape_a": a.shape, "colour_a": a.colour,
              "size_a": a.size, "shape_b": b.shape, "colour_b": b.colour, "size_b": b.size}
    return {head: CLASSES[head].index(value) for head, value in values.items()}


def allowed(scene):
    """{head: class indices that fit} for a Scene from scenes.parse_partial: one index per attribute it names, every
    real value where it names none (a layout left out: any position for one shape, any relation for two)."""
    b = scene.shapes[1] if len(scene.shapes) > 1 else None
    layouts = scenes.POSITIONS if b is None else scenes.RELATIONS
    values = {"background": scene.background, "layout": scene.layout, "shape_a": scene.shapes[0].shape,
              "colour_a": scene.shapes[0].colour, "size_a": scene.shapes[0].size}
    values |= {"shape_b": NONE, "colour_b": NONE, "size_b": NONE} if b is None else {
        "shape_b": b.shape, "colour_b": b.colour, "size_b": b.size}
    fits = {head: [CLASSES[head].index(v)] if v is not None else
            [i for i, c in enumerate(CLASSES[head]) if c != NONE] for head, v in values.items()}
    fits["layout"] = fits["layout"] if scene.layout is not None else [scenes.LAYOUTS.index(x) for x in layouts]
    return fits


def allowed_mask(scene_list):
    """(N, len(HEADS), max classes) bool: True where a head's class fits the scene (see `allowed`)."""
    mask = torch.zeros(len(scene_list), len(HEADS), max(HEADS.values()), dtype=torch.bool)
    for n, scene in enumerate(scene_list):
        for h, fits in enumerate(allowed(scene).values()):
            mask[n, h, fits] = True
    return mask


def label_tensor(scene_list):
    """(N, len(HEADS)) long tensor of labels, columns in HEADS order."""
    return torch.tensor([list(labels(scene).values()) for scene in scene_list], dtype=torch.long)


def to_tensor(images):
    """PIL RGB images (or uint8 HWC arrays) -> (N, 3, H, W) float in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.uint8)[..., :3] for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def render(count, seed):
    """Images 0..count-1 of world `seed` as a uint8 (N, 3, 64, 64) tensor and their (N, heads) labels."""
    images, drawn = scenes.sample_batch(count, seed)
    return images, label_tensor(drawn)


def conv(c_in, c_out, stride):
    """3x3 conv -> batch norm -> ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Classifier(nn.Module):
    """64x64 RGB in [-1, 1] -> {head: logits}; `features` is the 128-d penultimate embedding."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv(3, 32, 2), conv(32, 64, 2), conv(64, 64, 2), conv(64, 64, 2))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, size) for name, size in HEADS.items()})

    def features(self, x):
        """The penultimate feature vector, (N, 128)."""
        if x.shape[-2:] != (scenes.SIZE, scenes.SIZE):
            x = F.interpolate(x, size=(scenes.SIZE, scenes.SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.embed(self.body(x))

    def forward(self, x):
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}


def blur(x, sigma):
    """Separable gaussian blur of a batch with one std `sigma` (pixels), reflect padding."""
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(x.shape[1], 1, 1, 1)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(-1, 1, 1, 2 * radius + 1), groups=x.shape[1])
    return F.conv2d(x, kernel.view(-1, 1, 2 * radius + 1, 1), groups=x.shape[1])


def augment(x, generator):
    """Light corruptions of a [-1, 1] batch: gaussian blur (std 0.3-1.2 px) on half, noise (std <= 0.08)."""
    if torch.rand((), generator=generator) < 0.5:
        x = blur(x, 0.3 + 0.9 * torch.rand((), generator=generator).item())
    scale = 0.08 * torch.rand(x.shape[0], 1, 1, 1, generator=generator)
    shift = 0.04 * torch.randn(x.shape[0], 3, 1, 1, generator=generator)
    return x + scale * torch.randn(x.shape, generator=generator) + shift


def loss_fn(logits, target):
    """Cross-entropy summed over heads."""
    return sum(F.cross_entropy(logits[name], target[:, i]) for i, name in enumerate(HEADS))


@torch.no_grad()
def predict(model, x, batch_size=256):
    """(N, heads) predicted class indices and (N, 128) features of a [-1, 1] batch, in eval mode."""
    model.eval()
    preds, feats = [], []
    for chunk in x.split(batch_size):
        f = model.features(chunk.float())
        feats.append(f)
        preds.append(torch.stack([model.heads[name](f).argmax(-1) for name in HEADS], dim=1))
    return torch.cat(preds), torch.cat(feats)


def head_accuracy(model, images_u8, target):
    """{head: accuracy} of the model on uint8 images with (N, heads) labels."""
    preds, _ = predict(model, images_u8.float() / 127.5 - 1)
    return {name: (preds[:, i] == target[:, i]).float().mean().item() for i, name in enumerate(HEADS)}


def train_classifier(steps=1500, seed=0, batch_size=128, n_images=20000, lr=3e-3, log=print):
    """A Classifier fit on `n_images` pre-rendered world images (seed TRAIN_SEED + seed), AdamW + cosine decay."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, target = render(n_images, TRAIN_SEED + seed)
    model = Classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    start = time.time()
    for step in range(steps):
        model.train()
        index = torch.randint(0, n_images, (batch_size,), generator=generator)
        loss = loss_fn(model(augment(images[index].float() / 127.5 - 1, generator)), target[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s")
    return model.eval()


def save_classifier(model, path):
    """Write the weights (fp32) as safetensors with the head layout in the metadata."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}
    save_file(state, str(path), metadata={"heads": ",".join(f"{n}:{s}" for n, s in HEADS.items())})
    return Path(path)


def load_classifier(path=DEFAULT_PATH):
    """The Classifier stored at `path` (default: the shipped demo weights), in eval mode on CPU."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no classifier weights at {path}: train them with "
                         f"`python -m experiments.world.evaluate train-classifier --out {path}`")
    model = Classifier()
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path} is not a shapes-world classifier (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}): retrain it with `python -m experiments.world.evaluate train-classifier`")
    return model.eval()
