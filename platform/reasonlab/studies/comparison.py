"""The method comparison's table and plot on its parent run: comparison.csv (per method: what training
cost, summed over the stages of a staged job; accuracy and examples/s at each evaluation batch size, read
from the evaluation runs; tokens generated per example) and accuracy_vs_speed.png with the Pareto front."""
from __future__ import annotations

import tempfile
from pathlib import Path

CSV = "comparison.csv"
PNG = "accuracy_vs_speed.png"


def _training_runs(client, run_id: str) -> list:
    """The runs that trained a model: the run itself, or every stage of the staged job it ends."""
    from reasonlab.stages import STAGES_TAG
    from reasonlab.tracking import child_runs

    run = client.get_run(run_id)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if parent_id:
        parent = client.get_run(parent_id)
        if STAGES_TAG in parent.data.tags:
            return child_runs(client, parent.info.experiment_id, parent_id)
    return [run]


def comparison_rows(client, comparison, trained: dict, evaluations: dict) -> list[dict]:
    """One row per method: what it cost to train (all stages of a staged job) and how it answers
    (`evaluations[label, batch_size]`: the metrics of that evaluation run)."""
    from reasonlab.analysis.comparison import pareto_front
    from reasonlab.tracking import logged_param_count

    rows = []
    for e in comparison.entries:
        final = client.get_run(trained[e.label])
        runs = _training_runs(client, trained[e.label])
        row = {"method": e.label, "method_name": final.data.params.get("method.name"),
               "n_params": logged_param_count(final.data.params) or 0,
               "train_steps": sum(int(r.data.params.get("train.max_steps", 0)) for r in runs),
               "train_time_s": sum(((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000 for r in runs),
               "test_examples": comparison.test_examples}
        for b in comparison.batch_sizes:
            metrics = evaluations[e.label, b]
            row[f"accuracy_bs{b}"] = metrics["test/accuracy"]
            row[f"examples_per_sec_bs{b}"] = metrics["test/examples_per_sec"]
        first = comparison.batch_sizes[0]
        row["accuracy"] = row[f"accuracy_bs{first}"]
        row["tokens_per_example"] = evaluations[e.label, first]["test/tokens_per_example"]
        row["trained_run_id"] = trained[e.label]
        rows.append(row)
    front = pareto_front([(r[f"examples_per_sec_bs{comparison.batch_sizes[0]}"], r["accuracy"]) for r in rows])
    for r, on in zip(rows, front):
        r["pareto"] = on
    return rows


def log_comparison(client, parent_run_id: str, rows: list[dict], batch_sizes: list[int]) -> str:
    from reasonlab.analysis.comparison import COLUMNS, format_comparison, plot_comparison
    from reasonlab.train import _csv

    columns = [*COLUMNS, *(f"{k}_bs{b}" for b in batch_sizes for k in ("accuracy", "examples_per_sec")),
               "pareto", "trained_run_id"]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / CSV).write_text(_csv([{c: r[c] for c in columns} for r in rows]))
        plot_comparison(rows, batch_sizes, str(Path(d) / PNG))
        client.log_artifacts(parent_run_id, d)
    return format_comparison(rows, batch_sizes) + f"({CSV} and {PNG} logged to the parent run; * marks the " \
                                                  f"Pareto front at batch size {batch_sizes[0]})\n"


class ComparisonAnalysis:
    """comparison.csv and accuracy_vs_speed.png, for a method comparison."""

    name = "comparison"

    def applies(self, study) -> bool:
        return study.comparison is not None

    def run(self, study) -> str:
        from reasonlab.tracking import child_runs

        parent = study.client.get_run(study.parent_run_id)
        runs = {r.info.run_name: r for r in child_runs(study.client, parent.info.experiment_id, study.parent_run_id)}
        comparison = study.comparison
        evaluations = {}
        for e in comparison.entries:
            for b in comparison.batch_sizes:
                run = runs.get(f"{parent.info.run_name}-{e.label}-bs{b}")
                if run is None or run.info.status != "FINISHED":
                    return f"no comparison table: the evaluation of {e.label} at batch size {b} did not finish\n"
                evaluations[e.label, b] = run.data.metrics
        rows = comparison_rows(study.client, comparison, study.trained, evaluations)
        return log_comparison(study.client, study.parent_run_id, rows, comparison.batch_sizes)
