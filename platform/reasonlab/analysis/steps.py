"""Accuracy and throughput against the number of diffusion sampling steps T (Diffusion of Thoughts'
speed/accuracy curve), with autoregressive baselines as horizontal lines."""
from __future__ import annotations

STEP_KEYS = ("eval.steps", "method.steps")  # where a sweep's T comes from, first match wins


def plot_steps(rows: list[dict], path: str, baselines: list[dict] = ()) -> None:
    """Two panels over T (log2 axis): exact-match accuracy, and examples/s (log axis). `rows` hold
    `steps`, `accuracy`, `examples_per_sec` and a `series` label (one line per label, e.g. the
    sampler); `baselines` hold `label`, `accuracy` and `examples_per_sec`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for label in dict.fromkeys(r["series"] for r in rows):
        points = sorted((r["steps"], r["accuracy"], r["examples_per_sec"]) for r in rows if r["series"] == label)
        steps = [p[0] for p in points]
        top.plot(steps, [100 * p[1] for p in points], "o-", label=label)
        bottom.plot(steps, [p[2] for p in points], "o-", label=label)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, b in enumerate(baselines):
        color = colors[(i + 3) % len(colors)]
        top.axhline(100 * b["accuracy"], ls="--", color=color, label=f"{b['label']} ({100 * b['accuracy']:.1f}%)")
        bottom.axhline(b["examples_per_sec"], ls="--", color=color,
                       label=f"{b['label']} ({b['examples_per_sec']:.0f}/s)")
    top.set_ylabel("exact-match accuracy (%)")
    top.set_ylim(-2, 102)
    bottom.set_ylabel("examples / s")
    bottom.set_yscale("log")
    bottom.set_xscale("log", base=2)
    bottom.set_xlabel("sampling steps T")
    for ax in (top, bottom):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    top.set_title("accuracy and speed against diffusion steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
