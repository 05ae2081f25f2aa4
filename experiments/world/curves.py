"""Quality against training compute: one run per (arm, seed), its LoRA saved where the run has spent each budget of
training FLOPs, every saved LoRA scored at 1/2/4 steps and paired by seed with LCM's at the same budget.

    python -m experiments.world.report --budgets 100 300 1000 3000 --arms lcm scott lcm_adv scott_lite \\
        --world shapes --seeds 0 1 2 --n-eval 1000 --out runs/world_grid --docs docs

Budgets are LCM-step equivalents: b is b times the FLOPs of one `--mode lcm` step on the world's teacher at the
demo sizes (experiments.world.compute counts each arm's step, the trainer's own, with the counter bench_train's
estimate uses), so `lcm` reaches budget b at step b and an arm whose step costs 2.8x at step b / 2.8. Writes
<docs>/world_curves.json (world_<tag>_curves.json for another world or teacher): every scored checkpoint of every
(arm, seed) under `points`; per budget the rows, the paired differences to lcm and scott and the raw values as the
single-budget report writes them; the defaults rule's verdict per arm; the same as markdown, and a plot of FD and
exact match against FLOPs and against steps, one band (mean +- std over seeds) per arm.
"""

import json

from training.cli import parse_config

from . import compute, report

PLOT_PANELS = (("fd", "1"), ("fd", "2"), ("fd", "4"), ("exact_match", "1"), ("exact_match", "2"))
RULE_BETTER = ("fd",)  # the rule: better = FD lower beyond 2 SE; worse = FD higher or exact match lower beyond 2 SE
RULE_WORSE = {"fd": 1, "exact_match": -1}  # the sign of a worse difference


def arm_config(grid, arm):
    """The resolved trainer config of the arm's runs in this grid (the world's teacher and sizes)."""
    argv = report.distill_argv(grid.world, arm, 0, grid.out / "flops", [1], grid.train_images, grid.teacher)
    return parse_config(argv)


def step_flops(grid, arm, steps):
    """{kind: FLOPs of one optimiser step} of the arm's run among its first `steps` steps, on the grid's teacher;
    cached in <out>/flops/<teacher>.json by the arm's flags."""
    cache = grid.out / "flops" / f"{report.teacher_tag(grid.teacher) or 'demo'}.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    cfg, entry = arm_config(grid, arm), known.get(arm, {})
    if entry.get("flags") != report.ARMS[arm] or entry.get("steps", 0) < steps:
        entry = {"flags": report.ARMS[arm], "steps": steps, "flops": compute.kind_flops(cfg, steps)}
        known[arm] = entry
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1) + "\n")
    return entry["flops"]


def budget_plan(grid, arms, budgets):
    """(FLOPs of one LCM step; {arm: {steps, flops, step_flops}}): each student arm's checkpoint steps at the budgets
    (LCM-step equivalents), the FLOPs spent by then and its FLOPs per kind of step."""
    lcm_step = step_flops(grid, "lcm", 1)["cd"]
    plan = {}
    for arm in (a for a in arms if a not in report.REFERENCES):
        flops = step_flops(grid, arm, compute.horizon(budgets))
        steps, spent = compute.budget_steps(arm_config(grid, arm), budgets, lcm_step, flops)
        plan[arm] = {"steps": steps, "flops": spent, "step_flops": flops}
    return lcm_step, plan


def run_curves(out, docs, arms, world="shapes", seeds=(0, 1, 2), budgets=(100, 300, 1000, 3000), n_eval=1000,
               train_images=4000, train=True, score=True, teacher="demo"):
    """Train (one run per (arm, seed), seed by seed) and score what is missing at every budget, then write the curves'
    JSON, markdown and plot; train / score as report.run_grid. Returns the JSON object."""
    report.check_arms(arms)
    grid = report.Grid(out, docs, world, train_images, n_eval, teacher)
    lcm_step, plan = budget_plan(grid, arms, budgets)
    missing = [f"{arm}_seed{seed}" for seed in seeds for arm in arms
               if not grid.run(arm, seed, plan[arm]["steps"] if arm in plan else [0], train, score)]
    at_budget = {str(b): at(grid, arms, seeds, plan, i) for i, b in enumerate(budgets)}
    numbers = {"world": world, "teacher": str(teacher), "train_images": train_images, "n_eval": n_eval,
               "seeds": list(seeds), "arms": list(arms), "budgets": list(budgets), "lcm_step_flops": lcm_step,
               "checkpoints": plan, "missing": missing, "rule": rule(at_budget), "at_budget": at_budget,
               "points": points(grid, arms, seeds, plan, budgets)}
    name = grid.results_name("curves")
    grid.write(name, numbers, markdown(numbers))
    plot(numbers, grid.docs / f"{name}.png")
    return numbers


def at(grid, arms, seeds, plan, i):
    """The i-th budget's block: each arm's checkpoint step and FLOPs there, rows, paired differences, raw values."""
    raw = grid.raw(arms, seeds, {arm: p["steps"][i] for arm, p in plan.items()})
    rows, diffs = report.summarize(raw)
    return {"steps": {arm: p["steps"][i] for arm, p in plan.items()},
            "flops": {arm: p["flops"][i] for arm, p in plan.items()}, "rows": rows,
            **{f"paired_to_{b}": d for b, d in diffs.items()}, "raw": raw}


def points(grid, arms, seeds, plan, budgets):
    """{arm: {seed: [{budget, step, flops, metrics: {steps: {metric: value}}}]}}: every scored checkpoint."""
    out = {}
    for arm, p in plan.items():
        for seed in seeds:
            for budget, n, spent in zip(budgets, p["steps"], p["flops"]):
                raw = grid.raw([arm], [seed], n).get(arm, {})
                if raw:
                    metrics = {k: {m: by[str(seed)] for m, by in per.items()} for k, per in raw.items()}
                    point = {"budget": budget, "step": n, "flops": spent, "metrics": metrics}
                    out.setdefault(arm, {}).setdefault(str(seed), []).append(point)
    return out


def rule(at_budget):
    """The defaults rule against lcm at equal FLOPs, per arm: where it is better (FD lower beyond 2 SE), where worse
    (FD higher or exact match lower beyond 2 SE), and whether it passes (better somewhere, worse nowhere)."""
    verdicts = {}
    for budget, block in at_budget.items():
        for arm, per in block["paired_to_lcm"].items():
            verdict = verdicts.setdefault(arm, {"better": [], "worse": []})
            for steps, metrics in per.items():
                for metric, diff in metrics.items():
                    if not report.is_real(diff):
                        continue
                    where = f"budget {budget}, {steps} step: {metric} {diff['mean']:+.3f} +- {diff['se']:.3f} " \
                            f"({diff['n']} seeds)"
                    if metric in RULE_BETTER and diff["mean"] < 0:
                        verdict["better"].append(where)
                    if metric in RULE_WORSE and diff["mean"] * RULE_WORSE[metric] > 0:
                        verdict["worse"].append(where)
    for verdict in verdicts.values():
        verdict["passes"] = bool(verdict["better"]) and not verdict["worse"]
    return verdicts


def markdown(numbers):
    """Checkpoint steps per budget, then per step count FD and exact match (mean +- std) and their paired difference
    to lcm (mean +- SE, real beyond 2 SE) by arm and budget, and the rule's verdict."""
    budgets, blocks = numbers["budgets"], numbers["at_budget"]
    head = "| arm | " + " | ".join(f"budget {b}" for b in budgets) + " |"
    rule_line = "|" + "---|" * (len(budgets) + 1)
    lines = [f"Budgets in LCM-step equivalents (one LCM step = {numbers['lcm_step_flops'] / 1e9:.2f} GFLOP on this "
             "world's teacher); cells: the arm's checkpoint step (TFLOP spent).", "", head, rule_line]
    for arm, p in numbers["checkpoints"].items():
        cells = [f"{n} ({f / 1e12:.2f})" for n, f in zip(p["steps"], p["flops"])]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    for metric in ("fd", "exact_match"):
        for steps in map(str, report.STUDENT_STEPS):
            lines += ["", f"**{metric} at {steps} step{'s' if steps != '1' else ''}**: mean +- std (seeds); "
                      "paired to lcm at the same budget: mean +- SE (seeds), **real** beyond 2 SE.", "", head,
                      rule_line]
            for arm in numbers["checkpoints"]:
                cells = [value_cell(blocks[str(b)], arm, steps, metric) for b in budgets]
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "**Which arm** has the lowest mean FD at each budget and step count, and the runner-up's paired "
              "difference to it (mean +- SE, seeds):", "",
              "| budget | " + " | ".join(f"{k} step{'s' if k > 1 else ''}" for k in report.STUDENT_STEPS) + " |",
              "|" + "---|" * (len(report.STUDENT_STEPS) + 1)]
    for b in budgets:
        lines.append(f"| {b} | " + " | ".join(which(blocks[str(b)], str(k)) for k in report.STUDENT_STEPS) + " |")
    lines += ["", "**Rule** (better: FD lower beyond 2 SE; worse: FD higher or exact match lower beyond 2 SE):", ""]
    for arm, verdict in numbers["rule"].items():
        lines.append(f"- {arm}: {'passes' if verdict['passes'] else 'does not pass'}; better at "
                     f"{'; '.join(verdict['better']) or 'none'}; worse at {'; '.join(verdict['worse']) or 'none'}")
    return "\n".join(lines)


def which(block, steps):
    """'lcm; scott +12.000 +- 2.000 (3) **real**': the student arm with the lowest mean FD at one budget and step
    count, and the runner-up's paired difference to it."""
    means = {arm: per[steps]["fd"][0] for arm, per in block["rows"].items()
             if arm not in report.REFERENCES and steps in per}
    if not means:
        return "-"
    best, *rest = sorted(means, key=means.get)
    if not rest:
        return best
    second = rest[0]
    diff = report.paired(block["raw"][second][steps]["fd"], block["raw"][best][steps]["fd"])
    return f"{best}; {second} {report.diff_cell(diff)}"


def value_cell(block, arm, steps, metric):
    """'mean +- std (n)' of the arm at a budget, then its paired difference to lcm."""
    row = block["rows"].get(arm, {}).get(steps, {}).get(metric)
    if row is None:
        return "-"
    n = len(block["raw"][arm][steps][metric])
    diff = block["paired_to_lcm"].get(arm, {}).get(steps, {}).get(metric)
    paired = f"; {report.diff_cell(diff)}" if diff else ""
    return f"{row[0]:.3f} +- {row[1]:.3f} ({n}){paired}"


def plot(numbers, path):
    """FD and exact match against training FLOPs (top) and optimiser steps (bottom), one band (mean +- std over the
    seeds) per arm, the teacher's FD dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(PLOT_PANELS), figsize=(4 * len(PLOT_PANELS), 7), squeeze=False)
    teacher = numbers["at_budget"][str(numbers["budgets"][0])]["rows"].get("teacher", {}).get("25", {}).get("fd")
    for arm, by_seed in numbers["points"].items():
        for col, (metric, steps) in enumerate(PLOT_PANELS):
            curve = band(by_seed, metric, steps)
            for row, x in enumerate(("flops", "step")):
                xs = [c[x] / (1e12 if x == "flops" else 1) for c in curve]
                ax = axes[row][col]
                ax.plot(xs, [c["mean"] for c in curve], marker="o", label=arm)
                ax.fill_between(xs, [c["mean"] - c["std"] for c in curve], [c["mean"] + c["std"] for c in curve],
                                alpha=0.2)
    for col, (metric, steps) in enumerate(PLOT_PANELS):
        for row, x in enumerate(("training TFLOP", "optimiser steps")):
            ax = axes[row][col]
            ax.set(xscale="log", xlabel=x, title=f"{metric} at {steps} step{'s' if steps != '1' else ''}")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor log labels overlap
            if metric == "fd" and teacher:
                ax.axhline(teacher[0], color="grey", linestyle="--", label="teacher 25 steps")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{numbers['world']} world, teacher {report.teacher_tag(numbers['teacher']) or 'demo'}: "
                 f"band = mean +- std over seeds {numbers['seeds']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def band(by_seed, metric, steps):
    """[{flops, step, mean, std, n}] at each checkpoint of one arm, over the seeds that have it."""
    at_step = {}
    for points_ in by_seed.values():
        for point in points_:
            value = point["metrics"].get(steps, {}).get(metric)
            if value is not None:
                at_step.setdefault((point["step"], point["flops"]), []).append(value)
    out = []
    for (step, flops), values in sorted(at_step.items()):
        mean, std = report.mean_std(values)
        out.append({"step": step, "flops": flops, "mean": mean, "std": std, "n": len(values)})
    return out
