"""`reasonlab probe RUN`: the logit lens and linear probes (analysis/probes.py) on a finished run's model, or
on one of its snapshots, logged into a child run of it: a CSV and a heatmap per kind of probe.

The run is checked before anything loads (finished, with the model or snapshot asked for), and so are the
targets asked for (declared by the run's task); each mistake is one line.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from reasonlab.config import ConfigError
from reasonlab.runref import RunRef

KINDS = ("logit_lens", "linear")
PROBE_TAG = "reasonlab.probe_of"


def probe_run(ref_text: str, step: int | None = None, kinds: tuple[str, ...] = KINDS, examples: int = 1000,
              targets: tuple[str, ...] = (), experiment: str = "reasonlab", out=sys.stdout) -> str:
    """Probe the model of run `ref_text` (id or name; `step`: a snapshot); returns the child run's id."""
    import torch
    import transformers

    from reasonlab.analysis.probes import plot_linear, plot_logit_lens, run_probes
    from reasonlab.methods import METHODS
    from reasonlab.models.blocks import decoder_blocks, final_norm
    from reasonlab.runs import CONFIG_FILE, load_run_dir, read_run_config
    from reasonlab.tasks import make_task
    from reasonlab.tracking import DriverRun, download_run, finished_model_run, lookup_client, snapshot_path
    from reasonlab.train import _csv

    transformers.utils.logging.disable_progress_bar()
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"--kind: {unknown[0]}: expected one of {list(KINDS)}")
    if examples < 2:
        raise ConfigError(f"--examples: expected at least 2 (probes fit on some and score the others), got {examples}")
    ref = RunRef.parse(ref_text if step is None else f"{ref_text}@{step}", "RUN")
    client = lookup_client(None, "RUN", ref.run)
    run = finished_model_run(client, experiment, ref, "RUN")
    name = run.data.tags.get("reasonlab.run_name", run.info.run_name)
    with tempfile.TemporaryDirectory() as d:  # what the run's task declares, checked before its model loads
        cfg = read_run_config(client.download_artifacts(run.info.run_id, CONFIG_FILE, d))
    if not METHODS[cfg.method.name].teacher_forced:
        raise ConfigError(f"RUN: run {ref.run!r} was trained with method {cfg.method.name}, whose answer is not "
                          f"read from a prompt's forward pass; probes read autoregressive models")
    task = make_task(cfg.task)
    sets = {k: v[:examples] for k, v in task.probe_sets().items()}
    declared = list(task.probe_targets(next(iter(sets.values()))[:1]))
    missing = [t for t in targets if t not in declared]
    if missing:
        raise ConfigError(f"--target: {missing[0]}: the task {cfg.task.name} declares "
                          f"{', '.join(declared) or 'no probe targets'}")
    if "linear" in kinds and not declared and len(kinds) == 1:
        raise ConfigError(f"--kind linear: the task {cfg.task.name} declares no probe targets; the logit lens "
                          f"(--kind logit_lens) reads the answer tokens")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as d:
        loaded = load_run_dir(download_run(client, run.info.run_id, ref.step, d), device)
    method, model = loaded.method, loaded.model
    try:
        decoder_blocks(model)
        if "logit_lens" in kinds:
            final_norm(model)
    except TypeError as e:
        raise ConfigError(f"RUN: run {ref.run!r}: {e}") from None

    def targets_of(batch):
        found = task.probe_targets(batch)
        return {k: v for k, v in found.items() if not targets or k in targets}

    what = f"{name}" + (f" at step {ref.step}" if ref.step is not None else "")
    cfg = cfg.replace(tracking={"run_name": None})
    probe = DriverRun(cfg, f"{name}-probe-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}",
                      parent_run_id=run.info.run_id)
    with probe.closing():
        probe.client.set_tag(probe.run_id, PROBE_TAG, run.info.run_id)
        probe.log_params({"probe.kinds": ",".join(kinds), "probe.step": ref.step, "probe.examples": examples,
                          "probe.model": "model" if ref.step is None else snapshot_path(ref.step)})
        print(f"probing {what} ({', '.join(kinds)}) on {', '.join(f'{k} ({len(v)})' for k, v in sets.items())}",
              file=out, flush=True)
        rows = run_probes(model, loaded.tokenizer, method, sets, targets_of, kinds)
        with tempfile.TemporaryDirectory() as d:
            if rows.get("logit_lens"):
                (Path(d) / "logit_lens.csv").write_text(_csv(rows["logit_lens"]))
                plot_logit_lens(rows["logit_lens"], str(Path(d) / "logit_lens.png"), f"logit lens: {what}")
            if rows.get("linear"):
                (Path(d) / "linear_probes.csv").write_text(_csv(rows["linear"]))
                plot_linear(rows["linear"], str(Path(d) / "linear_probes.png"), f"linear probes: {what}")
            probe.log_artifacts(d)
            written = sorted(p.name for p in Path(d).iterdir())
        out.write(summarize(rows))
        print(f"{', '.join(written)} logged to run {probe.run_name} (MLflow run {probe.run_id}, a child of "
              f"{name})", file=out, flush=True)
    return probe.run_id


def summarize(rows: dict[str, list[dict]]) -> str:
    """Per set and target: the layer where the logit lens gives the target its highest probability at its
    position, and the layer where a linear probe reads it best."""
    lines = []
    for r in _best(rows.get("logit_lens", []), "probability", lambda r: r["target_position"]):
        lines.append(f"logit lens  {r['set']:<20} {r['target']:<16} top probability {r['probability']:.3f} at "
                     f"layer {r['layer']} (position {r['position']}, {r['token']})")
    for r in _best(rows.get("linear", []), "test_accuracy", lambda r: True):
        lines.append(f"linear      {r['set']:<20} {r['target']:<16} best held-out accuracy "
                     f"{r['test_accuracy']:.3f} at layer {r['layer']} (majority {r['majority_rate']:.3f})")
    return "".join(line + "\n" for line in lines)


def _best(rows: list[dict], key: str, keep) -> list[dict]:
    best: dict[tuple, dict] = {}
    for r in rows:
        at = (r["set"], r["target"])
        if keep(r) and (at not in best or r[key] > best[at][key]):
            best[at] = r
    return list(best.values())
