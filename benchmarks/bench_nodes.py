"""Benchmark of the SCott ComfyUI nodes (prints figures; not a test).

1. Per-step wall time of SCott Sampler vs ComfyUI's core `lcm` sampler: same model, size, sigmas and seed,
   through comfy.sample.sample_custom (goal: ratio <= 1.02).
2. 2-step SCott KSampler vs 25-step dpmpp_2m (karras) at cfg 7, end to end through ComfyUI's executor
   (empty latent -> sampler -> VAE decode -> save; text encoding cached), and sampler-only (goal: >= 15x).

Runs alternate between the two contenders; each figure is the fastest of --repeats runs after a warm-up (the
least disturbed by other processes on a shared machine), the median follows in brackets.

    python benchmarks/bench_nodes.py [--family sd15|sdxl] [--checkpoint FILE] [--size PX] [--steps 8] [--repeats 5]
                                     [--parts per-step,sampler,end-to-end]

Without --checkpoint it uses the tests' reduced random fixture of the family (built and cached like the tests do,
in $SCOTT_TEST_CACHE): SD1.5's UNet is ~8x cheaper than SD1.5's, SDXL's (Segmind-Vega's depths at 320 channels) far
cheaper than SDXL's, their VAEs and SDXL's text encoders full size, so end-to-end ratios are lower than with a real
checkpoint. --size defaults to the family's resolution (512, 1024). ComfyUI is found like the tests find it.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "nodes"))  # the ComfyUI harness, fixtures and graphs the tests use
sys.path.insert(0, str(REPO))
import comfy_harness  # noqa: E402
import scott_fixtures  # noqa: E402
import sdxl_fixtures  # noqa: E402

from scott_core import families  # noqa: E402

FIXTURE = {"sd15": "checkpoint", "sdxl": "sdxl_checkpoint"}


def setup(checkpoint, family):
    """ComfyUI in this process with the SCott pack (the tests' harness); returns (comfy, checkpoint path)."""
    comfy_path = comfy_harness.find_comfyui()
    if comfy_path is None:
        sys.exit("no ComfyUI checkout: set COMFYUI_PATH")
    comfy_harness.import_comfyui(comfy_path, cpu=not torch.cuda.is_available(), previews=False)
    cache = comfy_harness.fixture_cache_dir()
    paths = {**scott_fixtures.build_all(cache), **(sdxl_fixtures.build_sdxl(cache) if family == "sdxl" else {})}
    if checkpoint:
        paths[FIXTURE[family]] = Path(checkpoint)
    comfy = comfy_harness.Comfy(paths, Path(tempfile.mkdtemp(prefix="scott-bench-")))
    return comfy, paths[FIXTURE[family]]


def conditioning(clip, text):
    """CONDITIONING of `text` with its pooled output (SDXL's added conditioning needs it; SD1.5 ignores it)."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_step(comfy, checkpoint, size, steps, repeats):
    """Median seconds per step of SCott Sampler and core lcm on the same model, sigmas and noise."""
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    pack, patch = comfy_harness.Comfy.pack("nodes.sampler"), comfy_harness.Comfy.pack("nodes.model_sampling")
    model, clip = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False)[:2]
    cond = conditioning(clip, "a lighthouse at sunset")
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    sigmas = pack.scott_sigmas(steps, 1.0)
    runs = {
        "SCott Sampler": (
            patch.patch_model_sampling(model),
            pack.scott_sampler(1.0),
        ),
        "core lcm": (
            ModelSamplingDiscrete().patch(model, "lcm", False)[0],
            comfy.samplers.sampler_object("lcm"),
        ),
    }
    times = {name: [] for name in runs}
    for i in range(repeats + 1):  # the first round warms up; names alternate order to share drift
        for name in list(runs)[:: 1 if i % 2 else -1]:
            m, sampler = runs[name]
            t = timed(
                lambda m=m, sampler=sampler, seed=i: comfy.sample.sample_custom(
                    m, noise, 1.0, sampler, sigmas, cond, cond, latent, disable_pbar=True, seed=seed
                )
            )
            if i:
                times[name].append(t / steps)
    return summary(times)


def summary(times):
    """{name: (fastest, median)} of each list of timings."""
    return {name: (min(v), statistics.median(v)) for name, v in times.items()}


def fmt(pair, scale=1.0, unit="s", digits=2):
    return f"{pair[0] * scale:.{digits}f} {unit} [{pair[1] * scale:.{digits}f}]"


def end_to_end(comfy, checkpoint, size, repeats):
    """Median seconds of a whole prompt: 2-step SCott KSampler vs 25-step dpmpp_2m cfg 7 (+ decode, save)."""
    from graphs import base, decode_and_save, empty_latent, ksampler

    def prompt(kind, seed):
        p, model, _ = base(checkpoint.name)
        latent = empty_latent(p, size=size)
        if kind == "scott":
            ksampler(p, "s", model, latent, seed, steps=2, cfg=1.0, gamma=1.0)
            del p["s_save"]
        else:
            p["s"] = {
                "class_type": "KSampler",
                "inputs": {
                    "model": model,
                    "seed": seed,
                    "steps": 25,
                    "cfg": 7.0,
                    "sampler_name": "dpmpp_2m",
                    "scheduler": "karras",
                    "positive": ["pos", 0],
                    "negative": ["neg", 0],
                    "latent_image": latent,
                    "denoise": 1.0,
                },
            }
        decode_and_save(p, "bench", ["s", 0])
        return p

    times = {"scott": [], "dpmpp_2m": []}
    for i in range(repeats + 1):
        for kind in times:
            t = timed(lambda kind=kind, i=i: comfy.run(prompt(kind, 1000 + i)))
            if i:
                times[kind].append(t)
    return summary(times)


def sampler_only(comfy, checkpoint, size, repeats):
    """Median seconds of the sampling alone: SCott 2 steps cfg 1 vs dpmpp_2m karras 25 steps cfg 7."""
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    pack, patch = comfy_harness.Comfy.pack("nodes.sampler"), comfy_harness.Comfy.pack("nodes.model_sampling")
    model, clip = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False)[:2]
    pos, neg = conditioning(clip, "a lighthouse at sunset"), conditioning(clip, "")
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    karras = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 25)
    runs = {
        "scott": lambda: comfy.sample.sample_custom(
            patch.patch_model_sampling(model),
            noise,
            1.0,
            pack.scott_sampler(1.0),
            pack.scott_sigmas(2, 1.0),
            pos,
            neg,
            latent,
            disable_pbar=True,
            seed=0,
        ),
        "dpmpp_2m": lambda: comfy.sample.sample_custom(
            model,
            noise,
            7.0,
            comfy.samplers.sampler_object("dpmpp_2m"),
            karras,
            pos,
            neg,
            latent,
            disable_pbar=True,
            seed=0,
        ),
    }
    times = {k: [] for k in runs}
    for i in range(repeats + 1):
        for k, fn in runs.items():
            t = timed(fn)
            if i:
                times[k].append(t)
    return summary(times)


def report_per_step(comfy, checkpoint, args):
    steps = per_step(comfy, checkpoint, args.size, args.steps, args.repeats)
    ratio = steps["SCott Sampler"][0] / steps["core lcm"][0]
    median_ratio = steps["SCott Sampler"][1] / steps["core lcm"][1]
    print(
        f"per step ({args.steps} steps, cfg 1): SCott Sampler {fmt(steps['SCott Sampler'], 1e3, 'ms', 1)}, "
        f"core lcm {fmt(steps['core lcm'], 1e3, 'ms', 1)}, ratio {ratio:.3f} [{median_ratio:.3f}] (goal <= 1.02)"
    )


def report_sampler_only(comfy, checkpoint, args):
    sampling = sampler_only(comfy, checkpoint, args.size, args.repeats)
    print(
        f"sampler only: SCott 2 steps cfg 1 {fmt(sampling['scott'])}, dpmpp_2m 25 steps cfg 7 "
        f"{fmt(sampling['dpmpp_2m'])}, speed-up {sampling['dpmpp_2m'][0] / sampling['scott'][0]:.1f}x "
        "(goal >= 15x)"
    )


def report_end_to_end(comfy, checkpoint, args):
    e2e = end_to_end(comfy, checkpoint, args.size, args.repeats)
    print(
        f"end to end (prompt incl. VAE decode + save): SCott {fmt(e2e['scott'])}, "
        f"dpmpp_2m {fmt(e2e['dpmpp_2m'])}, "
        f"speed-up {e2e['dpmpp_2m'][0] / e2e['scott'][0]:.1f}x (goal >= 15x)"
    )


PARTS = {"per-step": report_per_step, "sampler": report_sampler_only, "end-to-end": report_end_to_end}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(families.FAMILIES), default="sd15", help="model family")
    parser.add_argument(
        "--checkpoint", help="a .safetensors checkpoint of the family (default: its reduced test fixture)"
    )
    parser.add_argument("--size", type=int, default=0, help="image size in pixels (square; 0: the family's)")
    parser.add_argument("--steps", type=int, default=8, help="steps for the per-step comparison")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    comfy, checkpoint = setup(args.checkpoint, args.family)
    args.size = args.size or families.FAMILIES[args.family].default_resolution
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(
        f"machine: {platform.platform()}, {device}, torch {torch.__version__}, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    fixture = f" (reduced random {families.FAMILIES[args.family].display_name} test fixture)"
    print(
        f"checkpoint: {checkpoint.name}{'' if args.checkpoint else fixture}; "
        f"{args.size}x{args.size} px, batch 1, fastest of {args.repeats} runs after a warm-up [median]"
    )
    for part in args.parts.split(","):
        PARTS[part.strip()](comfy, checkpoint, args)
    print(f"load avg at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
