"""The per-worker training loop and the TorchTrainer around it (Ray Train V2)."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from reasonlab.config import Config, ConfigError, config_from_dict
from reasonlab.data import quiet_data_context, quiet_ray_loggers
from reasonlab.evaluate import LastingBar, evaluate
from reasonlab.loop import TrainLoop
from reasonlab.methods import example_length, make_method, prompt_length, sequence_length, target_length
from reasonlab.models import count_parameters
from reasonlab.models.causal import count_used_parameters, size_for_params
from reasonlab.models.hub import check_hub_model
from reasonlab.tasks import make_task
from reasonlab.tokenizer import build_tokenizer, load_tokenizer, tokenizer_files, tokenizer_from_files

CHECKPOINT_FILE = "state.pt"


# ----------------------------------------------------------------------------------------------------
# Worker side


def train_loop_per_worker(spec: dict) -> None:
    """Ray glue around the core's TrainLoop: the dataset shard, DDP, checkpoints, reports and logging."""
    import ray.train
    import ray.train.torch
    import transformers

    from reasonlab.tracking import PARAM_COUNT, PARAM_COUNT_USED, RunLogger, snapshot_path

    transformers.utils.logging.disable_progress_bar()
    quiet_ray_loggers()
    cfg = config_from_dict(spec["config"], job=spec["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    # asked for first: Ray Data starts its pipeline at the first request, and the worker builds its model meanwhile
    batches = _first_fetched_ahead(iter(ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=cfg.micro_batch_size, dtypes=torch.long, prefetch_batches=4, drop_last=True)), say)
    # this node's cores shared by this node's workers (the driver may run on another machine)
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()
    tokenizer = tokenizer_from_files(spec["tokenizer"])
    task, method = make_task(cfg.task), make_method(cfg.method, cfg)
    method.setup(task, tokenizer)
    with tempfile.TemporaryDirectory() as d:  # the finished runs the method reads (a teacher), frozen
        inputs = load_inputs(spec, d, device)
        model = method.build_model(cfg.model, tokenizer, spec["max_len"], device, inputs)
    loop = TrainLoop(model, method, cfg.train, device, wrap=ray.train.torch.prepare_model)  # DDP across workers
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            loop.load_state_dict(torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False))
    step = loop.step

    logger = RunLogger(spec["tracking_uri"], spec["run_id"]) if rank == 0 else None
    sizes = size_params(model, [*spec["used_token_ids"], *method.extra_state_ids(tokenizer, model)])
    if rank == 0 and not step:
        logger.log_params(sizes)
        say(f"model: {method.model_kind or cfg.model.arch}, {cfg.model.n_layer} layers, d_model {cfg.model.d_model}, "
            f"{sizes[PARAM_COUNT] / 1e6:.3f}M parameters ({sizes[PARAM_COUNT_USED] / 1e6:.3f}M without "
            f"unused embedding rows), sequence length {spec['seq_len']}")
    eval_sets = {k: v[: cfg.eval.num_examples] for k, v in task.eval_sets("valid").items()}

    window_start, window_tokens, loss_sum, loss_count = _new_window(device)
    extra_sums: dict = {}
    started = time.perf_counter()
    eval_seconds = 0.0
    snapshots = set(cfg.train.snapshots())
    first_step = step
    capacity = None  # the last evaluation's capacity measurement, for capacity tasks
    last_loss: dict = {}  # the last logged training loss
    while step < cfg.train.max_steps:
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        if step == first_step:
            first_index = int(micro[0]["index"].min())
            if first_index < step * cfg.train.batch_size:
                raise RuntimeError(f"the data stream starts at example {first_index}, before step {step}'s "
                                   f"examples; it would train on them twice")
            if step:
                say(f"resumed from the checkpoint at step {step}; first example index {first_index}", flush=True)
        loss, extra = loop.train_step(micro)
        step = loop.step
        loss_sum += loss
        loss_count += 1
        for k, v in extra.items():  # a method's own per-batch metrics, averaged over the window
            extra_sums[k] = extra_sums.get(k, 0) + v
        for batch in micro:
            window_tokens += batch["attention_mask"].sum()

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            tokens = _all_reduce_sum(window_tokens, world)
            elapsed = time.perf_counter() - window_start
            schedule = method.step_metrics(step)
            metrics = {"train/loss": loss_sum.item() / loss_count, "train/lr": loop.lr,
                       "train/tokens_per_sec": tokens / elapsed, **schedule,
                       **{k: float(v) / loss_count for k, v in extra_sums.items()}}
            last_loss = {"train/loss": metrics["train/loss"]}  # reported with the next evaluation, for schedulers
            if rank == 0:
                logger.log_metrics(metrics, step)
                rate = (step - first_step) / (time.perf_counter() - started)
                extra = "".join(f"  {k.rpartition('/')[2]} {v:g}" for k, v in schedule.items())
                say(f"step {step}/{cfg.train.max_steps}  loss {metrics['train/loss']:.4f}  "
                    f"lr {metrics['train/lr']:.2e}  {metrics['train/tokens_per_sec'] / 1e3:.1f}k tok/s{extra}  "
                    f"eta {_duration((cfg.train.max_steps - step) / rate)}", flush=True)
            window_start, window_tokens, loss_sum, loss_count = _new_window(device)
            extra_sums = {}

        if rank == 0 and step in snapshots:
            log_model(model, tokenizer, method, logger, snapshot_path(step))
        last = step == cfg.train.max_steps
        evaluating = step % cfg.train.eval_every == 0 or last
        checkpointing = step % cfg.train.checkpoint_interval == 0 or last
        if evaluating or checkpointing:  # every worker reports (a collective), rank 0 evaluates and saves
            metrics = {"step": step}
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0 and evaluating:
                    eval_started = time.perf_counter()
                    for prefix, examples in eval_sets.items():
                        result = evaluate(model, tokenizer, method, examples, batch_size=cfg.eval.batch_size,
                                          **eval_options(cfg, spec), device=device,
                                          progress=eval_bar(f"{prefix} at step {step}"))
                        metrics.update(result.metrics(prefix))
                        say(f"{prefix} at step {step}: accuracy {result.accuracy:.4f} on {result.num_examples} "
                            f"held-out examples, {result.examples_per_sec:.1f} examples/s", flush=True)
                    if measures_capacity(task, method):
                        capacity = measure_capacity(model, tokenizer, method, task, cfg, sizes, device)
                        metrics.update(capacity[0])
                        say(_capacity_line(metrics, step), flush=True)
                    eval_seconds += time.perf_counter() - eval_started
                    # what the evaluations cost in this process, against its time in all
                    metrics["time/eval_share"] = eval_seconds / (time.perf_counter() - started)
                    logger.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
                if rank == 0 and checkpointing:
                    torch.save(loop.state_dict(), Path(d) / CHECKPOINT_FILE)
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report({**last_loss, **metrics}, checkpoint=ckpt,
                                 checkpoint_dir_name=checkpoint_dir_name(step))
            window_start = time.perf_counter()  # evaluation time is not training throughput

    if rank == 0:
        # the loop's last evaluation is at max_steps: its capacity measurement is the final one
        finish_run(model, tokenizer, method, task, cfg, spec, device, logger, sizes, capacity)


def size_params(model, used_token_ids) -> dict[str, int]:
    """The model's parameter counts as a run logs them: all of them, and those without the embedding rows of
    tokens outside `used_token_ids` (named apart from `model.n_params`, the size a job may ask for)."""
    from reasonlab.tracking import PARAM_COUNT, PARAM_COUNT_USED

    return {PARAM_COUNT: count_parameters(model), PARAM_COUNT_USED: count_used_parameters(model, used_token_ids)}


def log_model(model, tokenizer, method, logger, artifact_path: str, logged_model_step: int | None = None) -> None:
    """The model as its method saves it, with the tokenizer, under `artifact_path` (`model`, or a snapshot's
    snapshots/step_XXXXXXXX), the folder every reader of a run loads with `from_pretrained`. With
    `logged_model_step` (the final model) also an MLflow logged model, which the UI lists and can register."""
    with tempfile.TemporaryDirectory() as d:
        method.save(model, d)
        tokenizer.save_pretrained(d)
        logger.log_artifacts(d, artifact_path)
        if logged_model_step is not None:
            logger.log_logged_model(model, tokenizer, d, logged_model_step)


def load_inputs(spec: dict, directory: str, device) -> dict:
    """The runs the driver resolved for the method's references, downloaded under `directory` and rebuilt
    with their own configs: field → runs.LoadedRun."""
    from mlflow.tracking import MlflowClient

    from reasonlab.runs import load_run_dir
    from reasonlab.tracking import download_run

    client = MlflowClient(spec["tracking_uri"])
    inputs = {}
    for field_name, (run_id, step) in spec.get("inputs", {}).items():
        folder = download_run(client, run_id, step, os.path.join(directory, field_name))
        inputs[field_name] = load_run_dir(folder, device)
    return inputs


def finish_run(model, tokenizer, method, task, cfg: Config, spec: dict, device, logger, sizes: dict,
               capacity: tuple | None = None) -> None:
    """Final test-set evaluation and the run's artifacts: model, tokenizer, predictions, and for
    capacity tasks the answer losses and the capacity table (`capacity`: measure_capacity's result
    for the final model, if the last evaluation logged it)."""
    predictions = []
    for prefix, examples in task.eval_sets("test").items():
        result = evaluate(model, tokenizer, method, examples[: cfg.eval.test_examples], batch_size=cfg.eval.batch_size,
                          **eval_options(cfg, spec), device=device, progress=eval_bar(prefix))
        logger.log_metrics(result.metrics(prefix), cfg.train.max_steps)
        print(f"{prefix}: accuracy {result.accuracy:.4f} on {result.num_examples} held-out examples, "
              f"{result.examples_per_sec:.1f} examples/s (batch size {cfg.eval.batch_size})", flush=True)
        predictions += [{"set": prefix, **p} for p in result.predictions[: cfg.eval.log_predictions]]
    log_model(model, tokenizer, method, logger, "model", logged_model_step=cfg.train.max_steps)
    logger.log_text("".join(json.dumps(p) + "\n" for p in predictions), "predictions.jsonl")
    with tempfile.TemporaryDirectory() as d:
        history = functools.cache(logger.metric_history)  # read from the store once, and only if a part draws
        for part in (method, task):  # e.g. internalization.png, grokking_curves.png
            part.finish(history, d)
        if any(Path(d).iterdir()):
            logger.log_artifacts(d)
    if measures_capacity(task, method):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if capacity is None:
            capacity = measure_capacity(model, tokenizer, method, task, cfg, sizes, device)
            logger.log_metrics(capacity[0], cfg.train.max_steps)
        _, table, rows = capacity
        with tempfile.TemporaryDirectory() as d:
            pq.write_table(pa.table(table), Path(d) / "answer_losses.parquet")
            logger.log_artifacts(d)
        logger.log_text(_csv(rows), "capacity.csv")


def measures_capacity(task, method) -> bool:
    """Capacity needs each fact's teacher-forced answer loss: capacity tasks under autoregressive methods."""
    return task.measures_capacity and method.teacher_forced


def eval_bar(desc: str):
    """A progress bar for an evaluation in a Ray worker that lasts over ten seconds, drawn by the driver."""
    from ray.experimental.tqdm_ray import tqdm

    return LastingBar(desc, bar=tqdm)


def eval_options(cfg: Config, spec: dict) -> dict:
    """`evaluate` keywords from the eval section and the run's lengths."""
    return {"max_new_tokens": spec["max_new_tokens"], "seq_len": spec["seq_len"], "steps": cfg.eval.steps,
            "samples": cfg.eval.samples, "seed": cfg.eval.seed, "precision": cfg.train.precision,
            "decoder": cfg.eval.decoder}


def measure_capacity(model, tokenizer, method, task, cfg: Config, sizes: dict, device) -> tuple[dict, dict, list]:
    """Answer losses of the capacity questions → (metrics, loss table, capacity rows)."""
    from reasonlab.analysis.capacity import capacity_rows, measure_answer_losses
    from reasonlab.tracking import PARAM_COUNT, PARAM_COUNT_USED

    table = measure_answer_losses(model, tokenizer, method, task, batch_size=max(cfg.eval.batch_size, 256),
                                  device=device, precision=cfg.train.precision)
    rows = capacity_rows(table, task.statistics(), sizes[PARAM_COUNT], sizes[PARAM_COUNT_USED])
    metrics = {}
    for row in rows:
        h = row["hops"]
        metrics[f"capacity/{h}hop_answer_loss_bits"] = row["mean_answer_loss_bits"]
        for key, value in row.items():
            if key.startswith(("capacity_", "bits_per_param_", "ci95_relative_")):
                metrics[f"capacity/{h}hop_{key}"] = value
    return metrics, table, rows


def _capacity_line(metrics: dict, step: int) -> str:
    parts = [f"{h}-hop {metrics[f'capacity/{h}hop_capacity_optimal']:,.0f} bits "
             f"± {100 * metrics[f'capacity/{h}hop_ci95_relative_optimal']:.1f}% "
             f"({metrics[f'capacity/{h}hop_bits_per_param_optimal']:.3f} bits/param)"
             for h in (1, 2) if f"capacity/{h}hop_capacity_optimal" in metrics]
    return f"capacity at step {step} (optimal scheme): " + ", ".join(parts)


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


FIRST_BATCH_PATIENCE_S = 120.0


def _first_fetched_ahead(batches, say, patience: float = FIRST_BATCH_PATIENCE_S):
    """The batches, the first of them fetched in a thread from now on (an error in it is raised when the first
    batch is asked for), with one line if it keeps the asker waiting longer than `patience` seconds: a run whose
    data does not come otherwise waits in silence, its last line the model's size."""
    first: dict = {}

    def fetch():
        try:
            first["batch"] = next(batches)
        except BaseException as e:  # raised in the training thread, below
            first["error"] = e

    thread = threading.Thread(target=fetch, name="first-batch", daemon=True)
    thread.start()

    def stream():
        thread.join(patience)
        if thread.is_alive():
            say(f"no training batch from Ray Data after {patience:g} s (`ray status` shows what holds the "
                f"cluster's CPUs)", flush=True)
            thread.join()
        if "error" in first:
            raise first["error"]
        yield first.pop("batch")
        yield from batches

    return stream()


def _new_window(device) -> tuple:
    """Start of a logging window: time, tokens, loss sum, loss count. The sums stay on the device, as
    reading them every step would stall a GPU."""
    return time.perf_counter(), torch.zeros((), dtype=torch.long, device=device), torch.zeros((), device=device), 0


def _all_reduce_sum(value: torch.Tensor, world: int) -> int:
    """Sum over workers (waits for the device, so the time measured after it is honest)."""
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return int(value.item())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------------
# Driver side


class TrainingFailed(RuntimeError):
    """Training started but did not finish; its MLflow run is marked FAILED."""


@dataclass
class TrainOutcome:
    run_id: str
    run_name: str
    tracking_uri: str
    ui_path: str


def prepare_run(cfg: Config) -> dict:
    """Everything the workers need that the driver computes once: tokenizer, lengths."""
    check_pretrained(cfg)
    task, method = make_task(cfg.task), make_method(cfg.method, cfg)
    inputs, input_tokenizer = resolve_inputs(cfg)
    if input_tokenizer is not None:  # the same token ids as the runs it reads
        tokenizer = input_tokenizer
    elif cfg.model.pretrained and _has_tokenizer(cfg.model.pretrained):
        tokenizer = load_tokenizer(cfg.model.pretrained)
    else:
        tokenizer = build_tokenizer(task)
    seq_len, max_new_tokens, max_len = run_lengths(cfg, task, method, tokenizer)
    config = cfg.to_dict()
    if cfg.model.n_params:
        d_model, n_head = size_for_params(cfg.model,
                                          lambda m: method.build_model(m, tokenizer, max_len, torch.device("meta")))
        config["model"].update(d_model=d_model, n_head=n_head, d_ff=None)
    used = {tokenizer.eos_token_id}
    for ids in tokenizer(list(task.corpus()), add_special_tokens=False)["input_ids"]:
        used.update(ids)
    spec = {"config": config, "job": cfg.job, "tokenizer": tokenizer_files(tokenizer), "seq_len": seq_len,
            "max_len": max_len, "max_new_tokens": max_new_tokens, "used_token_ids": sorted(used), "inputs": inputs}
    # names the (task, method, tokenizer) encoder, so Ray Data workers build it once, not per batch
    spec["encoder_key"] = hashlib.sha1(pickle.dumps([spec["config"], spec["tokenizer"], seq_len])).hexdigest()
    return spec


def check_pretrained(cfg: Config) -> None:
    """A hub id in `model.pretrained` is asked for once, here, with a short timeout (ConfigError if it cannot
    be had); a local folder was checked with the job."""
    if cfg.model.pretrained and not os.path.isabs(cfg.model.pretrained):  # the job made local paths absolute
        check_hub_model(cfg.model.pretrained)


def resolve_inputs(cfg: Config) -> tuple[dict, object | None]:
    """The finished runs the job's method names (`method.teacher: RUN`), checked before anything starts
    (ConfigError): field → (run id, snapshot step); and the tokenizer of the first, which this run uses."""
    refs = cfg.run_refs()
    if not refs:
        return {}, None
    from reasonlab.tracking import lookup_client, resolve_ref

    field_name, ref = next(iter(refs.items()))
    client = lookup_client(cfg, f"method.{field_name}", ref.run)
    inputs = {}
    for field_name, ref in refs.items():
        run = resolve_ref(client, cfg, ref, f"method.{field_name}")
        inputs[field_name] = (run.info.run_id, ref.step)
    with tempfile.TemporaryDirectory() as d:
        first = next(iter(inputs.values()))[0]
        tokenizer = load_tokenizer(client.download_artifacts(first, "tokenizer", d))
    return inputs, tokenizer


def run_lengths(cfg: Config, task, method, tokenizer) -> tuple[int, int, int]:
    """(training row length, decoding budget, position table size) of a job with this tokenizer; the
    same for the run that trains a model and for any later evaluation of it."""
    seq_len = sequence_length(task, method, tokenizer)
    max_new_tokens = cfg.eval.max_new_tokens or target_length(task, method, tokenizer) + 8
    # packed rows restart positions per example, so positions only need to cover one example
    needed = max(example_length(task, method, tokenizer), prompt_length(task, method, tokenizer) + max_new_tokens)
    max_len = cfg.model.max_len or needed
    if max_len < needed:
        raise ConfigError(f"model.max_len: {max_len} positions cannot hold the task's sequences and decoded "
                          f"targets; expected at least {needed}")
    return seq_len, max_new_tokens, max_len


def _has_tokenizer(path: str) -> bool:
    try:
        load_tokenizer(path)
        return True
    except Exception:
        return False


def worker_resources(cfg: Config, available_cpus: float) -> dict:
    """Per-worker resources. On CPU, workers leave at least one CPU to Ray Data's generators, which reserve none
    (see `reasonlab.data.train_dataset`) but need a core to keep up."""
    n = cfg.scaling.num_workers
    if cfg.scaling.cpus_per_worker is not None:
        cpus = cfg.scaling.cpus_per_worker
    elif cfg.scaling.use_gpu:
        cpus = 1.0
    else:
        cpus = max(0.1, min(1.0, (available_cpus - 1) / n))
    resources = {"CPU": cpus}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return resources


def run_training(cfg: Config, parent_run_id: str | None = None, callbacks: list | None = None,
                 out=sys.stdout) -> TrainOutcome:
    """Train one job on Ray, tracked as one MLflow run (a child of `parent_run_id` in a sweep).
    Resumes a run of the same name. `callbacks` are Ray Train UserCallbacks, e.g. Tune's reporter."""
    run_name = cfg.tracking.run_name or f"{cfg.job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    spec = prepare_run(cfg)  # bad input (a run reference) stops here, before Ray or a run exists
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from reasonlab.cluster import check_cluster_resources
    from reasonlab.data import resumed_train_dataset
    from reasonlab import stopping
    from reasonlab.tracking import DriverRun, storage_path

    cfg = config_from_dict(spec["config"], job=cfg.job)  # with the derived sizes, so they are logged
    # Train V2 sends worker prints both to stdout and to its logger, so each line showed twice
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    stopping.connect()
    available = ray.available_resources().get("CPU", 1.0)
    resources = worker_resources(cfg, available)
    # Ray Data's generators: as many at once as the CPUs the workers leave free when the run starts, at least one
    data_tasks = max(1, int(available - resources["CPU"] * cfg.scaling.num_workers + 1e-6))
    # workers no node can hold would be waited for forever: refused here, before a run exists (ConfigError)
    check_cluster_resources([(resources, cfg.scaling.num_workers)])
    if parent_run_id is None:  # before the run exists: its "starting run" line may be the last thing a stop sees
        stopping.run_names.append(run_name)
    run = DriverRun(cfg, run_name, parent_run_id=parent_run_id)
    storage = storage_path(cfg)
    status = "FAILED"
    try:  # from here on, however the driver stops, the run is closed (a stop while logging the data included)
        print(f"{'resuming' if run.resumed else 'starting'} run {run_name} (MLflow run {run.run_id}); "
              f"restart with tracking.run_name={run_name} to resume it", file=out, flush=True)
        if not run.resumed:
            with tempfile.TemporaryDirectory() as d:
                tokenizer_from_files(spec["tokenizer"]).save_pretrained(d)
                run.log_artifacts(d, "tokenizer")
            with tempfile.TemporaryDirectory() as d:
                if make_task(cfg.task).write_artifacts(d):  # e.g. the profiles every question is about
                    run.log_artifacts(d, "data")
        quiet_data_context()
        spec.update(run_id=run.run_id, tracking_uri=run.uri)
        total = cfg.train.max_steps * cfg.train.batch_size

        # called on Train's controller at every worker-group (re)start; plain values and reasonlab.data only, so
        # the controller, which unpickles it before it starts the workers, imports neither torch nor transformers
        dataset = functools.partial(resumed_train_dataset, spec, storage, run_name, cfg.train.batch_size, total,
                                    data_tasks)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=spec,
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers,
                                                   use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                callbacks=callbacks, logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
            datasets={"train": dataset},
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        )
        trainer.fit()
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C: Train's own SIGINT handler aborts the workers, then exits through SystemExit
        status = "KILLED"
        raise KeyboardInterrupt from None
    except Exception as e:
        raise TrainingFailed(f"run {run_name} failed (MLflow run {run.run_id} marked FAILED): "
                             f"{type(e).__name__}: {e}") from e
    finally:
        run.end(status)
    return TrainOutcome(run.run_id, run_name, run.uri, run.ui_url)
