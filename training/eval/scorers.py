"""The networks behind FID, CLIP score and PRDC, loaded from local files only (nothing is downloaded).

- Inception: pytorch-fid's port of the TensorFlow FID Inception-v3 (2015-12-05 graph), 2048-d pool3 features,
  weights from `pt_inception-2015-12-05-6726825d.pth`; each image is first resized to 299 px as clean-fid does
  (PIL bicubic on each channel in float, no quantisation: Parmar et al. 2022).
- CLIP: a transformers CLIPModel + CLIPProcessor folder; score = max(mean over images of 100 cos(image, caption), 0)
  as torchmetrics' CLIPScore computes it (with a trained CLIP every cosine is positive, so this is also the mean of
  the per-image max(100 cos, 0) of Hessel et al. 2021).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import UserError

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SOURCE = "the pytorch-fid project's GitHub releases (release 'fid_weights')"
CLIP_SOURCE = (
    "the OpenAI CLIP ViT-L/14 release (openai/clip-vit-large-patch14 on the Hugging Face hub, the model torchmetrics' "
    "CLIPScore defaults to), saved with transformers' save_pretrained"
)
INCEPTION_SIZE = 299


def check_inception_file(path):
    """Raise a one-line UserError unless pytorch-fid is installed and `path` is a file (the FID Inception weights)."""
    require_pytorch_fid()
    if path is None or not Path(path).is_file():
        raise UserError(
            f"--inception: no file at {path}; put {INCEPTION_FILE} (the FID Inception-v3 weights, usually taken "
            f"from {INCEPTION_SOURCE}) there or pass its path"
        )


def check_clip_folder(path):
    """Raise a one-line UserError unless `path` is a folder with a model config, a processor config and weights."""
    folder = Path(str(path))
    needs = {
        "config.json": ["config.json"],
        "preprocessor_config.json": ["preprocessor_config.json", "processor_config.json"],
        "weights (*.safetensors)": ["*.safetensors", "pytorch_model*.bin"],
    }
    missing = [what for what, patterns in needs.items() if not any(any(folder.glob(p)) for p in patterns)]
    if path is None or not folder.is_dir() or missing:
        what = "folder" if not folder.is_dir() else ", ".join(missing)
        raise UserError(
            f"--clip: no CLIP model at {path} (missing {what}); put a CLIP folder there (config.json, "
            f"preprocessor_config.json, tokenizer files, model.safetensors), usually {CLIP_SOURCE}, or pass its path"
        )


def require_pytorch_fid():
    """pytorch_fid.inception, or a one-line UserError saying how to install it."""
    try:
        from pytorch_fid import inception
    except ImportError:
        raise UserError("FID needs the pytorch-fid package: pip install pytorch-fid (or this package's [eval] "
                        "extra)") from None
    return inception


def fid_inception_v3():
    """The FID Inception-v3 architecture with random weights: torchvision's Inception with pytorch-fid's FID blocks."""
    from torchvision.models import inception_v3

    fid = require_pytorch_fid()

    net = inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    return net


class InceptionPool(nn.Module):
    """(N, 3, 299, 299) pixels in [0, 255] -> (N, 2048) pool3 features, as pytorch-fid's InceptionV3 block 3."""

    def __init__(self, net):
        super().__init__()
        names = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")
        self.layers = nn.Sequential(*(getattr(net, name) for name in names))

    def forward(self, pixels):
        return self.layers(pixels / 255 * 2 - 1).flatten(1)


def load_inception(path):
    """InceptionPool (eval mode) with the weights of the local file `path`; a UserError for a wrong file."""
    check_inception_file(path)
    net = fid_inception_v3()
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as error:  # noqa: BLE001 - any failure means "not the FID Inception weights"
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--inception {path} is not the FID Inception-v3 state dict ({INCEPTION_FILE} from "
            f"{INCEPTION_SOURCE}): {first}"
        ) from None
    return InceptionPool(net).eval().requires_grad_(False)


def clean_resize(image, size=None):
    """uint8 HWC RGB -> float32 (size, size, 3) in [0, 255] (size None: 299): clean-fid's PIL bicubic resize per
    channel in float."""
    size = size or INCEPTION_SIZE
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    channels = [
        np.asarray(Image.fromarray(pixels[:, :, c].astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, axis=2).clip(0, 255).astype(np.float32)


@torch.no_grad()
def inception_features(net, images, device="cpu", batch_size=50):
    """(N, 2048) float64 pool3 features of PIL images (clean-fid resize to 299 px first)."""
    net = net.to(device)
    feats = []
    for start in range(0, len(images), batch_size):
        batch = np.stack([clean_resize(image) for image in images[start : start + batch_size]])
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
        feats.append(net(pixels).double().cpu())
    return torch.cat(feats)


def load_clip(path):
    """(CLIPModel in eval mode, CLIPProcessor) from a local folder; a UserError for a folder that is not one."""
    from transformers import CLIPModel, CLIPProcessor

    check_clip_folder(path)
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not a usable CLIP folder"
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"--clip {path} is not a transformers CLIP model folder: {first}") from None
    return model.eval().requires_grad_(False), processor


@torch.no_grad()
def clip_embeddings(model, processor, images, captions, device="cpu"):
    """Unit-norm projected (image, caption) embeddings of one batch; captions truncated to CLIP's 77 tokens."""
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
    tokens = processor(text=captions, return_tensors="pt", padding=True, truncation=True,
                       max_length=model.config.text_config.max_position_embeddings)
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    text_out = model.text_model(input_ids=tokens["input_ids"].to(device),
                                attention_mask=tokens["attention_mask"].to(device))
    text = model.text_projection(text_out.pooler_output)
    return nn.functional.normalize(image.double(), dim=-1), nn.functional.normalize(text.double(), dim=-1)


def clip_cosines(model, processor, images, captions, device="cpu", batch_size=50):
    """Per-image 100 * cos(E_image, E_caption), float64 (N,)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    model = model.to(device)
    scores = []
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        image, text = clip_embeddings(model, processor, images[start:stop], captions[start:stop], device)
        scores.append((100 * (image * text).sum(-1)).cpu())
    return torch.cat(scores)


def clip_score(model, processor, images, captions, device="cpu", batch_size=50):
    """CLIP score max(mean 100 cos(E_image, E_caption), 0), computed as torchmetrics' CLIPScore computes it."""
    return max(clip_cosines(model, processor, images, captions, device, batch_size).mean().item(), 0.0)
