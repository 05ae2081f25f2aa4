"""FLOPs of one discriminator pass (forward, real + fake batch) by feature source, on fake tensors (no weights, no
GPU): `python -m benchmarks.disc_flops [--model sd15|tiny] [--resolution 512] [--batch-size 8]`."""

import argparse
import tempfile

import torch
from accelerate.state import AcceleratorState

from benchmarks.memory import run_config, tiny_config_folder
from training.loop import make_accelerator
from training.memory import cached_conditioning, count_flops, random_teacher, step_run
from training.models.family import SD15, square_sizes
from training.models.teacher import vae_scale


def disc_flops(features, model, resolution, batch_size):
    """FLOPs of SCottStep.discriminate on 2 x batch_size latents with --disc-features `features`, on the estimate's
    fake model (training.memory: the loop's own step model)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with tempfile.TemporaryDirectory() as folder:
        teacher_folder = SD15.assets if model == "sd15" else tiny_config_folder(folder)
        cfg = run_config(teacher_folder, "scott", resolution, batch_size, "no", False, True, model)
        cfg.disc_features = features
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        accelerator = make_accelerator(cfg, estimate=True)
        teacher = random_teacher(cfg, accelerator.device, fake_mode)
        step = accelerator.unwrap_model(step_run(cfg, accelerator, teacher, fake_mode).model)
    scale = vae_scale(teacher.vae)
    with fake_mode, torch.no_grad():
        x = torch.randn(2 * batch_size, 4, resolution // scale, resolution // scale)
        t = torch.full((2 * batch_size,), 500)
        sizes = square_sizes(resolution, resolution, 2 * batch_size)
        cond = teacher.family.conditioned(cached_conditioning(teacher, 2 * batch_size).float(), sizes)
        flops = count_flops(lambda: step.discriminate(x, t, cond))
    AcceleratorState._reset_state(reset_partial_state=True)
    return flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    up = disc_flops("up", args.model, args.resolution, args.batch_size)
    down_mid = disc_flops("down_mid", args.model, args.resolution, args.batch_size)
    print(f"{args.model} {args.resolution} px, real + fake batch {2 * args.batch_size}: disc forward "
          f"up {up / 1e12:.2f} TFLOP, down_mid {down_mid / 1e12:.2f} TFLOP ({down_mid / up:.0%} of up)")


if __name__ == "__main__":
    main()
