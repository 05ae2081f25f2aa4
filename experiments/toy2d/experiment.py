"""SCott's synthetic claim (paper, Figure 4): consistency distillation from an SDE teacher vs an ODE teacher.

The data is a 2-D Gaussian mixture on the SD1.5 VP schedule and the teacher is its exact score, so only the
teacher's solver differs between arms: same seeds, data, t_n, noise, init, steps, batch and optimiser.
All arms x seeds of one mixture train side by side as one batched ensemble of small MLPs (independent
parameters, elementwise Adam: the same numbers as separate runs, several times faster on a CPU).

    python -m experiments.toy2d [--quick] [--iterations N] [--seeds S] [--output docs]
"""

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scott_core import schedule
from scott_core.consistency import consistency_function
from scott_core.sampling import sample_scott
from scott_core.solvers import solve

from .mixture import GaussianMixture

AB = schedule.alphas_cumprod()
DATASETS = {
    "ring8": lambda: GaussianMixture.ring(8, radius=1.0, std=0.05),
    "grid25": lambda: GaussianMixture.grid(5, extent=1.0, std=0.04),
}
GAMMAS = (0.0, 0.3, 0.6, 1.0)


@dataclass(frozen=True)
class Arm:
    """One teacher solver for t_n -> t_m; everything else is shared by all arms."""

    name: str
    solver: str
    noise_strength: float | None = None  # the knob of solver "noise_strength" only
    sub_steps: int = 3


ARMS = [
    Arm("ODE (DDIM eta 0)", "ddim"),
    Arm("ER-SDE 5", "er_sde_5"),
    *[Arm(f"noise_strength {s}", "noise_strength", s) for s in (0.1, 0.3, 0.6, 1.0)],
    Arm("ODE, h=1", "ddim", sub_steps=1),
    Arm("ER-SDE 5, h=1", "er_sde_5", sub_steps=1),
]
QUICK_ARMS = ARMS[:2]


class Student(nn.Module):
    """M independent students in one batched call. Each is the teacher's exact x0 plus a zero-initialised MLP
    residual on (z, teacher x0, Fourier features of t), as LCM-LoRA is the teacher plus a LoRA; the output is
    f(z, t) through scott_core's boundary condition. z [M, B, 2], t [M, B] -> [M, B, 2]."""

    def __init__(self, mixture, init_seeds, hidden=128, frequencies=6):
        super().__init__()
        self.mixture = mixture
        self.register_buffer("freqs", 2.0 ** torch.arange(frequencies) * math.pi, persistent=False)
        dims = [4 + 2 * frequencies, hidden, hidden, 2]
        layers = [self._init_layers(dims, seed) for seed in init_seeds]
        self.weights = nn.ParameterList(
            [torch.stack([ls[i][0] for ls in layers]) for i in range(len(dims) - 1)]
        )
        self.biases = nn.ParameterList(
            [torch.stack([ls[i][1] for ls in layers]) for i in range(len(dims) - 1)]
        )

    @staticmethod
    def _init_layers(dims, seed):
        """(W [in, out], b [1, out]) per layer, PyTorch's default Linear init from `seed`; last layer zero."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            linears = [nn.Linear(a, b) for a, b in zip(dims, dims[1:])]
        nn.init.zeros_(linears[-1].weight)
        nn.init.zeros_(linears[-1].bias)
        return [(lin.weight.detach().T.clone(), lin.bias.detach()[None].clone()) for lin in linears]

    def teacher_x0(self, flat_z, flat_t):
        """The teacher's clean estimate [N, 2] of z [N, 2] at t [N]: here the mixture's exact posterior mean."""
        return self.mixture.denoise(flat_z, *schedule.alpha_sigma(flat_t, AB)).float()

    def forward(self, z, t):
        flat_z, flat_t = z.reshape(-1, 2), t.reshape(-1)
        teacher_x0 = self.teacher_x0(flat_z, flat_t).reshape(z.shape)
        angles = (t.float()[..., None] / 1000) * self.freqs
        h = torch.cat([z, teacher_x0, angles.sin(), angles.cos()], -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            h = nn.functional.silu(h) if i < len(self.weights) - 1 else h
        return consistency_function(flat_z, (teacher_x0 + h).reshape(-1, 2), flat_t).reshape(z.shape)


def exact_eps(mixture):
    """The teacher: eps(z, t) from the mixture's exact posterior mean (float64 inside, float32 out)."""
    return lambda z, t: mixture.eps(z, *schedule.alpha_sigma(t, AB)).float()


def pseudo_huber(a, b, c=0.001):
    """LCM's loss, per model: mean over batch and coordinates of sqrt((a - b)^2 + c^2) - c; [M]."""
    return (((a - b) ** 2 + c**2).sqrt() - c).mean((1, 2))


def paired_draws(mixture, grid, generators, batch):
    """One draw per seed generator, stacked [S, B, ...]: data x0, t_n on the grid, z_n = alpha x0 + sigma noise."""
    x0 = torch.stack([mixture.sample(batch, g) for g in generators]).float()
    t_n = torch.stack([grid[torch.randint(len(grid), (batch,), generator=g)] for g in generators])
    noise = torch.stack([torch.randn(batch, 2, generator=g) for g in generators])
    alpha, sigma = (v.float().reshape(len(generators), batch, 1) for v in schedule.alpha_sigma(t_n, AB))
    return x0, t_n, alpha * x0 + sigma * noise


def distill(mixture, arms, seeds, iterations, batch=512, lr=1e-3, ema_decay=0.95, span=24, spacing=8):
    """Consistency distillation of len(arms) x len(seeds) students from the exact teacher; model a * S + s
    uses arm a and seed s (its init, data, t_n, noise; solver noise is shared across arms). Returns the EMA
    target."""
    A, S = len(arms), len(seeds)
    student = Student(mixture, [s for _ in arms for s in seeds])
    target = copy.deepcopy(student).requires_grad_(False)
    optimiser = torch.optim.Adam(student.parameters(), lr=lr)
    grid, teacher = schedule.training_grid(spacing), exact_eps(mixture)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    for it in range(iterations):
        _, t_n, z_n = paired_draws(mixture, grid, generators, batch)
        t_m = schedule.skip_timestep(t_n, span)
        with torch.no_grad():
            z_m = torch.stack(
                [
                    solve(
                        teacher,
                        z_n.reshape(-1, 2),
                        t_n.reshape(-1),
                        t_m.reshape(-1),
                        AB,
                        arm.solver,
                        arm.sub_steps,
                        noise_strength=arm.noise_strength,
                        generator=torch.Generator().manual_seed(1_000_003 * seeds[0] + it),
                    )
                    for arm in arms
                ]
            )
            f_target = target(z_m.reshape(A * S, batch, 2), t_m.repeat(A, 1))
        f_student = student(z_n.repeat(A, 1, 1), t_n.repeat(A, 1))
        loss = pseudo_huber(f_student, f_target).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(target.parameters()), list(student.parameters()), 1 - ema_decay)
    return target


@torch.no_grad()
def sample_students(model, arms, seeds, n, steps, gamma=1.0):
    """n samples per model in `steps` SCott sampler steps on LCM's grid; start and re-noise noise depend on
    the seed only, so all arms see the same noise. Returns float64 [A, S, n, 2]."""
    A, S = len(arms), len(seeds)
    generator = torch.Generator().manual_seed(10_000 + seeds[0] + 100 * steps)

    def noise_sampler(*_):
        return torch.randn(1, S, n, 2, generator=generator).expand(A, S, n, 2).reshape(-1, 2)

    def denoiser(z, t):
        return model(z.reshape(A * S, n, 2), t.reshape(A * S, n)).reshape(-1, 2)

    timesteps = schedule.lcm_timesteps(steps)
    x0 = sample_scott(denoiser, noise_sampler(), timesteps, AB, gamma=gamma, noise_sampler=noise_sampler)
    return x0.double().reshape(A, S, n, 2)


@torch.no_grad()
def sample_teacher(mixture, n, seed, steps=50):
    """The teacher's own deterministic samples: `steps` DDIM (ODE) steps from t = 999 to 0, then E[x0 | z]."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = solve(lambda z, t: mixture.eps(z, *schedule.alpha_sigma(t, AB)), z, 999, 0, AB, "ddim", steps)
    return mixture.denoise(z, *schedule.alpha_sigma(0, AB))


def sliced_w2(a, b, projections=256, seed=0):
    """Sliced Wasserstein-2 between equal-size sample sets: RMS over random unit directions of 1-D W2."""
    directions = torch.randn(
        projections, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    directions = directions / directions.norm(dim=1, keepdim=True)
    pa, pb = (a.double() @ directions.T).sort(0).values, (b.double() @ directions.T).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mode_coverage(samples, mixture):
    """Share of modes holding at least half their fair mass; a sample counts for its nearest mode if within a
    third of the distance from that mode to its nearest other mode."""
    spacing = torch.cdist(mixture.means, mixture.means).fill_diagonal_(math.inf).min(1).values
    d = (samples[:, None, :].double() - mixture.means[None]).norm(dim=-1)
    nearest = d.argmin(1)
    near = d.gather(1, nearest[:, None])[:, 0] <= spacing[nearest] / 3
    counts = torch.bincount(nearest[near], minlength=len(mixture.means)).double()
    return float((counts >= 0.5 * mixture.weights * len(samples)).double().mean())


def stratified_sample(mixture, n, generator):
    """n exact samples, each mode's count fixed at the floor of its fair share, the rest drawn (a
    lower-variance SW2 reference than i.i.d. samples)."""
    k = torch.repeat_interleave(torch.arange(len(mixture.weights)), (mixture.weights * n).floor().long())
    if len(k) < n:
        k = torch.cat(
            [k, torch.multinomial(mixture.weights, n - len(k), replacement=True, generator=generator)]
        )
    noise = torch.randn(len(k), 2, generator=generator, dtype=torch.float64)
    return mixture.means[k] + mixture.stds[k, None] * noise


def metrics(samples, mixture, seed):
    """SW2 to fresh exact (stratified) samples, and mode coverage."""
    exact = stratified_sample(mixture, len(samples), torch.Generator().manual_seed(20_000 + seed))
    return {"sw2": sliced_w2(samples, exact), "coverage": mode_coverage(samples, mixture)}


def mean_std(values):
    """(mean, sample std) of a list of floats; std 0 for one value."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def evaluate(model, mixture, arms, seeds, n, steps, gamma=1.0):
    """{arm name: [metrics per seed]} at `steps` sampling steps and `gamma`."""
    samples = sample_students(model, arms, seeds, n, steps, gamma)
    return {
        arm.name: [metrics(samples[a, i], mixture, s) for i, s in enumerate(seeds)]
        for a, arm in enumerate(arms)
    }


def run(arms, datasets, seeds, iterations, step_counts=(1, 2, 4), n_eval=10000, gammas=GAMMAS):
    """Train every arm x seed per mixture and evaluate: {(data, row, steps, gamma): [metrics]}, scatter."""
    results, scatter = {}, {}
    for data_name in datasets:
        started, mixture = time.time(), DATASETS[data_name]()
        exact = [mixture.sample(n_eval, torch.Generator().manual_seed(s)) for s in seeds]
        results[(data_name, "exact samples (SW2 floor)", 0, 1.0)] = [
            metrics(x, mixture, s) for x, s in zip(exact, seeds)
        ]
        results[(data_name, "teacher, 50-step ODE", 50, 1.0)] = [
            metrics(sample_teacher(mixture, n_eval, s), mixture, s) for s in seeds
        ]
        untrained = evaluate(Student(mixture, seeds), mixture, arms[:1], seeds, n_eval, 2)
        results[(data_name, "untrained student (teacher x0)", 2, 1.0)] = untrained[arms[0].name]
        model = distill(mixture, arms, seeds, iterations)
        for steps in step_counts:
            for name, rows in evaluate(model, mixture, arms, seeds, n_eval, steps).items():
                results[(data_name, name, steps, 1.0)] = rows
        sweep = gamma_sweep_arms(results, data_name, arms)
        for gamma in gammas[:-1]:
            for steps in (2, 4):
                rows = evaluate(model, mixture, arms, seeds, n_eval, steps, gamma)
                results.update({(data_name, arm, steps, gamma): rows[arm] for arm in sweep})
        samples = sample_students(model, arms, seeds, 2048, 2)
        scatter[(data_name, "exact")] = mixture.sample(2048, torch.Generator().manual_seed(0))
        scatter.update({(data_name, arm.name): samples[a, 0] for a, arm in enumerate(arms)})
        print(
            f"{data_name}: {len(arms)} arms x {len(seeds)} seeds x {iterations} iterations trained and "
            f"evaluated in {time.time() - started:.0f} s",
            flush=True,
        )
    return results, scatter


def gamma_sweep_arms(results, data_name, arms):
    """The arm with the best mean 2-step SW2 at gamma = 1, plus the ODE arm (or the best stochastic arm if the
    ODE arm is best), so that the sweep compares a stochastic teacher with the deterministic one."""
    by_sw2 = sorted(arms, key=lambda a: mean_std([r["sw2"] for r in results[(data_name, a.name, 2, 1.0)]])[0])
    best = by_sw2[0]
    other = (
        next(a for a in by_sw2 if (a.solver == "ddim") != (best.solver == "ddim")) if len(arms) > 1 else best
    )
    return list(dict.fromkeys([best.name, other.name]))


def table(results):
    """Markdown: one row per (data, row, gamma, steps): SW2 and mode coverage, mean +- std over seeds."""
    order = {
        name: i
        for i, name in enumerate(
            [
                "exact samples (SW2 floor)",
                "teacher, 50-step ODE",
                "untrained student (teacher x0)",
                *(a.name for a in ARMS),
            ]
        )
    }
    keys = sorted(results, key=lambda k: (k[0], k[3] != 1.0, order.get(k[1], 99), -k[3], k[2]))
    lines = [
        "| data | teacher / arm | gamma | steps | SW2 (lower is better) | mode coverage |",
        "|---|---|---|---|---|---|",
    ]
    for d, a, steps, g in keys:
        rows = results[(d, a, steps, g)]
        sw, sw_sd = mean_std([r["sw2"] for r in rows])
        cov, cov_sd = mean_std([r["coverage"] for r in rows])
        lines.append(
            f"| {d} | {a} | {g:g} | {steps or '-'} | {sw:.4f} +- {sw_sd:.4f} | {cov:.3f} +- {cov_sd:.3f} |"
        )
    return "\n".join(lines)


def figure(results, scatter, path):
    """Per mixture: exact samples, 2-step samples of each arm (seed 0), and SW2 vs sampling steps per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(d for d, _ in scatter))
    arms = [a for a in dict.fromkeys(a for d, a in scatter if d == datasets[0]) if a != "exact"]
    cols = len(arms) + 2
    fig, axes = plt.subplots(len(datasets), cols, figsize=(2.0 * cols, 2.2 * len(datasets)), squeeze=False)
    for row, d in enumerate(datasets):
        for col, a in enumerate(["exact", *arms]):
            pts = scatter[(d, a)]
            axes[row, col].scatter(pts[:, 0], pts[:, 1], s=0.3, alpha=0.4)
            axes[row, col].set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), xticks=[], yticks=[], aspect="equal")
            axes[row, col].set_title(
                ("exact" if a == "exact" else f"{a}, 2 steps") if row == 0 else "", fontsize=6
            )
        axes[row, 0].set_ylabel(d)
        ax = axes[row, -1]
        for a in arms:
            means = [mean_std([r["sw2"] for r in results[(d, a, s, 1.0)]])[0] for s in (1, 2, 4)]
            ax.plot([1, 2, 4], means, marker="o", ms=3, lw=1, ls="-" if "h=1" not in a else "--", label=a)
        teacher = mean_std([r["sw2"] for r in results[(d, "teacher, 50-step ODE", 50, 1.0)]])[0]
        ax.axhline(teacher, color="k", lw=0.8, ls=":", label="teacher, 50-step ODE")
        ax.set(xlabel="sampling steps", ylabel="SW2", xticks=[1, 2, 4], yscale="log")
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(results):
    """{"metric": "sw2_mean", data: {row: {steps: mean SW2}}} at gamma = 1."""
    out = {"metric": "sliced W2 to exact samples, mean over seeds, gamma = 1"}
    for (d, a, steps, g), rows in results.items():
        if g == 1.0:
            out.setdefault(d, {}).setdefault(a, {})[str(steps)] = round(
                mean_std([r["sw2"] for r in rows])[0], 5
            )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.toy2d", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="ODE vs ER-SDE 5, ring8, 1 seed, 800 iterations")
    parser.add_argument(
        "--iterations", type=int, default=None, help="training iterations per arm (default 3000)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3)")
    parser.add_argument("--output", default="docs", help="folder for toy2d.md and toy2d.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    iterations = args.iterations or (800 if args.quick else 3000)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    arms, datasets = (QUICK_ARMS, ["ring8"]) if args.quick else (ARMS, list(DATASETS))
    results, scatter = run(arms, datasets, seeds, iterations, gammas=(1.0,) if args.quick else GAMMAS)
    output, name = Path(args.output), "toy2d_quick" if args.quick else "toy2d"
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.md").write_text(f"{table(results)}\n")
    figure(results, scatter, output / f"{name}.png")
    print(table(results))
    print(f"total {time.time() - started:.0f} s; wrote {output / name}.md and .png", flush=True)
    print(json.dumps(summary(results)))
    return results


if __name__ == "__main__":
    main()
