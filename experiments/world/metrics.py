"""Set metrics of the shapes world: Frechet distance and PRDC (the product's training.metrics, re-exported) over
classifier features, and prompt accuracy, which compares predicted attributes with the ones a caption names (a
CLIP-score analog).
"""

import torch

from training.metrics import frechet_distance, frechet_gaussians, knn_radii, mean_cov, prdc, sqrtm_psd  # noqa: F401
from training.world import scenes

from .classifier import HEADS, label_tensor


def as_predictions(logits_or_predictions):
    """(N, heads) class indices from a {head: (N, C) logits} dict or an (N, heads) index tensor."""
    if isinstance(logits_or_predictions, dict):
        return torch.stack([logits_or_predictions[name].argmax(-1) for name in HEADS], dim=1)
    return torch.as_tensor(logits_or_predictions, dtype=torch.long)


def prompt_accuracy(logits_or_predictions, captions):
    """{prompt_acc: mean per-attribute accuracy vs the captions, exact_match: rate of all heads right, per head}."""
    preds = as_predictions(logits_or_predictions)
    target = label_tensor([scenes.parse_caption(caption) for caption in captions])
    if preds.shape != target.shape:
        raise ValueError(f"predictions of shape {tuple(preds.shape)} for {len(captions)} captions "
                         f"(expected {tuple(target.shape)})")
    right = preds == target
    per_head = {f"acc_{name}": right[:, i].double().mean().item() for i, name in enumerate(HEADS)}
    return {"prompt_acc": right.double().mean().item(), "exact_match": right.all(1).double().mean().item(), **per_head}
