"""The course of stepwise internalization: chain-of-thought tokens removed and accuracy without CoT,
over training steps, in one picture (`internalization.png`)."""
from __future__ import annotations

REMOVED = "train/cot_tokens_removed"


def plot_internalization(history: dict[str, list[tuple[int, float]]], path: str, total: int | None = None) -> None:
    """Removed tokens (left axis, with the whole chain's length as a dashed line when `total` is known)
    and every `*/accuracy` series of `history` (right axis, %) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(8, 4.5))
    removed = sorted(history.get(REMOVED, []))
    left.step([s for s, _ in removed], [v for _, v in removed], where="post", color="tab:gray",
              label="CoT tokens removed (scheduled)")
    if total:
        left.axhline(total, ls=":", color="tab:gray", label=f"whole chain ({total} tokens)")
    left.set_xlabel("optimizer step")
    left.set_ylabel("CoT tokens removed")
    right = left.twinx()
    for key in sorted(k for k in history if k.endswith("/accuracy")):
        points = sorted(history[key])
        right.plot([s for s, _ in points], [100 * v for _, v in points], "o-",
                   label=f"{key} (greedy from the prompt alone)")
    right.set_ylabel("exact-match accuracy (%)")
    right.set_ylim(-2, 102)
    lines = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center left")
    left.grid(True, alpha=0.3)
    left.set_title("stepwise internalization: chain removed and accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
