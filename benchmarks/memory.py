"""GPU peak-memory and FLOP estimates of the trainer's own step, run on fake tensors: no weights, no GPU.

The model is built on the meta device, its parameters made fake (FakeTensorMode), and the loop's functions
(`batch_latents`, `scott_backward`, the AdamW step) run on them. With the latent cache (the trainer's default)
z0 is drawn from a cached mean and std and the caption's hidden states come from the cache: no VAE or text-encoder
pass in the step, and their weights are off the GPU (the loop moves them to the CPU after caching). Without it
(`--no-cache-latents`) the step encodes the batch's pixels and captions, with both encoders' weights on the GPU.
A TorchDispatchMode counts the bytes of live storages, each rounded up to 512 B as the CUDA caching allocator
rounds, and FLOPs by torch.utils.flop_counter's formulas.
CPU autocast stands in for CUDA autocast, with group_norm / layer_norm upcast to fp32 as CUDA autocast does.
What it does not see: the CUDA context (~0.3-0.5 GiB), cuDNN / cuBLAS workspaces, and allocator fragmentation
(max_memory_reserved above max_memory_allocated), so a real run peaks somewhat higher.
"""

import contextlib
import math
import weakref
from types import SimpleNamespace

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from scott_core.schedule import alphas_cumprod, training_grid
from training.config import DistillConfig
from training.encode import batch_latents
from training.loop import weight_dtype
from training.models.adapters import add_adapters, enable_checkpointing
from training.models.discriminator import DiscriminatorHead, feature_channels
from training.models.teacher import ASSETS
from training.models.unet import unet_eps_fn
from training.step import SCottStep, draw, scott_backward

GIB = 2**30
BLOCK = 512  # the CUDA caching allocator's rounding


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages made by ops under the mode (plus those `track`ed by hand), peak overall and per
    phase; and FLOPs per phase by torch.utils.flop_counter's formulas (FlopCounterMode's module tracker does not
    run inside autograd.grad, which the generator term uses)."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak, self.phases, self.phase = {}, 0, 0, {}, None
        self.flops = {}

    def track(self, tensor):
        """Count a tensor's storage until it is freed (once per storage)."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = math.ceil(storage.nbytes() / BLOCK) * BLOCK
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        if self.phase is not None:
            self.phases[self.phase] = max(self.phases.get(self.phase, 0), self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def begin(self, phase):
        """Attribute the peaks from here on to `phase`."""
        self.phase = phase
        self.phases[phase] = max(self.phases.get(phase, 0), self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.flops[self.phase] = self.flops.get(self.phase, 0) + formula(*args, **kwargs, out_val=out)
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


def count_flops(fn):
    """FLOPs of fn() by torch.utils.flop_counter's formulas (LiveBytes' counter, one phase)."""
    counter = LiveBytes()
    counter.begin("all")
    with counter:
        fn()
    return counter.flops.get("all", 0)


@contextlib.contextmanager
def norms_in_fp32():
    """group_norm and layer_norm run in fp32 under autocast, as CUDA autocast runs them."""
    functional = torch.nn.functional
    originals = functional.group_norm, functional.layer_norm

    def upcast(fn):
        def wrapped(x, *args, **kwargs):
            if not torch.is_autocast_enabled(x.device.type):
                return fn(x, *args, **kwargs)
            args = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            with torch.autocast(x.device.type, enabled=False):
                return fn(x.float(), *args, **kwargs)

        return wrapped

    functional.group_norm, functional.layer_norm = (upcast(fn) for fn in originals)
    try:
        yield
    finally:
        functional.group_norm, functional.layer_norm = originals


def tiny_components():
    """A tiny SD-family UNet (cross-attention 32) with a matching tiny VAE and text encoder; (unet, vae, text,
    cross-attention width, VAE downscale)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4))
    return unet, vae, text, 32, 2


def sd15_components():
    """Random full-size SD1.5 UNet, VAE and CLIP-L text encoder from the shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(ASSETS / "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(ASSETS / "vae")))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(ASSETS / "text_encoder")))
    return unet, vae, text, 768, 8


COMPONENTS = {"tiny": tiny_components, "sd15": sd15_components}


def run_config(mode, model="tiny", mixed_precision="no", gradient_checkpointing=False, **overrides):
    """The resolved trainer config of one estimate (scott or lcm defaults, the bench's ranks)."""
    ranks = dict(lora_rank=4, disc_lora_rank=4) if model == "tiny" else {}
    return DistillConfig(
        teacher="-", data="-", mode=mode, mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing, **{**ranks, **overrides},
    ).resolved()


def build(cfg, model, device, fake_mode=None):
    """(SCottStep, vae, text encoder, cross-attention width, VAE downscale, optimizer) as the loop builds them:
    base weights in the run's dtype, LoRAs and head fp32. With fake_mode, built on meta and made fake."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on each cast
    dtype = weight_dtype(cfg.mixed_precision, torch.device("cuda"))
    with torch.device("meta" if fake_mode else device):
        unet, vae, text, dim, scale = COMPONENTS[model]()
        for module in (unet, vae, text):
            module.requires_grad_(False).to(dtype)
        adversarial = cfg.adv_weight > 0
        disc_rank = cfg.disc_lora_rank if adversarial else None
        add_adapters(unet, cfg.lora_rank, cfg.lora_alpha, disc_rank, cfg.disc_features)
        head = DiscriminatorHead(feature_channels(unet, cfg.disc_features)) if adversarial else None
    if cfg.gradient_checkpointing:
        enable_checkpointing(unet)
    step = SCottStep(unet, cfg, alphas_cumprod(), head)
    if fake_mode:
        for module in (step, vae, text):
            make_fake(module, fake_mode, torch.device(device))
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-5)
    return step, vae, text, dim, scale, optimizer


def make_fake(module, fake_mode, device):
    """Replace the module's meta parameters and buffers with fake tensors on `device` (same shapes, dtypes)."""
    convert = fake_mode.fake_tensor_converter.from_meta_and_device
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_meta:
                fake = convert(fake_mode, param.data, device)
                sub._parameters[name] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_meta:
                sub._buffers[name] = convert(fake_mode, buffer, device)


def warm_optimizer(optimizer):
    """One AdamW step on zero gradients: its state exists, as it does from the second training step on."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def autocast(device, mixed_precision):
    """The accelerator's autocast for a precision ('no' = off)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def tokenizer():
    """The shipped SD1.5 CLIP tokenizer (77 tokens; the tiny text encoder has CLIP's vocabulary too)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(ASSETS / "tokenizer"))


def micro_batch(vae, text, dim, scale, resolution, batch_size, device, cache=True):
    """A micro-batch as the loader serves it: with the cache, the latent mean / std (the VAE's dtype) and caption
    hidden states (the text encoder's dtype) from CachedPairs; without it, pixels in [-1, 1] and captions."""
    if not cache:
        return {"pixels": torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1,
                "captions": ["a photograph of an astronaut riding a horse"] * batch_size}
    latent = (batch_size, 4, resolution // scale, resolution // scale)
    return {"mean": torch.randn(latent, dtype=vae.dtype, device=device),
            "std": torch.rand(latent, dtype=vae.dtype, device=device),
            "cond": torch.randn(batch_size, 77, dim, dtype=text.dtype, device=device)}


def train_step(step, vae, text, dim, scale, optimizer, resolution, batch_size, device, counter=None, cache=True):
    """One optimiser step of the loop: the loop's batch_latents (cached mean / std, or the VAE and text encoder on
    the batch), the phased scott_backward, AdamW; phases marked on counter."""
    mark = counter.begin if counter else (lambda phase: None)
    generator = torch.Generator().manual_seed(0)
    mark("latents")
    teacher = SimpleNamespace(vae=vae, text_encoder=text, tokenizer=None if cache else tokenizer())
    run = SimpleNamespace(teacher=teacher, accelerator=SimpleNamespace(device=device))
    batch = micro_batch(vae, text, dim, scale, resolution, batch_size, device, cache)
    z0, cond = batch_latents(run, batch, generator)
    del batch
    uncond = torch.randn(1, 77, dim, device=device)  # run.uncond: the empty caption's hidden states, float32
    forward = step.forward

    def marked(phase, *args):
        mark(phase)
        with autocast(device, step.cfg.mixed_precision):
            return forward(phase, *args)

    step.forward = marked
    try:
        draws = draw(z0, training_grid(step.cfg.grid_spacing), step.cfg, generator)
        losses = scott_backward(step, z0, cond, uncond, draws)
    finally:
        del step.forward
    mark("optimizer")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def synth_step(unet, vae, dim, scale, resolution, batch_size, device, mixed_precision, counter=None):
    """The data-free sampler's heaviest moments: one guided teacher call (cond + uncond batched), then the VAE
    decoding the batch one image at a time (sliced), as synthesize_run runs the pipeline."""
    mark = counter.begin if counter else (lambda phase: None)
    latent = resolution // scale
    z = torch.randn(batch_size, 4, latent, latent, device=device)
    cond = torch.randn(2 * batch_size, 77, dim, device=device)
    with autocast(device, mixed_precision):
        mark("teacher")
        eps = unet_eps_fn(unet, cond)(torch.cat([z, z]), torch.full((2 * batch_size,), 999.0, device=device))
        del eps
        mark("decode")
        images = [vae.decode(z[i : i + 1].to(vae.dtype)).sample.float().cpu() for i in range(batch_size)]
    return images


def estimate(config, model="tiny", resolution=None, batch_size=8, mixed_precision="bf16", gradient_checkpointing=False,
             cache_latents=True, overrides=None):
    """One JSON-ready dict: the estimated GPU peak (GiB) of `config` (scott | lcm | synth), per phase, and FLOPs;
    cache_latents as the trainer's --[no-]cache-latents (synth: the sampler, which has no cache); overrides: other
    trainer options ({field: value}) over the mode's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    resolution = resolution or (16 if model == "tiny" else 512)
    device = torch.device("cpu")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    cfg = run_config("lcm" if config == "lcm" else "scott", model, mixed_precision, gradient_checkpointing,
                     **(overrides or {}))
    step, vae, text, dim, scale, optimizer = build(cfg, model, device, fake_mode)
    counter = LiveBytes()
    with fake_mode, norms_in_fp32():
        if config != "synth":
            warm_optimizer(optimizer)
        on_gpu = [*step.parameters(), *step.buffers()]
        if config == "synth" or not cache_latents:  # cached: the VAE and text encoder have left the GPU
            on_gpu += [*vae.parameters(), *text.parameters()]
        with counter:
            for tensor in on_gpu:
                counter.track(tensor)
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.numel() > 1:
                        counter.track(value)
            counter.begin("weights")
            if config == "synth":
                synth_step(step.unet, vae, dim, scale, resolution, batch_size, device, mixed_precision, counter)
            else:
                train_step(step, vae, text, dim, scale, optimizer, resolution, batch_size, device, counter,
                           cache_latents)
    return {
        **settings(config, gradient_checkpointing, cache_latents, resolution, batch_size, mixed_precision),
        "peak_gib": round(counter.peak / GIB, 3),
        "peak_bytes": counter.peak,
        "phase_bytes": counter.phases,
        "phases": {k: round(v / GIB, 3) for k, v in counter.phases.items()},
        "tflop": round(sum(counter.flops.values()) / 1e12, 3),
        "flop": sum(counter.flops.values()),
        "phase_tflop": {k: round(v / 1e12, 3) for k, v in counter.flops.items()},
        "phase_flop": counter.flops,
    }


def settings(config, gradient_checkpointing, cache_latents, resolution, batch_size, mixed_precision):
    """The settings columns of one JSON line (cache_latents None for synth, which has no latents to cache)."""
    return {
        "config": config,
        "gradient_checkpointing": gradient_checkpointing,
        "cache_latents": cache_latents if config != "synth" else None,
        "resolution": resolution,
        "batch_size": batch_size,
        "mixed_precision": mixed_precision,
    }


def measure(config, model="sd15", resolution=512, batch_size=8, mixed_precision="bf16", gradient_checkpointing=False,
            cache_latents=True):
    """The same step on a CUDA GPU with random weights: torch.cuda.max_memory_allocated / reserved (GiB); with
    the cache the VAE and text encoder are moved to the CPU first, as the loop moves them after caching."""
    device = torch.device("cuda")
    cfg = run_config("lcm" if config == "lcm" else "scott", model, mixed_precision, gradient_checkpointing)
    step, vae, text, dim, scale, optimizer = build(cfg, model, device)
    if config != "synth" and cache_latents:
        vae.to("cpu")
        text.to("cpu")
        torch.cuda.empty_cache()
    with norms_in_fp32():  # a no-op on CUDA, whose autocast already runs the norms in fp32
        if config == "synth":
            run = lambda: synth_step(step.unet, vae, dim, scale, resolution, batch_size, device, mixed_precision)  # noqa: E731
        else:
            warm_optimizer(optimizer)
            run = lambda: train_step(  # noqa: E731
                step, vae, text, dim, scale, optimizer, resolution, batch_size, device, cache=cache_latents
            )
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
    return {
        **settings(config, gradient_checkpointing, cache_latents, resolution, batch_size, mixed_precision),
        "max_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "max_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
        "device": torch.cuda.get_device_name(),
    }
