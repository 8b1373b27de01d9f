"""One table comparing ways of reasoning on one test set: accuracy against decoding speed per method, and
which methods are on the Pareto front (no other method is both at least as accurate and at least as fast,
and better in one)."""
from __future__ import annotations

COLUMNS = ["method", "method_name", "n_params", "train_steps", "train_time_s", "test_examples", "accuracy",
           "tokens_per_example"]


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (speed, accuracy): True when no other point dominates it (≥ in both, > in one)."""
    return [not any(s >= speed and a >= acc and (s > speed or a > acc) for s, a in points)
            for speed, acc in points]


def format_comparison(rows: list[dict], batch_sizes: list[int]) -> str:
    """The table for the terminal."""
    header = f"{'method':<14} {'params':>9} {'steps':>7} {'train':>8} {'accuracy':>9}" + "".join(
        f" {f'ex/s@bs{b}':>11}" for b in batch_sizes) + f" {'tokens':>7}  pareto"
    lines = [header]
    for r in rows:
        lines.append(f"{r['method']:<14} {int(r['n_params']):>9,} {r['train_steps']:>7} "
                     f"{r['train_time_s'] / 60:>7.1f}m {100 * r['accuracy']:>8.1f}%"
                     + "".join(f" {r[f'examples_per_sec_bs{b}']:>11.1f}" for b in batch_sizes)
                     + f" {r['tokens_per_example']:>7.1f}  {'*' if r['pareto'] else ''}")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict], batch_sizes: list[int], path: str) -> None:
    """Accuracy against examples/s (log axis), one panel per evaluation batch size, one point per method;
    the Pareto front of each panel drawn as a step line through its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(6 * len(batch_sizes), 4.8), squeeze=False)
    for ax, b in zip(axes[0], batch_sizes):
        speed = [r[f"examples_per_sec_bs{b}"] for r in rows]
        accuracy = [100 * r[f"accuracy_bs{b}"] for r in rows]
        front = pareto_front(list(zip(speed, accuracy)))
        for r, s, a, on in zip(rows, speed, accuracy, front):
            ax.scatter([s], [a], s=60, marker="o" if on else "x", zorder=3)
            ax.annotate(r["method"], (s, a), textcoords="offset points", xytext=(6, 4), fontsize=9)
        edge = sorted((s, a) for s, a, on in zip(speed, accuracy, front) if on)
        if edge:
            ax.step([p[0] for p in edge], [p[1] for p in edge], where="post", ls="--", color="gray",
                    label="Pareto front", zorder=2)
            ax.legend(fontsize=8, loc="lower left")
        ax.set_xscale("log")
        ax.set_xlabel(f"examples / s at batch size {b}")
        ax.set_ylabel("exact-match test accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"accuracy against speed, batch size {b}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
