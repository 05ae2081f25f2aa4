"""FLOPs of one discriminator pass (forward, real + fake batch) by feature source, on fake tensors (no weights, no
GPU): `python -m benchmarks.disc_flops [--model sd15|tiny] [--resolution 512] [--batch-size 8]`."""

import argparse

import torch

from benchmarks.memory import LiveBytes, build, run_config


def disc_flops(features, model, resolution, batch_size):
    """FLOPs of SCottStep.discriminate on 2 x batch_size latents with --disc-features `features`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    cfg = run_config("scott", model, disc_features=features)
    step, _, _, dim, scale, _ = build(cfg, model, torch.device("cpu"), fake_mode)
    counter = LiveBytes()
    with fake_mode, torch.no_grad():
        x = torch.randn(2 * batch_size, 4, resolution // scale, resolution // scale)
        t, cond = torch.full((2 * batch_size,), 500), torch.randn(2 * batch_size, 77, dim)
        with counter:
            counter.begin("disc")
            step.discriminate(x, t, cond)
    return counter.flops["disc"]


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
