"""The GPU memory a run needs, estimated without weights or a GPU, and the one-line message when a GPU runs out of it.

`estimate(cfg)` runs the loop's own code on fake tensors: the teacher's UNet, VAE and its family's text encoders are
built from its configs (a single file's: its family's shipped ones) on the meta device and made fake (FakeTensorMode);
loop.make_accelerator(estimate=True) and loop.build_model add the LoRAs, the discriminator's head, the SCottStep,
AdamW's two parameter groups and accelerate's wrapper; then loop.train_step runs twice as the run's heaviest step
(step.peak_step) on a micro-batch of the largest bucket as the loader serves it (the second step with AdamW's state),
gradient clipping and the EMA update included. LiveBytes counts the bytes of live storages, each rounded up to 512 B as
the CUDA caching allocator rounds, and the FLOPs by torch.utils.flop_counter's formulas. CPU autocast stands in for CUDA
autocast, with group_norm / layer_norm in fp32 as CUDA autocast runs them; the base weights take the dtype a CUDA run
gives them. Not seen: the CUDA context (~0.3-0.5 GiB), cuDNN / cuBLAS workspaces and allocator fragmentation, so a GPU
shows somewhat more; nor the gradient buckets DDP adds under several processes (about the trainable LoRAs' gradients
once more). fp16 is estimated as bf16 (the same sizes). docs/memory.md has the figures.
"""

import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .errors import UserError

GIB = 2**30
BLOCK = 512  # the CUDA caching allocator's rounding
PEAK_LINE = re.compile(r"estimated GPU peak of this run: [0-9.]+ GiB \(([0-9]+) bytes\)")
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


class OutOfMemory(UserError):
    """The GPU ran out of memory: what the run needs, what lowers it, where it can resume."""


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages made by ops under the mode (plus those `track`ed by hand), peak overall and per phase;
    FLOPs per phase by torch.utils.flop_counter's formulas. A scalar read (`.item()`) of a fake tensor, which has no
    value, reads 1: the loop's divergence check then sees a finite loss."""

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
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **kwargs)
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.flops[self.phase] = self.flops.get(self.phase, 0) + formula(*args, **kwargs, out_val=out)
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


def _is_fake(tensor):
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


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


def teacher_configs(cfg):
    """(family, the folder of its component configs): a teacher folder's own configs, or for a single file its
    family's shipped ones (what load_teacher reads it with)."""
    from .models.teacher import check_teacher_path

    family = check_teacher_path(cfg.teacher, cfg.trust_ckpt)
    return family, Path(cfg.teacher) if Path(cfg.teacher).is_dir() else family.assets


def component(folder, name, library, cls):
    """A model component with random weights from its config (diffusers: from_config; transformers: cls(config))."""
    klass = getattr(importlib.import_module(library), cls)
    if library == "diffusers":
        return klass.from_config(klass.load_config(str(folder / name)))
    from transformers import AutoConfig

    return klass(AutoConfig.from_pretrained(str(folder / name)))


def random_teacher(cfg, device, fake_mode=None):
    """A Teacher of cfg.teacher's family from its configs (teacher_configs: model_index.json's unet, vae and the
    family's text encoders; the tokenizers read as they are), weights random, in the dtype a CUDA run gives them:
    built on `device`, or with fake_mode on the meta device (the VAE and text encoders made fake on `device`; the
    UNet left on meta for step_run)."""
    from diffusers.utils import logging as diffusers_logging

    from .loop import weight_dtype
    from .models.teacher import Teacher

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on each cast
    family, folder = teacher_configs(cfg)
    index = json.loads((folder / "model_index.json").read_text())
    dtype = weight_dtype(cfg.mixed_precision, torch.device("cuda"))
    names = ("unet", "vae", *family.text_encoders)
    parts = {}
    with torch.device("meta" if fake_mode else device):
        for name in names:
            parts[name] = component(folder, name, *index[name]).requires_grad_(False).to(dtype)
    if fake_mode:  # the UNet stays on meta until its adapters are in: step_run makes the SCottStep fake
        for name in names[1:]:
            make_fake(parts[name], fake_mode, torch.device(device))
    tokenizers = tuple(
        getattr(importlib.import_module(index[name][0]), index[name][1]).from_pretrained(str(folder / name))
        for name in family.tokenizers
    )
    encoders = tuple(parts[name] for name in family.text_encoders)
    return Teacher(family, parts["unet"], parts["vae"], encoders, tokenizers, Path(cfg.teacher).stem, "random",
                   folder / "scheduler")


def make_fake(module, fake_mode, device):
    """Replace the module's meta tensors and its real parameters with fake tensors on `device` (same shapes and
    dtypes, no memory); real buffers (the SCottStep's noise schedule) keep their values."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not _is_fake(param):
                sub._parameters[name] = torch.nn.Parameter(fake_tensor(fake_mode, param.data, device),
                                                           requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_meta:
                sub._buffers[name] = fake_tensor(fake_mode, buffer, device)


def fake_tensor(fake_mode, tensor, device):
    """A fake tensor like `tensor` (meta or real) on `device`."""
    if tensor.is_meta:
        return fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, tensor, device)
    return fake_mode.from_tensor(tensor).to(device)


def largest_size(cfg):
    """(width, height) of the largest crop the run trains on: its largest bucket (of equal areas the squarest), or
    resolution^2."""
    from .data.buckets import bucket_rules, bucket_sizes

    rules = bucket_rules(cfg)
    if rules is None:
        return cfg.resolution, cfg.resolution
    sizes = bucket_sizes(cfg.resolution, rules.min_reso, rules.max_reso)
    return max(sizes, key=lambda size: (size[0] * size[1], -abs(size[0] - size[1])))


def cached_conditioning(teacher, rows, make=torch.randn):
    """A Conditioning of `rows` captions as the cache serves it, made by make(*shape, dtype=) in the text encoders'
    dtype: the family's text encoders' hidden states side by side, and its pooled embedding where it has one."""
    from .models.conditioning import Conditioning

    family, dtype = teacher.family, teacher.text_encoders[0].dtype
    length = teacher.tokenizers[0].model_max_length
    states = make(rows, length, sum(encoder.config.hidden_size for encoder in teacher.text_encoders), dtype=dtype)
    encoders = dict(zip(family.text_encoders, teacher.text_encoders))
    pooled = make(rows, encoders[family.pooled_from].config.projection_dim, dtype=dtype) if family.pooled_from else None
    return Conditioning(states, pooled)


def micro_batch(run, size):
    """A micro-batch of the largest crop as the loader serves it, with its images' sizes (uncropped): with the cache,
    the latent mean / std (the VAE's dtype) and the captions' Conditioning (the text encoders'); without, pixels in
    [-1, 1] and captions."""
    from .models.family import square_sizes
    from .models.teacher import vae_scale

    teacher, batch = run.teacher, run.cfg.batch_size
    sizes = square_sizes(size[1], size[0], batch)
    if not run.cfg.cache_latents:
        return {"pixels": torch.rand(batch, 3, size[1], size[0]) * 2 - 1, "captions": ["a photograph"] * batch,
                "sizes": sizes, "skipped": []}
    scale = vae_scale(teacher.vae)
    latent = (batch, teacher.vae.config.latent_channels, size[1] // scale, size[0] // scale)
    return {"mean": torch.randn(latent, dtype=teacher.vae.dtype), "std": torch.rand(latent, dtype=teacher.vae.dtype),
            "cond": cached_conditioning(teacher, batch), "sizes": sizes, "captions": ["a photograph"] * batch,
            "skipped": []}


def step_run(cfg, accelerator, teacher, fake_mode=None):
    """The loop's Run of cfg on `teacher` (loop.step_model, made fake with fake_mode, then loop.optimise), its data a
    micro-batch maker instead of a dataset: with the cache the VAE and text encoder stay off the run's device, as the
    loop moves them after caching."""
    from scott_core.schedule import training_grid

    from .data.skips import Skipped
    from .encode import encode_uncond
    from .loop import Run, optimise, step_model

    with torch.device("meta") if fake_mode else contextlib.nullcontext():  # the LoRAs and head on meta, then fake
        model = step_model(cfg, teacher)
    if fake_mode:
        make_fake(model, fake_mode, accelerator.device)
    with fake_mode or contextlib.nullcontext():
        model, optimizer, scheduler = optimise(cfg, accelerator, model)
        run = Run(cfg, accelerator, model, optimizer, scheduler, teacher, None, training_grid(cfg.grid_spacing), None,
                  Skipped())
        if cfg.cache_latents:  # the cache's empty caption (float32), made the family's unconditional embedding
            empty = cached_conditioning(teacher, 1, torch.zeros).float().to(accelerator.device)
            run.uncond = teacher.family.uncond(empty)
        else:
            run.uncond = encode_uncond(run)
    return run


def resident(run):
    """The tensors on the GPU before a step: the SCottStep's parameters and buffers (base UNet, LoRAs, head), and
    without the cache the VAE's and text encoder's."""
    modules = [run.accelerator.unwrap_model(run.model)]
    if not run.cfg.cache_latents:
        modules += [run.teacher.vae, *run.teacher.text_encoders]
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def mark_phases(run, counter):
    """Name the counter's phases after the SCottStep's (estimate, discriminator_loss, student_loss) and AdamW's step
    ('optimizer'); returns the hook handles."""
    model = run.accelerator.unwrap_model(run.model)
    return [model.register_forward_pre_hook(lambda module, args: counter.begin(args[0])),
            run.optimizer.optimizer.register_step_pre_hook(lambda *args: counter.begin("optimizer"))]


def run_steps(run, counter, steps=2):
    """loop.train_step `steps` times as the run's heaviest optimiser step (step.peak_step: the discriminator updating
    and the generator term on, whatever --disc-every, --disc-head-warmup or --adv-decay-steps leave out elsewhere), on
    micro-batches of the largest crop, phases marked on the counter ('latents' from the start of each step)."""
    from .loop import train_step
    from .step import peak_step

    size, step = largest_size(run.cfg), peak_step(run.cfg)
    for _ in range(steps):
        counter.begin("latents")
        train_step(run, [micro_batch(run, size) for _ in range(run.cfg.grad_accum)], step)


@dataclass
class Estimate:
    """The estimated GPU peak of one run's settings: bytes overall, before the first step, per phase; FLOPs of one
    optimiser step per phase."""

    peak_bytes: int
    resident_bytes: int
    phase_bytes: dict
    phase_flops: dict

    @property
    def peak_gib(self):
        return self.peak_bytes / GIB


def estimate(cfg):
    """The GPU peak of cfg's run (Estimate), from the loop's own build and step on fake tensors (module docstring).
    fp16 is estimated as bf16: the same sizes, and CPU autocast runs bf16 only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .loop import make_accelerator

    if cfg.mixed_precision == "fp16":
        cfg = dataclasses.replace(cfg, mixed_precision="bf16")
    accelerator = make_accelerator(cfg, estimate=True)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    teacher = random_teacher(cfg, accelerator.device, fake_mode)
    run = step_run(cfg, accelerator, teacher, fake_mode)
    counter = LiveBytes()
    with fake_mode, norms_in_fp32():
        hooks = mark_phases(run, counter)
        with counter:
            for tensor in resident(run):
                counter.track(tensor)
            counter.begin("weights")
            run_steps(run, counter, steps=1)
            first, resident_bytes = dict(counter.flops), counter.current  # AdamW's state exists from here on
            run_steps(run, counter, steps=1)
        for hook in hooks:
            hook.remove()
    per_step = {phase: flops - first.get(phase, 0) for phase, flops in counter.flops.items()}
    return Estimate(counter.peak, resident_bytes, counter.phases, {k: v for k, v in per_step.items() if v})


def settings_text(cfg):
    """The settings the estimate depends on, in words."""
    width, height = largest_size(cfg)
    adversarial = f", disc LoRA rank {cfg.disc_lora_rank} on {cfg.disc_features} features" if cfg.adv_weight else ""
    return (
        f"{Path(cfg.teacher).name}, {width}x{height} px (the largest crop), batch {cfg.batch_size} x "
        f"{cfg.grad_accum} accumulated, {cfg.mixed_precision} precision, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}, latent cache {'on' if cfg.cache_latents else 'off'}, "
        f"LoRA rank {cfg.lora_rank}{adversarial}"
    )


def lowering_flags(cfg):
    """The flags that lower the peak, the likely biggest first."""
    flags = []
    if not cfg.gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    if cfg.mixed_precision == "no":
        flags.append("--mixed-precision bf16")
    if cfg.batch_size > 1:
        half = cfg.batch_size // 2
        flags.append(f"--batch-size {half} --grad-accum {cfg.grad_accum * cfg.batch_size // half}")
    if not cfg.cache_latents:
        flags.append("--cache-latents")
    if cfg.adv_weight and cfg.disc_features == "up":
        flags.append("--disc-features down_mid")
    if cfg.resolution > 256:
        flags.append(f"--resolution {cfg.resolution // 2}")
    return flags


def report(cfg, found):
    """--estimate-memory's printout: the peak (PEAK_LINE), the settings, resident and per-phase bytes, the flags."""
    phases = ", ".join(f"{phase} {size / GIB:.2f}" for phase, size in found.phase_bytes.items())
    flops = ", ".join(f"{phase} {count / 1e12:.3f}" for phase, count in found.phase_flops.items())
    return "\n".join([
        f"estimated GPU peak of this run: {found.peak_gib:.2f} GiB ({found.peak_bytes} bytes)",
        f"  settings: {settings_text(cfg)}",
        f"  resident between steps (base weights, LoRAs, head, AdamW state): {found.resident_bytes / GIB:.2f} GiB",
        f"  peak by phase (GiB): {phases}",
        f"  TFLOP of one optimiser step by phase: {flops}",
        f"  lower it with: {', '.join(lowering_flags(cfg)) or 'nothing left to turn down: a GPU with more memory'}",
        "  an estimate on fake tensors (no weights, no GPU); a GPU adds its CUDA context (~0.3-0.5 GiB), workspaces "
        "and fragmentation",
    ])


def estimate_in_child(run_file, timeout=600):
    """The peak (bytes) --estimate-memory prints for a run file, from a fresh CPU-only process (this one's accelerate
    state is its GPU run's); None if that fails or takes longer than `timeout` seconds."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and not k.startswith("ACCELERATE_")}
    package_root = str(Path(__file__).resolve().parents[1])
    env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true",
               PYTHONPATH=os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p))
    try:
        done = subprocess.run([sys.executable, "-m", "training.distill", "--config", str(run_file),
                               "--estimate-memory"], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    found = PEAK_LINE.search(done.stdout)
    return int(found.group(1)) if found else None


def out_of_memory_message(cfg, doing, last_checkpoint):
    """One line: the run's estimated peak (--estimate-memory in a child process, on this machine's local rank 0; the
    command on the others or if it fails), the flags that lower it, the last checkpoint."""
    from .runfile import write_run_file

    run_file = Path(cfg.output) / "out_of_memory.toml"
    run_file.parent.mkdir(parents=True, exist_ok=True)
    write_run_file(cfg, run_file)
    command = f"python -m training.distill --config {run_file} --estimate-memory"
    peak = estimate_in_child(run_file) if os.environ.get("LOCAL_RANK", "0") == "0" else None
    need = (f"this run needs about {peak / GIB:.2f} GiB ({peak} bytes; estimate: {command})" if peak
            else f"its estimate: {command}")
    flags = ", ".join(lowering_flags(cfg)) or "a GPU with more memory"
    return (f"out of GPU memory {doing}: {need}; lower it with {flags}; last checkpoint: "
            f"{last_checkpoint or 'none written yet'}")
