"""The UNet as an eps model: eps_fn(z, t) of its active adapter, and the guided teacher's in LCM's form."""

from .conditioning import Conditioning


def unet_eps_fn(unet, cond):
    """eps_fn(z, t) of the UNet's active adapter for the Conditioning `cond`, in float32: the one place a UNet call
    becomes an eps model (scott_core's consistency_denoiser / x0_from_eps take it from there)."""
    kwargs = cond.unet_kwargs()

    def eps_fn(z, t):
        return unet(z, t.to(z.device), **kwargs).sample.float()

    return eps_fn


def guided_eps_fn(unet, cond, uncond, w):
    """eps_fn(z, t) with classifier-free guidance in LCM's form (1 + w) eps(z, t, c) - w eps(z, t, u), one UNet call
    on [c, u] (uncond: one row per sample of cond, as Conditioning.like gives); w a number or per-sample [B]."""
    import torch

    from scott_core.solvers import cfg_combine

    eps = unet_eps_fn(unet, Conditioning.cat([cond, uncond]))

    def eps_fn(z, t):
        e_cond, e_uncond = eps(torch.cat([z, z]), torch.cat([t, t])).chunk(2)
        return cfg_combine(e_cond, e_uncond, w)

    return eps_fn
