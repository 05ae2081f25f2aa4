"""toy2d where Theorem 1 can apply: consistency distillation from *learned* (imperfect) teachers.

The exact-score toy (experiments.toy2d) has no teacher error for a better solver to remove. Here the
teachers are eps-MLPs trained by denoising score matching on the SD1.5 VP schedule (an under-trained and a
well-trained budget) plus a controlled-error teacher (the exact score of a mixture whose modes sit `radius_scale`
further out with stds scaled by `std_scale`).

Step 0, the paper's premise: sample each teacher with ODE and SDE solvers chained over the distillation hops
(span 24 or 120 timesteps, h sub-steps each, t = 999 -> 0) and with 1000 steps; is the SDE the better sampler?
Step 1: distil students from each teacher with ODE / ER-SDE 5 / noise_strength teachers, h = 1 and 3, span 24 and
120, with and without a hinge discriminator; arms paired by seed (same data, t_n, noise, init). The student's input
feature is the learned teacher's x0, never the exact posterior mean.

    python -m experiments.toy2d.learned [--quick] [--iterations N] [--seeds S] [--output docs]
"""

import argparse
import copy
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from experiments.toy2d.experiment import (
    AB,
    DATASETS,
    Student,
    mean_std,
    mode_coverage,
    paired_draws,
    pseudo_huber,
    sample_students,
    stratified_sample,
)
from experiments.toy2d.mixture import GaussianMixture
from scott_core import schedule
from scott_core.consistency import x0_from_eps
from scott_core.solvers import solve

STEP_COUNTS = (1, 2, 4)


@dataclass(frozen=True)
class Arm:
    """One distillation arm: the teacher's solver over t_n -> t_n - span in `sub_steps`, and the adversarial term."""

    name: str
    solver: str
    noise_strength: float = 0.0
    sub_steps: int = 3
    span: int = 24
    adversarial: bool = False

    def solve_kwargs(self):
        """solve()'s solver arguments; the noise_strength knob only for the solver that reads it."""
        extra = {"noise_strength": self.noise_strength} if self.solver == "noise_strength" else {}
        return {"solver": self.solver, "sub_steps": self.sub_steps, **extra}

    def reference(self):
        """The ODE arm this arm is compared with: same h, span and adversarial term; the base ODE for ODE arms."""
        if self.solver == "ode":
            return ARMS[0].name
        return next(a.name for a in ARMS if a.solver == "ode" and (a.sub_steps, a.span, a.adversarial) == (
            self.sub_steps, self.span, self.adversarial))


ARMS = [
    Arm("ODE", "ode"),
    Arm("ER-SDE 5", "er_sde_5"),
    Arm("noise_strength 0.1", "noise_strength", 0.1),
    Arm("ODE, span 120", "ode", span=120),
    Arm("ER-SDE 5, span 120", "er_sde_5", span=120),
    Arm("ODE, span 120, h=1", "ode", sub_steps=1, span=120),
    Arm("ER-SDE 5, span 120, h=1", "er_sde_5", sub_steps=1, span=120),
    Arm("ODE + adv", "ode", adversarial=True),
    Arm("ER-SDE 5 + adv", "er_sde_5", adversarial=True),
]
QUICK_ARMS = ARMS[:2]
ADV_WEIGHT = 0.05  # puts the adversarial gradient at the student's output at ~0.2-0.3x the consistency gradient
BUDGETS = [("under-trained (1000 it)", 1000), ("well-trained (6000 it)", 6000), ("controlled", None)]
QUICK_BUDGETS = [("under-trained (60 it)", 60), ("well-trained (800 it)", 800), ("controlled", None)]

# Step 0 samplers: (name, solve kwargs); hop structures: (name, span, sub-steps per hop); None = 1000 steps.
SAMPLERS = [
    ("ODE", {"solver": "ode"}),
    ("ER-SDE 5", {"solver": "er_sde_5"}),
    ("noise_strength 0.1", {"solver": "noise_strength", "noise_strength": 0.1}),
    ("noise_strength 0.3", {"solver": "noise_strength", "noise_strength": 0.3}),
    ("SDE", {"solver": "sde"}),
]
HOPS = [("span 24, h=1", 24, 1), ("span 24, h=3", 24, 3), ("span 120, h=1", 120, 1), ("span 120, h=3", 120, 3),
        ("1000 steps", None, 1000)]


def sliced_w2(a, b, projections=256, seed=0):
    """toy2d.sliced_w2 (same directions, same value), sorting contiguous rows: several times faster on a CPU."""
    directions = torch.randn(projections, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    pa, pb = ((x.double() @ directions.T).T.contiguous().sort(1).values for x in (a, b))
    return float(((pa - pb) ** 2).mean().sqrt())


def metrics(samples, mixture, seed):
    """toy2d.metrics with the faster sliced_w2: SW2 to fresh exact (stratified) samples, and mode coverage."""
    exact = stratified_sample(mixture, len(samples), torch.Generator().manual_seed(20_000 + seed))
    return {"sw2": sliced_w2(samples, exact), "coverage": mode_coverage(samples, mixture)}


def fourier(t, frequencies=6):
    """sin / cos of t / 1000 at 2^k pi, k < frequencies: [..., 2 * frequencies]."""
    angles = (t.float()[..., None] / 1000) * (2.0 ** torch.arange(frequencies) * math.pi)
    return torch.cat([angles.sin(), angles.cos()], -1)


class EpsMLP(nn.Module):
    """A learned teacher eps(z, t): MLP on (z, Fourier features of t). z [B, 2], t [B] -> float32 [B, 2]."""

    def __init__(self, hidden=128, depth=3, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            dims = [2 + 12] + [hidden] * depth
            layers = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.SiLU())]
            self.net = nn.Sequential(*layers, nn.Linear(hidden, 2))

    def forward(self, z, t):
        return self.net(torch.cat([z.float(), fourier(torch.as_tensor(t).expand(z.shape[0]))], -1))


def train_teacher(mixture, iterations, batch=1024, lr=2e-3, seed=0):
    """Denoising score matching on SD1.5's VP schedule, t uniform in 0..999, cosine lr decay; returns the net."""
    net = EpsMLP(seed=seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(iterations, 1), eta_min=lr * 0.01)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        x0 = mixture.sample(batch, generator).float()
        t = torch.randint(1000, (batch,), generator=generator)
        noise = torch.randn(batch, 2, generator=generator)
        alpha, sigma = (v.float()[:, None] for v in schedule.alpha_sigma(t, AB))
        loss = ((net(alpha * x0 + sigma * noise, t) - noise) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        decay.step()
    return net.requires_grad_(False).eval()


def perturbed(mixture, radius_scale=1.1, std_scale=1.5):
    """The controlled-error teacher's mixture: means scaled by radius_scale about the origin, stds by std_scale."""
    return GaussianMixture(mixture.means * radius_scale, mixture.stds * std_scale, mixture.weights)


def exact_eps_fn(mixture):
    """eps(z, t) of a mixture's exact score, float32 out."""
    return lambda z, t: mixture.eps(z, *schedule.alpha_sigma(t, AB)).float()


def teacher_x0(eps_fn, z, t):
    """The teacher's clean estimate x0 = (z - sigma eps) / alpha at per-sample t [B]."""
    alpha, sigma = (v.float() for v in schedule.alpha_sigma(t, AB))
    return x0_from_eps(z.float(), eps_fn(z.float(), t), alpha, sigma)


CONTROLLED = (1.1, 1.5)


TEACHER_KINDS = ("under-trained", "well-trained", "controlled")


def teacher_specs(budgets, controlled=CONTROLLED):
    """[(name, iterations or None)]: the budgets, ("controlled", None) renamed after its perturbation."""
    name = f"controlled (radius x{controlled[0]}, std x{controlled[1]})"
    return [(name, None) if b[0] == "controlled" else b for b in budgets]


def make_teacher(mixture, iterations, controlled=CONTROLLED):
    """A DSM-trained eps-MLP at `iterations`, or (None) the exact eps of the perturbed mixture."""
    if iterations is None:
        return exact_eps_fn(perturbed(mixture, *controlled))
    return train_teacher(mixture, iterations)


@torch.no_grad()
def eps_rmse(eps_fn, mixture, bands=((0, 100), (100, 400), (400, 700), (700, 1000)), n=4096, seed=0):
    """RMS of eps_fn - exact eps on the forward process, per timestep band {"lo-hi": rmse}."""
    generator, out = torch.Generator().manual_seed(seed), {}
    for lo, hi in bands:
        t = torch.randint(lo, hi, (n,), generator=generator)
        x0, noise = mixture.sample(n, generator).float(), torch.randn(n, 2, generator=generator)
        alpha, sigma = (v.float()[:, None] for v in schedule.alpha_sigma(t, AB))
        z = alpha * x0 + sigma * noise
        err = eps_fn(z, t) - mixture.eps(z, *schedule.alpha_sigma(t, AB)).float()
        out[f"{lo}-{hi - 1}"] = float(err.pow(2).mean().sqrt())
    return out


def hop_times(span):
    """The distillation hop chain 999 -> 999 - span -> ... -> 0 (skip_timestep clamps the last hop at 0)."""
    times = [999]
    while times[-1] > 0:
        times.append(int(schedule.skip_timestep(times[-1], span)))
    return times


@torch.no_grad()
def sample_teacher(eps_fn, n, seed, span, sub_steps, solver_kwargs):
    """Sample a teacher from pure noise at t = 999 by chained hops of `span` (None: one 999 -> 0 solve) in
    `sub_steps` each, then x0 at t = 0. Start noise depends on the seed only; float64 [n, 2]."""
    generator = torch.Generator().manual_seed(30_000 + seed)
    z = torch.randn(n, 2, generator=generator)
    times = [999, 0] if span is None else hop_times(span)
    for t_n, t_m in zip(times, times[1:]):
        z = solve(eps_fn, z, t_n, t_m, AB, sub_steps=sub_steps, generator=generator, **solver_kwargs)
    return teacher_x0(eps_fn, z, torch.zeros(n)).double()


def step0(eps_fn, mixture, seeds, n, hops=HOPS, samplers=SAMPLERS):
    """{(hop name, sampler name): [metrics per seed]} of the teacher's own samples vs exact samples."""
    return {
        (hop, sampler): [metrics(sample_teacher(eps_fn, n, s, span, h, kw), mixture, s) for s in seeds]
        for hop, span, h in hops
        for sampler, kw in samplers
    }


class LearnedStudent(Student):
    """toy2d's batched students, fed the learned teacher's x0 (not the exact posterior mean) as input feature."""

    def __init__(self, eps_fn, init_seeds, hidden=128):
        super().__init__(None, init_seeds, hidden)
        self.eps_fn = lambda z, t: eps_fn(z, t)  # a plain function: the teacher's weights stay out of parameters()

    def teacher_x0(self, flat_z, flat_t):
        """The learned teacher's clean estimate (no grad): the student's input feature."""
        with torch.no_grad():
            return teacher_x0(self.eps_fn, flat_z, flat_t)


class Discriminators(nn.Module):
    """M independent t-conditioned MLP discriminators in one batched call: x [M, B, 2], t [M, B] -> [M, B]."""

    def __init__(self, init_seeds, hidden=128):
        super().__init__()
        dims = [2 + 12, hidden, hidden, 1]
        layers = [self._init(dims, 50_000 + s) for s in init_seeds]
        self.weights = nn.ParameterList([torch.stack([ls[i][0] for ls in layers]) for i in range(3)])
        self.biases = nn.ParameterList([torch.stack([ls[i][1] for ls in layers]) for i in range(3)])

    @staticmethod
    def _init(dims, seed):
        """PyTorch's default Linear init from `seed`, as (W [in, out], b [1, out]) per layer."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            linears = [nn.Linear(a, b) for a, b in zip(dims, dims[1:])]
        return [(lin.weight.detach().T.clone(), lin.bias.detach()[None].clone()) for lin in linears]

    def forward(self, x, t):
        h = torch.cat([x.float(), fourier(t)], -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            h = nn.functional.silu(h) if i < len(self.weights) - 1 else h
        return h[..., 0]


def hinge(real, fake):
    """Per-model hinge loss of the discriminator: mean relu(1 - D(real)) + mean relu(1 + D(fake)); [M]."""
    return torch.relu(1 - real).mean(1) + torch.relu(1 + fake).mean(1)


def distill(eps_fn, mixture, arms, seeds, iterations, batch=256, lr=1e-3, ema_decay=0.95, spacing=8,
            adv_weight=None, disc_lr=1e-3, log=None):
    """Consistency distillation of len(arms) x len(seeds) students from the teacher eps_fn; model a * S + s uses
    arm a and seed s (init, data, t_n, noise; solver noise is shared across arms). Returns the EMA target."""
    A, S, adv_weight = len(arms), len(seeds), ADV_WEIGHT if adv_weight is None else adv_weight
    student = LearnedStudent(eps_fn, [s for _ in arms for s in seeds])
    target = copy.deepcopy(student).requires_grad_(False)
    optimiser = torch.optim.Adam(student.parameters(), lr=lr)
    adv = [a * S + i for a, arm in enumerate(arms) if arm.adversarial for i in range(S)]
    disc = Discriminators([seeds[i % S] for i in adv]) if adv else None
    disc_opt = torch.optim.Adam(disc.parameters(), lr=disc_lr, betas=(0.5, 0.999)) if adv else None
    grid = schedule.training_grid(spacing)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    for it in range(iterations):
        x0, t_n, z_n = paired_draws(mixture, grid, generators, batch)
        t_m = torch.cat([schedule.skip_timestep(t_n, arm.span) for arm in arms])
        with torch.no_grad():
            z_m = torch.stack([
                solve(eps_fn, z_n.reshape(-1, 2), t_n.reshape(-1), t_m[a * S:(a + 1) * S].reshape(-1), AB,
                      generator=torch.Generator().manual_seed(1_000_003 * seeds[0] + it), **arm.solve_kwargs())
                for a, arm in enumerate(arms)
            ])
            f_target = target(z_m.reshape(A * S, batch, 2), t_m)
        f_student = student(z_n.repeat(A, 1, 1), t_n.repeat(A, 1))
        cd = pseudo_huber(f_student, f_target)
        loss = cd.sum()
        if adv:
            d_fake = disc(f_student[adv], t_n.repeat(A, 1)[adv])
            loss = loss + adv_weight * -d_fake.mean(1).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if adv:
            d_loss = hinge(disc(x0.repeat(A, 1, 1)[adv], t_n.repeat(A, 1)[adv]),
                           disc(f_student[adv].detach(), t_n.repeat(A, 1)[adv]))
            disc_opt.zero_grad()
            d_loss.sum().backward()
            disc_opt.step()
            if log is not None and (it + 1) % max(iterations // 5, 1) == 0:
                log.append({"iteration": it + 1, "cd": float(cd.detach()[adv].mean()),
                            "hinge": float(d_loss.detach().mean()),
                            "grad_ratio": adv_grad_ratio(student, disc, z_n, t_n, f_target, adv, adv_weight, A)})
        with torch.no_grad():
            torch._foreach_lerp_(list(target.parameters()), list(student.parameters()), 1 - ema_decay)
    return target


def adv_grad_ratio(student, disc, z_n, t_n, f_target, adv, adv_weight, A):
    """Mean over adversarial models of |grad of the weighted adversarial term| / |grad of the CD loss| at the
    student's output."""
    f = student(z_n.repeat(A, 1, 1), t_n.repeat(A, 1))[adv].detach().requires_grad_(True)
    (g_cd,) = torch.autograd.grad(pseudo_huber(f, f_target[adv]).sum(), f)
    (g_adv,) = torch.autograd.grad(adv_weight * -disc(f, t_n.repeat(A, 1)[adv]).mean(1).sum(), f)
    return float((g_adv.flatten(1).norm(dim=1) / g_cd.flatten(1).norm(dim=1)).mean())


def evaluate(model, mixture, arms, seeds, n, step_counts=STEP_COUNTS):
    """{(arm name, steps): [metrics per seed]} with toy2d's SCott sampler (gamma 1, paired noise)."""
    out = {}
    for steps in step_counts:
        samples = sample_students(model, arms, seeds, n, steps)
        for a, arm in enumerate(arms):
            out[(arm.name, steps)] = [metrics(samples[a, i], mixture, s) for i, s in enumerate(seeds)]
    return out


def paired(rows, ref_rows, key):
    """(mean, standard error) of the per-seed difference rows[key] - ref_rows[key]; SE 0 for one seed."""
    d = torch.tensor([r[key] - q[key] for r, q in zip(rows, ref_rows)], dtype=torch.float64)
    return float(d.mean()), float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0


def teacher_job(data_name, name, budget, arms, seeds, iterations, n_eval, n_step0, hops, samplers, adv_weight,
                parts=None):
    """One teacher of one mixture: train it, its eps error, step 0 and step 1; a JSON-ready partial result, also
    written to `parts`/DATA__TEACHER.json (after step 0 with "step1" missing, then whole) when `parts` is given."""
    torch.set_num_threads(1)
    started, cpu, mixture = time.time(), time.process_time(), DATASETS[data_name]()
    eps_fn = make_teacher(mixture, budget)
    part = _load_part(parts, data_name, name)
    if part is None:
        part = {"data": data_name, "name": name,
                "teacher": {"iterations": budget, "eps_rmse": eps_rmse(eps_fn, mixture)}}
        s0 = step0(eps_fn, mixture, seeds, n_step0, hops, samplers)
        part["step0"] = {f"{hop} | {sampler}": _summ(r) | {"per_seed": r} for (hop, sampler), r in s0.items()}
        part["wall_s"] = {"teacher + step0": round(time.time() - started),
                          "cpu teacher + step0": round(time.process_time() - cpu)}
        _save_part(parts, part)
    else:  # resumed: the teacher was retrained from the same seed; record its error to show it is the same net
        part["teacher"]["eps_rmse_resumed"] = eps_rmse(eps_fn, mixture)
    log = []
    model = distill(eps_fn, mixture, arms, seeds, iterations, adv_weight=adv_weight, log=log)
    rows = evaluate(model, mixture, arms, seeds, n_eval)
    samples = sample_students(model, arms, seeds, 2048, 2)
    part |= {"step1": step1_table(rows, arms), "adv_log": log,
             "scatter": {a.name: samples[i, 0].tolist() for i, a in enumerate(arms)}}
    part["wall_s"] |= {"step1": round(time.time() - started), "cpu step1": round(time.process_time() - cpu)}
    _save_part(parts, part)
    print(f"{data_name} / {name}: {part['wall_s']} s", flush=True)
    return part


def _part_path(parts, data_name, name):
    """parts/DATA__TEACHER.json."""
    return Path(parts) / f"{data_name}__{''.join(c if c.isalnum() else '_' for c in name)}.json"


def _load_part(parts, data_name, name):
    """A finished step 0 of this job from an earlier run (the run resumes after it), else None."""
    path = None if parts is None else _part_path(parts, data_name, name)
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _save_part(parts, part):
    """Write one job's result to parts/DATA__TEACHER.json (no-op without a folder)."""
    if parts is not None:
        Path(parts).mkdir(parents=True, exist_ok=True)
        _part_path(parts, part["data"], part["name"]).write_text(json.dumps(part))


def assemble(parts, n_floor=3000, seeds=(0, 1, 2)):
    """The run's dict from job results (those with a step 1 only in "step1"), plus each mixture's SW2 floor."""
    out = {k: {} for k in ("teachers", "step0", "step1", "adv_log", "wall_s", "scatter")}
    for d in dict.fromkeys(p["data"] for p in parts):
        mixture = DATASETS[d]()
        floor = [metrics(mixture.sample(n_floor, torch.Generator().manual_seed(s)), mixture, s)["sw2"] for s in seeds]
        out["teachers"][d] = {"exact samples (SW2 floor)": {"sw2": list(mean_std(floor))}}
    for part in parts:
        d, name = part["data"], part["name"]
        out["teachers"][d][name] = part["teacher"]
        for key in ("step0", "step1", "adv_log", "wall_s", "scatter"):
            if key in part:
                out[key].setdefault(d, {})[name] = part[key]
    return out


def run(datasets, budgets, arms, seeds, iterations, n_eval, n_step0, hops=HOPS, samplers=SAMPLERS, jobs=1,
        adv_weight=ADV_WEIGHT, parts=None):
    """Every (mixture, teacher) job, `jobs` at a time in spawned processes: a JSON-ready dict."""
    tasks = [(d, name, budget) for d in datasets for name, budget in teacher_specs(budgets)]
    args = (arms, seeds, iterations, n_eval, n_step0, hops, samplers, adv_weight, parts)
    if jobs > 1:
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        with pool:
            results = list(pool.map(teacher_job, *zip(*[(*t, *args) for t in tasks])))
    else:
        results = [teacher_job(*t, *args) for t in tasks]
    return assemble(results, n_step0, seeds)


def _summ(rows):
    """{metric: [mean, std]} over seeds."""
    return {k: list(mean_std([r[k] for r in rows])) for k in ("sw2", "coverage")}


def step1_table(rows, arms):
    """{arm: {steps: {sw2, coverage: [mean, std], d_sw2, d_coverage: [paired difference to ref, SE], ref, ...}}}."""
    names = {a.name for a in arms}
    out = {}
    for arm in arms:
        ref = arm.reference() if arm.reference() in names else arms[0].name
        for steps in STEP_COUNTS:
            r, q = rows[(arm.name, steps)], rows[(ref, steps)]
            out.setdefault(arm.name, {})[str(steps)] = _summ(r) | {
                "ref": ref, "d_sw2": list(paired(r, q, "sw2")), "d_coverage": list(paired(r, q, "coverage")),
                "per_seed": r}
    return out


def step0_paired(table, hop, sampler, ref="ODE"):
    """(mean, SE) of the per-seed SW2 difference sampler - ref on one hop structure of a step-0 table."""
    return paired(table[f"{hop} | {sampler}"]["per_seed"], table[f"{hop} | {ref}"]["per_seed"], "sw2")


def compact(out, data, teacher):
    """One line per arm: SW2 at 1 / 2 / 4 steps with the paired difference to its reference arm, and coverage."""
    lines = ["| arm (vs ref) | 1 step | 2 steps | 4 steps | coverage 1 / 2 / 4 |", "|---|---|---|---|---|"]
    for arm, by_steps in out["step1"][data][teacher].items():
        cells = []
        for steps in ("1", "2", "4"):
            r = by_steps[steps]
            d = "" if r["ref"] == arm else f" ({r['d_sw2'][0]:+.3f} +- {r['d_sw2'][1]:.3f}{real(r['d_sw2'])})"
            cells.append(f"{r['sw2'][0]:.3f}{d}")
        ref = "" if by_steps["1"]["ref"] == arm else f" (vs {by_steps['1']['ref']})"
        cov = " / ".join(f"{by_steps[k]['coverage'][0]:.2f}" for k in ("1", "2", "4"))
        lines.append(f"| {arm}{ref} | " + " | ".join(cells) + f" | {cov} |")
    return "\n".join(lines)


def real(diff):
    """'*' where |mean| exceeds 2 standard errors (and the SE is defined)."""
    return "*" if diff[1] > 0 and abs(diff[0]) > 2 * diff[1] else ""


def markdown(out):
    """The report's tables: teachers, step 0, step 1 with paired differences."""
    lines = []
    for data, teachers in out["teachers"].items():
        lines += [f"### {data}: teachers", "", "| teacher | eps RMSE vs exact, t 0-99 / 100-399 / 400-699 / "
                  "700-999 |", "|---|---|"]
        for name, t in teachers.items():
            if "eps_rmse" in t:
                lines.append(f"| {name} | {' / '.join(f'{v:.3f}' for v in t['eps_rmse'].values())} |")
        floor = teachers["exact samples (SW2 floor)"]["sw2"]
        lines += ["", f"SW2 floor (i.i.d. exact samples vs stratified exact samples): {floor[0]:.4f} +- "
                  f"{floor[1]:.4f}", ""]
        lines += [f"### {data}: step 0, each teacher sampled by each solver (SW2 to exact samples / coverage; "
                  "mean +- std over sampling seeds)", ""]
        for name, table in out["step0"][data].items():
            hops = list(dict.fromkeys(k.split(" | ")[0] for k in table))
            samplers = list(dict.fromkeys(k.split(" | ")[1] for k in table))
            lines += [f"**{name}**", "", "| sampler | " + " | ".join(hops) + " |", "|---" * (len(hops) + 1) + "|"]
            for s in samplers:
                cells = [f"{table[f'{h} | {s}']['sw2'][0]:.4f} +- {table[f'{h} | {s}']['sw2'][1]:.4f} / "
                         f"{table[f'{h} | {s}']['coverage'][0]:.2f}" for h in hops]
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
            lines += ["", f"{name}: paired difference in SW2 to the ODE on the same hops (same start noise), "
                      "mean +- SE", "", "| sampler | " + " | ".join(hops) + " |", "|---" * (len(hops) + 1) + "|"]
            for s in samplers[1:]:
                cells = [step0_paired(table, h, s) for h in hops]
                diffs = " | ".join(f"{d[0]:+.4f} +- {d[1]:.4f}{real(d)}" for d in cells)
                lines.append(f"| {s} - ODE | {diffs} |")
            lines.append("")
        lines += [f"### {data}: step 1, distilled students (mean +- std over seeds; d = paired difference to the "
                  "reference arm +- standard error; * = |d| > 2 SE)", ""]
        for name in out["step1"].get(data, {}):
            lines += [f"**teacher: {name}** (SW2 mean over seeds, paired difference to the reference +- SE)", "",
                      compact(out, data, name), ""]
        for name, table in out["step1"].get(data, {}).items():
            lines += [f"**teacher: {name}**, in full", "",
                      "| arm | ref | steps | SW2 | d SW2 | coverage | d coverage |", "|---|---|---|---|---|---|---|"]
            for arm, by_steps in table.items():
                for steps, r in by_steps.items():
                    ref = "-" if r["ref"] == arm else r["ref"]
                    d_sw2 = "-" if ref == "-" else f"{r['d_sw2'][0]:+.4f} +- {r['d_sw2'][1]:.4f}{real(r['d_sw2'])}"
                    d_cov = "-" if ref == "-" else (f"{r['d_coverage'][0]:+.3f} +- {r['d_coverage'][1]:.3f}"
                                                    f"{real(r['d_coverage'])}")
                    lines.append(f"| {arm} | {ref} | {steps} | {r['sw2'][0]:.4f} +- {r['sw2'][1]:.4f} | {d_sw2} | "
                                 f"{r['coverage'][0]:.3f} +- {r['coverage'][1]:.3f} | {d_cov} |")
            lines.append("")
    return "\n".join(lines)


def figure(out, path):
    """Per (mixture, teacher): 2-step samples of ODE and ER-SDE 5 students (seed 0) and SW2 vs steps per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, t) for d in out["step1"] for t in out["step1"][d]]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 3, figsize=(9, 2.8 * len(panels)), squeeze=False)
    for row, (d, t) in enumerate(panels):
        table, scatter = out["step1"][d][t], out["scatter"][d][t]
        for col, arm in enumerate(list(scatter)[:2]):
            pts = torch.tensor(scatter[arm])
            ax = axes[row, col]
            ax.scatter(pts[:, 0], pts[:, 1], s=0.3, alpha=0.4)
            ax.set(xlim=(-1.6, 1.6), ylim=(-1.6, 1.6), xticks=[], yticks=[], aspect="equal")
            ax.set_title(f"{d} / {t[:24]}\n{arm}, 2 steps", fontsize=6)
        ax = axes[row, 2]
        for arm, by_steps in table.items():
            means = [by_steps[str(s)]["sw2"][0] for s in STEP_COUNTS]
            style = "-" if arm.startswith("ODE") else "--"
            ax.plot(STEP_COUNTS, means, marker="o", ms=2, lw=0.8, ls=style, label=arm)
        ax.set(xlabel="sampling steps", ylabel="SW2", xticks=list(STEP_COUNTS), yscale="log")
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=3.5)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ring8, ODE vs ER-SDE 5, 1 seed, small budgets")
    parser.add_argument("--iterations", type=int, default=None, help="distillation iterations (default 1200)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3)")
    parser.add_argument("--datasets", nargs="+", default=None, choices=sorted(DATASETS), help="default ring8")
    parser.add_argument("--arms", nargs="+", default=None, choices=[a.name for a in ARMS], help="default: all")
    parser.add_argument("--teachers", nargs="+", default=None, choices=TEACHER_KINDS, help="default: all three")
    parser.add_argument("--jobs", type=int, default=1, help="teachers trained and distilled in parallel processes")
    parser.add_argument("--from-parts", default=None, help="only rebuild the report from a run's parts folder")
    parser.add_argument("--output", default="docs", help="folder for toy2d_learned.{md,png,json}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    if args.quick:
        budgets, arms, n_eval, n_step0 = QUICK_BUDGETS, QUICK_ARMS, 2000, 1000
        hops, samplers = [h for h in HOPS if h[0] in ("span 24, h=3", "1000 steps")], SAMPLERS[:2]
    else:
        budgets, arms, n_eval, n_step0, hops, samplers = BUDGETS, ARMS, 3000, 2000, HOPS, SAMPLERS
    iterations = args.iterations or (200 if args.quick else 1200)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    datasets = args.datasets or ["ring8"]
    arms = [a for a in ARMS if a.name in args.arms] if args.arms else arms
    budgets = [b for b in budgets if b[0].split(" ")[0] in (args.teachers or TEACHER_KINDS)]
    output, name = Path(args.output), "toy2d_learned_quick" if args.quick else "toy2d_learned"
    if args.from_parts:
        parts = [json.loads(p.read_text()) for p in sorted(Path(args.from_parts).glob("*.json"))]
        out = assemble(parts, n_step0, seeds)
    else:
        out = run(datasets, budgets, arms, seeds, iterations, n_eval, n_step0, hops, samplers, args.jobs,
                  parts=output / f"{name}_parts")
    out["config"] = {"iterations": iterations, "seeds": seeds, "budgets": budgets, "n_eval": n_eval,
                     "n_step0": n_step0, "arms": [a.__dict__ for a in arms], "adv_weight": ADV_WEIGHT,
                     "total_s": round(time.time() - started)}
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}_tables.md").write_text(markdown(out) + "\n")
    (output / f"{name}.json").write_text(json.dumps({k: v for k, v in out.items() if k != "scatter"}, indent=1))
    figure(out, output / f"{name}.png")
    print(markdown(out))
    print(f"total {time.time() - started:.0f} s; wrote {output / name}_tables.md, .json and .png", flush=True)
    return out


if __name__ == "__main__":
    main()
