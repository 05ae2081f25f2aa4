"""Set metrics of the shapes world: Frechet distance and PRDC (the product's training.eval.metrics, re-exported) over
classifier features, and prompt accuracy, which compares predicted attributes with the ones a caption names (a
CLIP-score analog).
"""

import torch

from training.data import scenes
from training.eval.metrics import frechet_distance, frechet_gaussians, knn_radii, mean_cov, prdc, sqrtm_psd  # noqa: F401

from .classifier import HEADS, allowed_mask


def as_predictions(logits_or_predictions):
    """(N, heads) class indices from a {head: (N, C) logits} dict or an (N, heads) index tensor."""
    if isinstance(logits_or_predictions, dict):
        return torch.stack([logits_or_predictions[name].argmax(-1) for name in HEADS], dim=1)
    return torch.as_tensor(logits_or_predictions, dtype=torch.long)


def prompt_accuracy(logits_or_predictions, captions):
    """{prompt_acc: mean accuracy over the attributes the captions name, exact_match: rate of every named one right,
    acc_<head>: per head, over the captions that name it}. A full world caption names all 8 heads; a diverse one
    fewer (scenes.parse_partial; classifier.allowed): a head is checked where the caption rules out some class."""
    preds = as_predictions(logits_or_predictions)
    mask = allowed_mask([scenes.parse_partial(caption) for caption in captions])
    if preds.shape != mask.shape[:2]:
        raise ValueError(f"predictions of shape {tuple(preds.shape)} for {len(captions)} captions "
                         f"(expected {tuple(mask.shape[:2])})")
    right = mask.gather(2, preds.clamp(0, mask.shape[2] - 1)[..., None])[..., 0]
    checked = mask.sum(2) < torch.tensor(list(HEADS.values()))
    per_head = {f"acc_{name}": right[checked[:, i], i].double().mean().item()
                for i, name in enumerate(HEADS) if checked[:, i].any()}
    return {"prompt_acc": right[checked].double().mean().item(),
            "exact_match": (right | ~checked).all(1).double().mean().item(), **per_head}
