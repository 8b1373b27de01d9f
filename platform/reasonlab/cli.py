"""`reasonlab` command line: argument parsing only; every verb calls one function elsewhere."""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from reasonlab.errors import ConfigError  # not reasonlab.config, which imports torch: `reasonlab ui` needs none

EXIT_BAD_INPUT = 2


def _fail(message: str) -> int:
    print(f"reasonlab: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_train(args) -> int:
    from reasonlab.stages import Pipeline, load_job

    job = load_job(args.job, args.overrides)
    from reasonlab.stages import run_pipeline
    from reasonlab.train import TrainingFailed, run_training  # Ray is imported only for a valid job

    try:
        outcome = run_pipeline(job) if isinstance(job, Pipeline) else run_training(job)
    except TrainingFailed as e:
        print(f"reasonlab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from reasonlab import stopping

        if stopping.run_names:  # the same command under the run's name
            kept = [o for o in args.overrides if not o.startswith("tracking.run_name=")]
            stopping.resume_hint[:] = [shlex.join(["reasonlab", "train", args.job, *kept,
                                                   f"tracking.run_name={stopping.run_names[-1]}"])]
        raise
    what = "staged job" if isinstance(job, Pipeline) else "run"
    print(f"\nfinished {what} {outcome.run_name}: MLflow run id {outcome.run_id}\n"
          f"  tracking store: {outcome.tracking_uri}\n"
          f"  look at it with: reasonlab ui   (then open {outcome.ui_path})")
    return 0


def cmd_sweep(args) -> int:
    from reasonlab.sweep import load_sweep

    sweep = load_sweep(args.sweep, args.overrides)
    from reasonlab.compare import Comparison
    from reasonlab.sweep import run_sweep  # Ray is imported only for a valid sweep
    from reasonlab.train import TrainingFailed

    try:
        parent = run_sweep(sweep, resume=args.resume)
    except TrainingFailed as e:  # the model (or a baseline) an eval-only sweep trains first
        print(f"reasonlab: {e}", file=sys.stderr)
        return 1
    table = "comparison.csv" if isinstance(sweep, Comparison) else "trials.csv"
    print(f"\nfinished sweep {sweep.name}: MLflow parent run id {parent} ({table} among its artifacts)\n"
          f"  look at it with: reasonlab ui")
    return 0


def cmd_data_sample(args) -> int:
    from reasonlab.config import apply_overrides, build_dataclass
    from reasonlab.tasks import TASKS, make_task

    if args.task not in TASKS:
        raise ConfigError(f"{args.task}: unknown task; expected one of {sorted(TASKS)}")
    if args.n < 1:
        raise ConfigError(f"-n: expected a value > 0, got {args.n}")
    fields: dict = {"name": args.task}
    apply_overrides(fields, args.fields)
    if args.seed is not None:
        fields["seed"] = args.seed
    params = build_dataclass(TASKS[args.task].Params, fields, "task")
    params.check()
    task = make_task(params)
    examples = task.examples(0, args.n) if args.split == "train" else task.heldout(args.split)[: args.n]
    sys.stdout.write("".join(task.show(e) + "\n" for e in examples))
    return 0


def cmd_capacity(args) -> int:
    from reasonlab.studies.capacity import capacity_report

    sys.stdout.write(capacity_report(args.run_id, args.scheme, args.out, log=args.log))
    return 0


def cmd_probe(args) -> int:
    from reasonlab.probe import KINDS, probe_run

    probe_run(args.run, args.step, tuple(args.kind or KINDS), args.examples, tuple(args.target or ()),
              args.experiment)
    return 0


def cmd_ui(args) -> int:
    from reasonlab.tracking import local_artifact_root, tracking_uri, ui_experiments

    uri = tracking_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        print(f"runs are on the MLflow server {uri}: open it in a browser")
        return 0
    if not 0 < args.port < 65536:
        print(f"reasonlab ui: --port {args.port}: expected a port number from 1 to 65535", file=sys.stderr)
        return 2
    # One server process, no job consumers (they run GenAI jobs: trace scorers, issue detection) and no access
    # log: MLflow's defaults (4 workers, 7 consumers) took 30-75 s and 2-3 GB on a 2-core machine before answering
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(args.port),
               "--workers", "1", "--uvicorn-opts=--no-access-log", "--backend-store-uri", uri]
    if local_artifact_root(uri):
        command += ["--default-artifact-root", local_artifact_root(uri)]
    base = f"http://127.0.0.1:{args.port}"
    print(f"MLflow UI for {uri} at {base}  (Ctrl-C stops it)", flush=True)
    for name, address in ui_experiments(uri):
        print(f"  experiment {name}: {base}/{address}", flush=True)
    os.execve(command[0], command, dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reasonlab", description="Experiments on how transformers reason, on Ray.")
    verbs = p.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train one job (a YAML file) on Ray, tracked in MLflow")
    train.add_argument("job", help="job file, e.g. jobs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=3e-4 model.n_layer=4")
    train.set_defaults(func=cmd_train)

    sweep = verbs.add_parser("sweep", help="run a search space (a YAML file) on Ray Tune, one child run per trial")
    sweep.add_argument("sweep", help="sweep file, e.g. search_spaces/quickstart_sizes.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every trial")
    sweep.add_argument("--resume", metavar="NAME",
                       help="continue the interrupted sweep NAME (its first line gives the command)")
    sweep.set_defaults(func=cmd_sweep)

    data = verbs.add_parser("data", help="look at generated data")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    sample = data_verbs.add_parser("sample", help="print examples, one per line (`input||cot #### answer` for CoT tasks)")
    sample.add_argument("task", help="task name, e.g. multiplication")
    sample.add_argument("-n", type=int, default=10, help="number of examples (default 10)")
    sample.add_argument("--seed", type=int, default=None, help="the task's data seed")
    sample.add_argument("--split", choices=["train", "valid", "test"], default="train")
    sample.add_argument("fields", nargs="*", metavar="FIELD=VALUE", help="task fields, e.g. a_digits=5")
    sample.set_defaults(func=cmd_data_sample)

    capacity = verbs.add_parser("capacity", help="bits stored per parameter, recomputed from finished runs")
    capacity.add_argument("run_id", help="a capacity run, or a sweep's parent run (all its trials)")
    capacity.add_argument("--scheme", default="optimal",
                          help="encoding scheme printed and plotted: optimal, enumerate, independent, "
                               "2-hop-big-hash, 2-hop-double, azl (capacity.csv holds them all)")
    capacity.add_argument("--out", default=".", help="folder for capacity.csv and capacity_vs_params.png")
    capacity.add_argument("--log", action="store_true", help="also log both files to the run")
    capacity.set_defaults(func=cmd_capacity)

    probe = verbs.add_parser("probe", help="logit lens and linear probes on a finished run's model, "
                                           "logged to a child run")
    probe.add_argument("run", help="a finished run's id or name")
    probe.add_argument("--step", type=int, default=None, help="probe the snapshot saved at this step "
                                                              "(train.snapshot_steps) instead of the final model")
    probe.add_argument("--kind", action="append", choices=["logit_lens", "linear"],
                       help="which probe (repeatable; default both)")
    probe.add_argument("--target", action="append", help="only this task-declared target (repeatable; default all)")
    probe.add_argument("--examples", type=int, default=1000, help="examples of each probe set (default 1000)")
    probe.add_argument("--experiment", default="reasonlab", help="the experiment a run name is looked up in")
    probe.set_defaults(func=cmd_probe)

    ui = verbs.add_parser("ui", help="open the MLflow UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    # KEY=VALUE words may come before or after options (`data sample TASK -n 3 a_digits=5`)
    listed = getattr(args, "overrides", getattr(args, "fields", None))
    if extra and listed is not None and all("=" in w and not w.startswith("-") for w in extra):
        listed.extend(extra)
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    from reasonlab import stopping

    stopping.handle_sigterm()  # `kill`, `timeout`, `ray job stop`: stopped like Ctrl-C, runs closed as KILLED
    try:
        return args.func(args)
    except ConfigError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        stopping.disconnect()
        resume = "".join(f"; resume with: {hint}" for hint in stopping.resume_hint)
        if stopping.received:
            print(f"reasonlab: stopped by SIGTERM; its runs are closed as KILLED{resume}", file=sys.stderr)
            return 143
        print(f"reasonlab: interrupted; its runs are closed as KILLED{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
