"""Study analyses: what a study leaves on its parent MLflow run once its runs are done (the capacity table,
the steps plot, the method comparison, the grokking curves), one file each, registered here by name. A sweep
builds a `Study` and runs every analysis that declares it applies; none is found by trying it and catching
the failure.
A new analysis is one file plus one line in ANALYSES. They read runs through the client they are given.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from reasonlab.studies.capacity import CapacityAnalysis
from reasonlab.studies.comparison import ComparisonAnalysis
from reasonlab.studies.grokking import GrokkingAnalysis
from reasonlab.studies.steps import StepsAnalysis


@dataclass
class Study:
    """What a finished study hands its analyses."""
    client: Any  # MlflowClient of the study's store
    parent_run_id: str
    configs: list = field(default_factory=list)  # the trials' (or compared jobs') configs
    grid: list = field(default_factory=list)  # the keys that differ between the trials (grid, sampled, seed)
    eval_only: bool = False
    baselines: dict[str, str] = field(default_factory=dict)  # run id → label, drawn beside the trials
    comparison: Any = None  # compare.Comparison, for a method comparison
    trained: dict[str, str] = field(default_factory=dict)  # comparison label → run id of its final model


ANALYSES = {
    "capacity": CapacityAnalysis(),
    "steps": StepsAnalysis(),
    "comparison": ComparisonAnalysis(),
    "grokking": GrokkingAnalysis(),
}


def run_analyses(study: Study) -> str:
    """Every registered analysis that applies, logged to the parent run; returns what to print."""
    return "".join(analysis.run(study) for analysis in ANALYSES.values() if analysis.applies(study))


def log_task_artifacts(client, run_id: str, configs: list) -> None:
    """The data every trial of a sweep uses (e.g. profiles), once per distinct task, on the parent run."""
    from reasonlab.tasks import make_task

    seen = set()
    for cfg in configs:
        key = json.dumps(cfg.to_dict()["task"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        with tempfile.TemporaryDirectory() as d:
            if make_task(cfg.task).write_artifacts(d):
                name = "_".join(f"{k}={v}" for k, v in sorted(cfg.to_dict()["task"].items())
                                if k in ("num_profiles", "relations", "seed"))
                client.log_artifacts(run_id, d, os.path.join("data", name or f"task{len(seen)}"))
