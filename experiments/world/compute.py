"""Training compute of a world run: the FLOPs of an arm's optimiser steps on the world's teacher, counted on the
trainer's own phased step (training.step.scott_backward under the arm's per-step plan) by training.memory's
count_flops, the counter of the trainer's --estimate-memory; and the steps at which an arm has spent given budgets.

A step's FLOPs depend on which parts of it run (training.step.StepPlan: the generator term on or off, the
discriminator updating or not), not on the data or the weights, so each kind of step is counted once, on random
latents and caption conditioning of the run's shapes (the teacher family's). Budgets are given in LCM-step
equivalents: b stands for b times the FLOPs of one `--mode lcm` step at the same sizes, so `lcm` spends budget b in
exactly b steps.
"""

import torch

from scott_core.schedule import training_grid
from training.loop import step_model
from training.memory import cached_conditioning, count_flops
from training.models.family import square_sizes
from training.models.teacher import load_teacher, vae_scale
from training.step import draw, scott_backward, step_plan


def kind(plan):
    """What decides a step's FLOPs, as a name: 'cd' (no adversarial part), '+gen' with the generator term, '+disc'
    with the discriminator's update ('cd+gen+disc': the full SCott step)."""
    return "cd" + ("+gen" if plan.adv_weight > 0 else "") + ("+disc" if plan.disc_update else "")


def kinds(cfg, steps):
    """The kind of each of optimiser steps 0 .. steps - 1 of cfg's run."""
    return [kind(step_plan(cfg, s)) for s in range(steps)]


def kind_flops(cfg, steps):
    """{kind: FLOPs of one optimiser step of that kind} for the kinds among cfg's first `steps` steps: scott_backward
    on grad_accum micro-batches of cfg.batch_size latents at cfg.resolution (the AdamW update is elementwise and
    counts no FLOPs)."""
    teacher = load_teacher(cfg.teacher)
    model, scale = step_model(cfg, teacher), vae_scale(teacher.vae)
    config = model.unet.config
    generator = torch.Generator().manual_seed(0)
    latent = cfg.resolution // scale
    z0 = torch.randn(cfg.batch_size, config.in_channels, latent, latent, generator=generator)
    sizes = square_sizes(cfg.resolution, cfg.resolution, cfg.batch_size)
    cond = teacher.family.conditioned(cached_conditioning(teacher, cfg.batch_size).float(), sizes)
    uncond = teacher.family.uncond(cached_conditioning(teacher, 1).float())
    plans = {kind(step_plan(cfg, s)): step_plan(cfg, s) for s in range(steps)}
    out = {}
    for key, plan in plans.items():
        draws = draw(z0, training_grid(cfg.grid_spacing), cfg, generator)
        step = lambda p=plan, d=draws: scott_backward(model, z0, cond, uncond, d, plan=p)  # noqa: E731
        out[key] = cfg.grad_accum * count_flops(step)
        model.zero_grad(set_to_none=True)
    return out


def cumulative(cfg, steps, flops):
    """[FLOPs spent after 0, 1, ..., steps optimiser steps] of cfg's run, from kind_flops' counts."""
    spent = [0]
    for key in kinds(cfg, steps):
        spent.append(spent[-1] + flops[key])
    return spent


def steps_at(spent, budgets):
    """For each budget (FLOPs) the step count whose spent FLOPs are nearest it (the earlier on a tie), at least 1."""
    return [min(range(1, len(spent)), key=lambda n: (abs(spent[n] - b), n)) for b in budgets]


def budget_steps(cfg, budgets, lcm_step, flops):
    """(The step counts at which cfg's run has spent each budget, given in LCM-step equivalents of `lcm_step`
    FLOPs; the FLOPs spent after each of them), from kind_flops(cfg, horizon(budgets)). A ValueError for a step
    cheaper than a tenth of an LCM step."""
    spent = cumulative(cfg, horizon(budgets), flops)
    if spent[-1] < max(budgets) * lcm_step:
        raise ValueError(f"{cfg.name}: a step cheaper than a tenth of an LCM step; budgets in LCM steps {budgets}")
    steps = steps_at(spent, [b * lcm_step for b in budgets])
    return steps, [spent[n] for n in steps]


def horizon(budgets):
    """How many steps budget_steps looks through: 10x the largest budget in LCM steps."""
    return 10 * int(max(budgets)) + 1
