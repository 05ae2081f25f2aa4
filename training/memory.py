"""The GPU memory a run needs, in closed form, and the one-line message when a GPU runs out of it."""

from .errors import UserError

# Fitted to `python benchmarks/bench_train.py --estimate-memory --model sd15 --resolution 512 --batch-size 8
# --mixed-precision bf16` (fake-tensor estimate, README "Measured figures"): GiB of weights, LoRAs and AdamW state
# (VAE and text encoder: ENCODERS_GIB more without the latent cache, which moves them off the GPU), and GiB per
# 512 px sample of the step's peak, by (mode, gradient checkpointing).
WEIGHTS_GIB = {"scott": 2.81, "lcm": 2.60}
ENCODERS_GIB = 0.385
PER_SAMPLE_GIB = {
    ("scott", False): 1.795,
    ("scott", True): 0.539,
    ("lcm", False): 1.438,
    ("lcm", True): 0.358,
}


class OutOfMemory(UserError):
    """The GPU ran out of memory: what the run needs, what lowers it, where it can resume."""


def estimated_peak_gib(cfg):
    """About how many GiB of GPU memory one training step of an SD1.5-size teacher takes with cfg's settings."""
    mode = "scott" if cfg.adv_weight > 0 else "lcm"
    scale = 2.0 if cfg.mixed_precision == "no" else 1.0  # fp32 activations and base weights are twice bf16's
    samples = cfg.batch_size * (cfg.resolution / 512) ** 2
    resident = WEIGHTS_GIB[mode] + (0 if cfg.cache_latents else ENCODERS_GIB)
    return scale * (resident + samples * PER_SAMPLE_GIB[(mode, bool(cfg.gradient_checkpointing))])


def lowering_flags(cfg):
    """The flags that lower the peak, in the order they help most for cfg."""
    flags = []
    if not cfg.gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    if cfg.mixed_precision == "no":
        flags.append("--mixed-precision bf16")
    if cfg.batch_size > 1:
        half = cfg.batch_size // 2
        flags.append(f"--batch-size {half} --grad-accum {cfg.grad_accum * cfg.batch_size // half}")
    if cfg.resolution > 256:
        flags.append(f"--resolution {cfg.resolution // 2}")
    return flags


def out_of_memory_message(cfg, step, last_checkpoint):
    """One line: the estimated peak for cfg, the flags that lower it, the last checkpoint (step None: before
    training)."""
    flags = ", ".join(lowering_flags(cfg)) or "a GPU with more memory"
    where = "while loading the teacher or drawing data-free images" if step is None else f"at step {step + 1}"
    return (
        f"out of GPU memory {where}: this run needs about {estimated_peak_gib(cfg):.1f} GiB for an "
        f"SD1.5-size teacher at {cfg.resolution} px, batch {cfg.batch_size}, {cfg.mixed_precision}, gradient "
        f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'} (estimate); lower it with {flags}; "
        f"last checkpoint: {last_checkpoint or 'none written yet'}"
    )
