"""Trainer benchmark: iteration time and peak memory of one SCott / LCM step, one-UNet design vs a two-UNet
baseline (a separate frozen teacher copy), on a tiny SD-family UNet or a random full-size SD1.5 UNet.

    python benchmarks/bench_train.py --model tiny
    python benchmarks/bench_train.py --model sd15 --resolution 64 --batch-size 4 --mixed-precision bf16
    python benchmarks/bench_train.py --model sd15 --resolution 512 --batch-size 8 --mixed-precision bf16
    python benchmarks/bench_train.py --estimate-memory --model sd15 --resolution 512 --batch-size 8 \
        --mixed-precision bf16
    python benchmarks/bench_train.py --measure --model sd15 --resolution 512 --batch-size 8 --mixed-precision bf16

--estimate-memory prints the product's estimate (training/memory.py, what `python -m training.distill ...
--estimate-memory` prints for a run: the loop's own build and train_step on fake tensors) as one JSON line per
configuration (scott and lcm, each without and with gradient checkpointing, with the latent cache as the trainer's
default; scott without the cache, whose step encodes pixels and captions): the estimated GPU peak in GiB, resident
between steps, per phase, and the step's FLOPs. --measure runs the same loop functions on a CUDA GPU with random
weights and prints torch.cuda.max_memory_allocated / max_memory_reserved.

Each (mode, design) runs in its own process so that peak memory (RSS on the CPU, max allocated on CUDA) is
its own. Random weights and inputs: the figures measure compute and memory, not quality. VAE and text encoder
are loaded in every configuration (as in --no-cache-latents training) but not run: both designs encode
identically. Under bf16 the frozen base weights are bf16 and the LoRA weights fp32, as in the trainer.
"""

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accelerate.state import AcceleratorState  # noqa: E402

from benchmarks.memory import (  # noqa: E402
    estimate_line,
    measure_line,
    run_config,
    sd15_components,
    tiny_components,
    tiny_config_folder,
)
from scott_core.schedule import alphas_cumprod, training_grid  # noqa: E402
from training.config import DistillConfig  # noqa: E402
from training.models.adapters import add_adapters, enable_checkpointing  # noqa: E402
from training.models.conditioning import Conditioning  # noqa: E402
from training.models.discriminator import DiscriminatorHead, up_block_channels  # noqa: E402
from training.models.family import SD15  # noqa: E402
from training.models.unet import guided_eps_fn  # noqa: E402
from training.step import SCottStep, draw, scott_backward  # noqa: E402


class TwoUNetStep(SCottStep):
    """The baseline: teacher passes on a separate frozen copy of the base UNet (as diffusers' LCM-LoRA)."""

    def __init__(self, unet, teacher_unet, cfg, ab, head=None):
        super().__init__(unet, cfg, ab, head)
        self.__dict__["teacher_unet"] = teacher_unet  # not a submodule: frozen, outside the optimiser

    def teacher_eps_fn(self, cond, uncond, w):
        return guided_eps_fn(self.teacher_unet, cond, uncond, w)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(args):
    """One (mode, design): build, warm up, time `steps` optimiser steps; print one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    unet, vae, text, dim, vae_scale = (tiny_components if args.model == "tiny" else sd15_components)()
    cfg = DistillConfig(teacher="-", data="-", mode=args.mode, lora_rank=args.lora_rank, disc_lora_rank=32,
                        mixed_precision=args.mixed_precision).resolved()
    base_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    for module in (unet, vae, text):
        module.requires_grad_(False).to(device, base_dtype)
    teacher_unet = copy.deepcopy(unet) if args.design == "two-unet" else None
    add_adapters(unet, cfg.lora_rank, cfg.lora_alpha, cfg.disc_lora_rank if cfg.adv_weight > 0 else None)
    if args.gradient_checkpointing:
        enable_checkpointing(unet)
    unet.to(device)
    head = DiscriminatorHead(up_block_channels(unet)).to(device) if cfg.adv_weight > 0 else None
    ab = alphas_cumprod()
    if teacher_unet is None:
        model = SCottStep(unet, cfg, ab, head)
    else:
        model = TwoUNetStep(unet, teacher_unet, cfg, ab, head)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    calls = []
    hooked = [unet] + ([teacher_unet] if teacher_unet is not None else [])
    for m in hooked:
        m.register_forward_pre_hook(
            lambda mod, a, kw: calls.append((a[0].shape[0], torch.is_grad_enabled())), with_kwargs=True
        )
    latent = args.resolution // vae_scale
    grid = training_grid(cfg.grid_spacing)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    generator = torch.Generator().manual_seed(0)

    def step():
        z0 = torch.randn(args.batch_size, 4, latent, latent, generator=generator).to(device)
        cond = Conditioning(torch.randn(args.batch_size, 77, dim, generator=generator).to(device))
        uncond = Conditioning(torch.randn(1, 77, dim, generator=generator).to(device))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            scott_backward(model, z0, cond, uncond, draw(z0, grid, cfg, generator))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    calls.clear()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    print(json.dumps({
        "mode": args.mode, "design": args.design, "s_per_step": seconds, "it_per_s": 1 / seconds,
        "peak_gb": peak_memory_gb(device), "unet_calls": len(calls) // args.steps,
        "unet_samples": sum(b for b, _ in calls) // args.steps,
        # cost in forward-sample units: a pass that runs backward costs about 3 forwards
        "unet_cost": sum(b * (3 if grad else 1) for b, grad in calls) // args.steps,
        "trainable_params": sum(p.numel() for p in params),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads",
    }))


# (mode, gradient checkpointing, latent cache)
MEMORY_CONFIGS = (
    ("scott", False, True), ("scott", True, True), ("lcm", False, True), ("lcm", True, True), ("scott", False, False),
)


def memory_table(args):
    """One JSON line per configuration: the product's estimate (python -m training.distill ... --estimate-memory
    computes the same), or (--measure) the same loop functions measured on CUDA."""
    if args.measure and not torch.cuda.is_available():
        sys.exit("error: --measure needs a CUDA GPU; use --estimate-memory on this machine")
    with tempfile.TemporaryDirectory() as folder:
        teacher = SD15.assets if args.model == "sd15" else tiny_config_folder(folder)
        for mode, checkpointing, cache in MEMORY_CONFIGS:
            cfg = run_config(teacher, mode, args.resolution, args.batch_size, args.mixed_precision, checkpointing,
                             cache, args.model)
            started = time.perf_counter()
            line = measure_line(cfg) if args.measure else estimate_line(cfg)
            print(json.dumps({**line, "seconds": round(time.perf_counter() - started, 1)}), flush=True)
            AcceleratorState._reset_state(reset_partial_state=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 16 tiny, 64 sd15)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mode", choices=("scott", "lcm"), help="(worker) one mode")
    parser.add_argument("--design", choices=("one-unet", "two-unet"), help="(worker) one design")
    parser.add_argument("--configs", default="scott/one-unet,lcm/one-unet,scott/two-unet,lcm/two-unet")
    parser.add_argument("--estimate-memory", action="store_true", help="GPU peak and FLOPs on fake tensors")
    parser.add_argument("--measure", action="store_true", help="GPU peak of the same configurations on CUDA")
    args = parser.parse_args()
    args.resolution = args.resolution or (16 if args.model == "tiny" else 64)
    if args.estimate_memory or args.measure:
        return memory_table(args)
    if args.mode:
        return worker(args)
    base = [a for a in sys.argv[1:] if not a.startswith("--configs")]
    results = {}
    for config in args.configs.split(","):
        mode, design = config.split("/")
        out = subprocess.run([sys.executable, __file__, *base, "--mode", mode, "--design", design],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            continue
        results[config] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model {args.model}, {args.resolution} px, batch {args.batch_size}, rank {args.lora_rank}, "
          f"{args.mixed_precision}, {next(iter(results.values()))['device'] if results else '?'}")
    print(f"{'config':<18}{'s/step':>9}{'it/s':>8}{'peak GB':>9}{'UNet calls':>12}{'samples':>9}{'cost':>7}")
    for config, r in results.items():
        print(f"{config:<18}{r['s_per_step']:>9.3f}{r['it_per_s']:>8.2f}{r['peak_gb']:>9.2f}{r['unet_calls']:>12}"
              f"{r['unet_samples']:>9}{r['unet_cost']:>7}")
    for mode in ("scott", "lcm"):
        one, two = results.get(f"{mode}/one-unet"), results.get(f"{mode}/two-unet")
        if one and two:
            print(f"{mode}: memory one-UNet / two-UNet = {one['peak_gb'] / two['peak_gb']:.2f}")
    scott, lcm = results.get("scott/one-unet"), results.get("lcm/one-unet")
    if scott and lcm:
        print(f"time scott / lcm = {scott['s_per_step'] / lcm['s_per_step']:.2f}; UNet cost scott / lcm = "
              f"{scott['unet_cost'] / lcm['unet_cost']:.2f} (UNet samples, x3 for passes with backward)")


if __name__ == "__main__":
    main()
