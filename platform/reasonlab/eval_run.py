"""Evaluation-only runs: a finished run's model evaluated again under other sampling settings
(diffusion steps T, sampler, self-consistency samples), each in an MLflow run of its own. An eval-only
sweep runs one of these per Tune trial; no training happens here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

import torch

from reasonlab.config import Config
from reasonlab.evaluate import LastingBar, evaluate
from reasonlab.methods import make_method
from reasonlab.models import count_parameters
from reasonlab.tasks import make_task
from reasonlab.tokenizer import load_tokenizer

TRAINED_RUN_TAG = "reasonlab.trained_run"


def evaluate_trained(cfg: Config, trained_run_id: str, run_name: str, parent_run_id: str | None = None,
                     threads: int | None = None, split: str = "valid") -> dict[str, float]:
    """Evaluate the model of run `trained_run_id` with `cfg`'s eval and sampling settings on the
    validation sets (`eval.num_examples` of each) or the test sets (`split="test"`, `eval.test_examples`);
    logs params, metrics and predictions into a new run (a child of `parent_run_id`) and returns the
    metrics."""
    import transformers
    from mlflow.entities import Metric

    from reasonlab.tracking import PARAM_COUNT, DriverRun
    from reasonlab.train import eval_options, run_lengths

    transformers.utils.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    run = DriverRun(cfg, run_name, parent_run_id=parent_run_id)
    status = "FAILED"
    try:
        run.client.set_tag(run.run_id, TRAINED_RUN_TAG, trained_run_id)
        device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        task, method = make_task(cfg.task), make_method(cfg.method, cfg)
        with tempfile.TemporaryDirectory() as d:
            path = run.client.download_artifacts(trained_run_id, "model", d)
            tokenizer = load_tokenizer(run.client.download_artifacts(trained_run_id, "tokenizer", d))
            method.setup(task, tokenizer)
            seq_len, max_new_tokens, max_len = run_lengths(cfg, task, method, tokenizer)
            model_cfg = dataclasses.replace(cfg.model, pretrained=path, n_params=None)
            model = method.build_model(model_cfg, tokenizer, max_len, device)
        run.log_params({PARAM_COUNT: count_parameters(model)})
        spec = {"max_new_tokens": max_new_tokens, "seq_len": seq_len}
        metrics, predictions = {}, []
        count = cfg.eval.num_examples if split == "valid" else cfg.eval.test_examples
        for prefix, examples in task.eval_sets(split).items():
            result = evaluate(model, tokenizer, method, examples[:count], batch_size=cfg.eval.batch_size,
                              **eval_options(cfg, spec), device=device, progress=LastingBar(f"{run_name} {prefix}"))
            metrics.update(result.metrics(prefix))
            predictions += [{"set": prefix, **p} for p in result.predictions[: cfg.eval.log_predictions]]
            print(f"{run_name} {prefix}: accuracy {result.accuracy:.4f} on {result.num_examples} examples, "
                  f"{result.examples_per_sec:.1f} examples/s ({_settings(cfg, method)})", flush=True)
        now = int(1000 * time.time())
        run.client.log_batch(run.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        run.client.log_text(run.run_id, "".join(json.dumps(p) + "\n" for p in predictions), "predictions.jsonl")
        status = "FINISHED"
        return metrics
    finally:
        run.end(status)


def _settings(cfg: Config, method) -> str:
    parts = method.sampling_settings(cfg.eval.steps)
    if cfg.eval.samples > 1:
        parts.append(f"{cfg.eval.samples} samples voted")
    return ", ".join(parts) or "greedy"
