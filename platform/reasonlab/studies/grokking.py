"""The grokking study on a sweep's parent run: grokking.csv (per trial: steps to fit the training set, steps
to reach 95% on held-out ID inferred facts, best ID and OOD accuracy), grokking_curves.png (every named
set's accuracy against steps, one panel per trial) and steps_to_grok_vs_phi.png, from the trials' metric
histories."""
from __future__ import annotations

import tempfile
from pathlib import Path

from reasonlab.analysis.grokking import CURVES_PNG

CSV = "grokking.csv"
PHI_PNG = "steps_to_grok_vs_phi.png"


def grokking_trials(client, parent_run_id: str, grid: list) -> tuple[list[dict], list[tuple[str, dict]]]:
    """(table rows, (label, curves) per trial) of a sweep's trials, in the order of their grid values."""
    from reasonlab.analysis.grokking import SETS, grokking_row
    from reasonlab.tracking import child_runs

    parent = client.get_run(parent_run_id)
    rows, curves = [], []
    for run in child_runs(client, parent.info.experiment_id, parent_run_id):
        p = run.data.params
        history = {}
        for name in SETS:
            key = f"eval/{name}/accuracy"
            history[key] = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        if not any(history.values()):
            continue  # never evaluated
        label = ", ".join(f"{k.rpartition('.')[2]}={p.get(k)}" for k in grid) or run.info.run_name
        row = {"trial": run.info.run_name, "label": label, "phi": float(p["task.phi"]),
               "weight_decay": float(p["train.weight_decay"]), "grad_filter": p.get("train.grad_filter"),
               "steps": max((s for points in history.values() for s, _ in points), default=0),
               **grokking_row(history), "eval_share": run.data.metrics.get("time/eval_share"),
               "status": run.info.status, "run_id": run.info.run_id,
               "_order": [_number(p.get(k)) for k in grid]}
        rows.append(row)
        curves.append((label, history))
    order = sorted(range(len(rows)), key=lambda i: rows[i].pop("_order"))
    return [rows[i] for i in order], [curves[i] for i in order]


def _number(value):
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, str(value))


class GrokkingAnalysis:
    """grokking.csv, grokking_curves.png and steps_to_grok_vs_phi.png, when the study's task is a
    knowledge graph."""

    name = "grokking"

    def applies(self, study) -> bool:
        return not study.eval_only and any(cfg.task.name == "knowledge_graph" for cfg in study.configs)

    def run(self, study) -> str:
        from reasonlab.analysis.grokking import COLUMNS, format_grokking, plot_curves, plot_steps_vs_phi
        from reasonlab.train import _csv

        rows, curves = grokking_trials(study.client, study.parent_run_id, study.grid)
        if not rows:
            return "no grokking table: no trial was evaluated\n"
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / CSV).write_text(_csv([{c: r[c] for c in COLUMNS} for r in rows]))
            plot_curves(curves, str(Path(d) / CURVES_PNG))
            plot_steps_vs_phi(rows, str(Path(d) / PHI_PNG))
            study.client.log_artifacts(study.parent_run_id, d)
        return format_grokking(rows) + f"({CSV}, {CURVES_PNG} and {PHI_PNG} logged to the parent run)\n"
