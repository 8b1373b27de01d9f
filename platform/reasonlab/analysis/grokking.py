"""When a model fits its training facts, when it generalizes to held-out inferred facts, and whether OOD
queries follow (Wang et al. 2024), from each trial's accuracy curves on the knowledge graph's named sets:
the grokking table and its plots. Curves are {metric: [(step, value), ...]}; no MLflow here."""
from __future__ import annotations

import math

# the sets drawn, in order; the first three are trained, the last two never are
SETS = ("train_inferred", "id_atomic", "ood_atomic", "test_inferred_id", "test_inferred_ood")
TRAINED = SETS[:3]
FIT = 0.99  # every trained set at least this accurate: the training set is fit
GROKKED = 0.95  # held-out ID inferred facts at least this accurate: generalized ("grokked")
HALFWAY = 0.5  # ... half of them answered: how fast generalization gets going, for runs too short to grok
CURVES_PNG = "grokking_curves.png"  # the accuracy curves, on a run and on a sweep's parent run
COLUMNS = ["trial", "phi", "weight_decay", "grad_filter", "steps", "steps_to_fit", "steps_to_id50", "steps_to_id95",
           "grok_delay", "best_id", "best_ood", "final_id", "final_ood", "eval_share", "status", "run_id"]


def _key(name: str) -> str:
    return f"eval/{name}/accuracy"


def first_step(points: list[tuple[int, float]], threshold: float) -> int | None:
    """The first evaluated step whose value reaches `threshold`."""
    return next((step for step, value in sorted(points) if value >= threshold), None)


def fit_step(curves: dict) -> int | None:
    """The first step at which every trained set is at least FIT accurate."""
    trained = [dict(curves.get(_key(name), [])) for name in TRAINED]
    if not all(trained):
        return None
    steps = sorted(set.intersection(*(set(t) for t in trained)))
    return next((s for s in steps if min(t[s] for t in trained) >= FIT), None)


def grokking_row(curves: dict) -> dict:
    """The table's measures of one trial's curves."""
    id_curve, ood_curve = curves.get(_key("test_inferred_id"), []), curves.get(_key("test_inferred_ood"), [])
    fit, grok = fit_step(curves), first_step(id_curve, GROKKED)
    last = lambda points: sorted(points)[-1][1] if points else math.nan  # noqa: E731
    return {"steps_to_fit": fit, "steps_to_id50": first_step(id_curve, HALFWAY), "steps_to_id95": grok,
            "grok_delay": grok / fit if fit and grok else None,  # how much longer generalizing took than fitting
            "best_id": max((v for _, v in id_curve), default=math.nan),
            "best_ood": max((v for _, v in ood_curve), default=math.nan),
            "final_id": last(id_curve), "final_ood": last(ood_curve)}


def format_grokking(rows: list[dict]) -> str:
    """The table for the terminal."""
    def steps(value) -> str:
        return f"{value:,}" if value else "—"

    lines = [f"{'trial':<36} {'phi':>5} {'wd':>5} {'fit at':>8} {'ID 50% at':>10} {'ID 95% at':>10} {'best ID':>8} "
             f"{'best OOD':>9}"]
    for r in rows:
        lines.append(f"{r['trial']:<36} {r['phi']:>5g} {r['weight_decay']:>5g} {steps(r['steps_to_fit']):>8} "
                     f"{steps(r['steps_to_id50']):>10} {steps(r['steps_to_id95']):>10} {100 * r['best_id']:>7.1f}% "
                     f"{100 * r['best_ood']:>8.1f}%")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(trials: list[tuple[str, dict]], path: str) -> None:
    """One panel per trial (title: its label): each named set's accuracy against steps, log step axis."""
    plt = _pyplot()
    cols = min(3, len(trials))
    rows = math.ceil(len(trials) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False, sharey=True)
    styles = {"train_inferred": ("tab:blue", "-"), "id_atomic": ("tab:gray", ":"), "ood_atomic": ("tab:brown", ":"),
              "test_inferred_id": ("tab:green", "-"), "test_inferred_ood": ("tab:red", "-")}
    for ax, (label, curves) in zip(axes.flat, trials):
        for name in SETS:
            points = sorted(curves.get(_key(name), []))
            if points:
                color, style = styles[name]
                ax.plot([s for s, _ in points], [100 * v for _, v in points], style, color=color, label=name)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(_no_labels())  # decades only: the minor labels overlap
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimization step")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(trials):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    axes.flat[0].legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _no_labels():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def plot_steps_vs_phi(rows: list[dict], path: str) -> None:
    """Steps to fit the training set and to reach 50% and 95% on held-out ID inferred facts against φ, one
    series per weight decay (and gradient filter); a trial that never reached 95% is an open marker at its last
    step. Trials repeated over seeds are drawn as their mean with a 95% interval."""
    from reasonlab.analysis.intervals import grouped

    plt = _pyplot()
    fig, (ax, best) = plt.subplots(1, 2, figsize=(11, 4.4))
    series: dict[str, list[dict]] = {}
    for r in rows:
        name = f"wd={r['weight_decay']:g}" + ("" if r["grad_filter"] in (None, "none") else f", {r['grad_filter']}")
        series.setdefault(name, []).append(r)
    for i, (name, group) in enumerate(sorted(series.items())):
        group = sorted(group, key=lambda r: r["phi"])
        color = f"C{i}"
        # repeated seeds at one φ: their mean, with a bar over its 95% interval
        for column, style, marker, what in (("steps_to_fit", "--", "s", "fit the training set"),
                                            ("steps_to_id50", ":", "^", "50% held-out ID"),
                                            ("steps_to_id95", "-", "o", "95% held-out ID")):
            points = grouped([(r["phi"], r[column]) for r in group if r[column]])
            if points:
                x, y, err = zip(*points)
                ax.errorbar(x, y, yerr=err, fmt=style, color=color, marker=marker, capsize=3,
                            alpha=0.5 if column == "steps_to_fit" else 1.0, label=f"{what} ({name})")
        missed = [(r["phi"], r["steps"]) for r in group if not r["steps_to_id95"]]
        if missed:
            ax.scatter(*zip(*missed), facecolors="none", edgecolors=color, marker="o", s=60,
                       label=f"95% held-out ID not reached by the last step ({name})")
        for column, style, what in (("best_id", "-o", "held-out ID"), ("best_ood", "--x", "held-out OOD")):
            x, y, err = zip(*grouped([(r["phi"], 100 * r[column]) for r in group]))
            best.errorbar(x, y, yerr=err, fmt=style, color=color, capsize=3, label=f"{what} ({name})")
    ax.set_yscale("log")
    ax.set_ylabel("optimization steps")
    ax.legend(fontsize=7)
    best.set_ylim(-3, 103)
    best.set_ylabel("best accuracy on held-out inferred facts (%)")
    best.legend(fontsize=7)
    for a in (ax, best):
        a.set_xlabel("φ (inferred facts per ID atomic fact)")
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
