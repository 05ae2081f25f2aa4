"""The discriminator: the UNet with the disc LoRA, its block features (up, or down + mid) pooled into a small head."""

import torch
from torch import nn


class DiscriminatorHead(nn.Module):
    """One logit per sample from the UNet's block features: mean-pool each block, concat, small MLP."""

    def __init__(self, channels, hidden=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(sum(channels), hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features):
        pooled = torch.cat([f.float().mean(dim=(2, 3)) for f in features], dim=1)
        return self.mlp(pooled).squeeze(1)


def up_block_channels(unet):
    """Output channels of each up block, in order (the reversed block_out_channels)."""
    return list(reversed(unet.config.block_out_channels))


def feature_channels(unet, source="up"):
    """Channels of each feature the disc's head pools: the up blocks' ('up'), or each down block's then the mid
    block's ('down_mid')."""
    if source == "up":
        return up_block_channels(unet)
    channels = list(unet.config.block_out_channels)
    return [*channels, channels[-1]]


class _FeaturesTaken(Exception):
    """Raised by the mid block's hook under 'down_mid': the disc needs nothing the UNet computes after it."""


def unet_features(unet, source, x, t, cond):
    """The disc's features of one pass of the UNet's active adapter on the Conditioning `cond`: each up block's
    output ('up'), or each down block's and the mid block's ('down_mid': the pass stops after the mid block, so the
    up blocks never run)."""
    features = []

    def take(module, inputs, output):
        features.append(output[0] if isinstance(output, tuple) else output)

    def take_and_stop(module, inputs, output):
        take(module, inputs, output)
        raise _FeaturesTaken

    if source == "up":
        hooks = [block.register_forward_hook(take) for block in unet.up_blocks]
    else:
        hooks = [block.register_forward_hook(take) for block in unet.down_blocks]
        hooks.append(unet.mid_block.register_forward_hook(take_and_stop))
    try:
        unet(x, t.to(x.device), **cond.unet_kwargs())
    except _FeaturesTaken:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return features
