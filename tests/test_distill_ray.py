"""Staged jobs and the method comparison on the session's local Ray instance: the ICoT-KD pipeline killed
in its second stage and restarted (finished stages skipped, the unfinished one resumed), its parent and
four finished stage runs; bad stages and run references refused before Ray starts; a comparison whose
table equals its runs."""
from __future__ import annotations

import csv

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, cli_in_fresh_python, reasonlab
from test_train_ray import _artifacts, _client, _run, kill_after_first_checkpoint

pytestmark = pytest.mark.ray

KD_TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "train.batch_size=16", "train.warmup_steps=2",
           "train.log_every=5", "train.max_steps=20", "train.eval_every=10", "eval.num_examples=20",
           "eval.test_examples=20", "eval.batch_size=20"]
STAGES = ["teacher", "student", "emulator", "coupled"]


@pytest.fixture(scope="module")
def kd_pipeline(ray_head, reasonlab_home):
    """The tiny ICoT-KD job, SIGKILLed once its student stage has a checkpoint, then run again."""
    name = "kd-staged"
    args = ["train", "jobs/icot_kd.yaml", *KD_TINY, f"tracking.run_name={name}"]
    registered = kill_after_first_checkpoint(args, f"{name}-student", reasonlab_home)
    teacher = _run(reasonlab_home, f"{name}-teacher")
    result = reasonlab(*args)
    return {"name": name, "registered": registered, "teacher_before": teacher, "result": result}


def test_a_killed_staged_job_skips_finished_stages_and_resumes_the_unfinished_one(kd_pipeline, reasonlab_home):
    result, name = kd_pipeline["result"], kd_pipeline["name"]
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert kd_pipeline["teacher_before"].info.status == "FINISHED"
    assert "stage 1/4 teacher: finished already" in out  # not trained again
    assert f"resumed from the checkpoint at step {kd_pipeline['registered']}" in out  # the student went on

    client = _client(reasonlab_home)
    parent = _run(reasonlab_home, name)
    assert parent.info.status == "FINISHED" and parent.data.tags["reasonlab.stages"] == ",".join(STAGES)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(f"{name}-{s}" for s in STAGES)
    assert {c.info.status for c in children} == {"FINISHED"}
    runs = {c.info.run_name.removeprefix(f"{name}-"): c for c in children}
    teacher = runs["teacher"]
    assert teacher.info.run_id == kd_pipeline["teacher_before"].info.run_id
    assert teacher.info.end_time == kd_pipeline["teacher_before"].info.end_time

    # each stage read the models of the stages it names, as finished runs
    ids = {s: runs[s].info.run_id for s in STAGES}
    assert runs["student"].data.params["method.teacher"] == ids["teacher"]
    assert runs["emulator"].data.params["method.student"] == ids["student"]
    assert runs["coupled"].data.params["method.emulator"] == ids["emulator"]
    assert [runs[s].data.params["method.name"] for s in STAGES] == ["cot", "kd_student", "kd_emulator", "kd_coupled"]
    # the coupled model was evaluated and saved whole; the parent stands for it
    coupled = runs["coupled"]
    assert {"test/accuracy", "eval/accuracy", "test/tokens_per_example"} <= set(coupled.data.metrics)
    files = _artifacts(client, coupled.info.run_id)
    assert {"model/student/kd_parts.safetensors", "model/emulator/kd_parts.safetensors", "predictions.jsonl"} <= files
    assert parent.data.tags["reasonlab.final_run"] == coupled.info.run_id
    assert parent.data.metrics["test/accuracy"] == coupled.data.metrics["test/accuracy"]
    # every stage shortened by the one command-line override
    assert {r.data.params["train.max_steps"] for r in children} == {"20"}


def _job(tmp_path, stages: dict, name="bad.yaml") -> str:
    job = yaml.safe_load((REPO / "jobs" / "icot_kd.yaml").read_text())
    job["stages"] = stages
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return str(path)


def _refused(args, message):
    result = cli_in_fresh_python(*args)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "NO_RAY" in result.stdout


def test_bad_stages_and_references_fail_before_ray(kd_pipeline, reasonlab_home, tmp_path):
    cot = {"method": {"name": "cot"}}
    _refused(["train", _job(tmp_path, {"teacher": cot, "student": {"method": {"name": "kd_student",
                                                                              "teacher": "techer"}}})],
             "stages.student: method.teacher: 'techer' is neither a stage of this job (teacher, student)")
    _refused(["train", _job(tmp_path, {
        "a": {"method": {"name": "kd_coupled", "student": "b", "emulator": "c"}},
        "b": {"method": {"name": "kd_student", "teacher": "a"}},
        "c": {"method": {"name": "kd_emulator", "teacher": "b", "student": "b"}}})],
        "stages: a cycle: a → b → a")
    _refused(["train", "jobs/icot_kd.yaml", "stages.studnt.train.lr=1"], "no stage 'studnt'")
    _refused(["train", "jobs/icot_kd.yaml", "method.fix_emulatr=true"], "no stage's method has this key")
    # a finished run as the teacher: it must be finished, and trained on this task
    finished = f"{kd_pipeline['name']}-teacher"
    _refused(["train", "jobs/icot_kd.yaml", "task.a_digits=3", f"stages.student.method.teacher={finished}"],
             f"run '{finished}' was trained with task.a_digits=2, this job has 3")
    client = MlflowClient(f"sqlite:///{reasonlab_home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("reasonlab").experiment_id
    running = client.create_run(experiment, run_name="still-running", tags={"reasonlab.run_name": "still-running"})
    try:
        _refused(["train", "jobs/icot_kd.yaml", "stages.student.method.teacher=still-running"],
                 "run 'still-running' is RUNNING, not FINISHED")
    finally:
        client.set_terminated(running.info.run_id, "KILLED")
    student = {"name": "kd_student", "teacher": "no-such-run"}  # the same checks outside a staged job
    job = yaml.safe_load((REPO / "jobs" / "si_mult_2x2.yaml").read_text())
    job["method"] = student
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(job))
    _refused(["train", str(tmp_path / "student.yaml")], "method.teacher: no run with id or name 'no-such-run'")


def test_a_comparison_evaluates_every_method_on_one_test_set(kd_pipeline, reasonlab_home, tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({
        "compare": {"nocot": {"job": str(REPO / "jobs" / "si_mult_2x2.yaml"), "overrides": ["method={name: nocot}"]},
                    "icot_kd": {"run": kd_pipeline["name"]},  # the staged job's final model
                    "diffusion": {"job": str(REPO / "jobs" / "dot_mult.yaml"),
                                  "overrides": ["task.a_digits=2", "task.b_digits=2", "method.steps=4"]}},
        "eval_batch_sizes": [1, 10], "test_examples": 20}, sort_keys=False))
    result = reasonlab("sweep", str(path), *KD_TINY)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    client = _client(reasonlab_home)
    parent = client.get_run(result.stdout.split("MLflow parent run id ")[1].split()[0])
    assert parent.info.status == "FINISHED"
    rows = list(csv.DictReader(open(client.download_artifacts(parent.info.run_id, "comparison.csv", str(tmp_path)))))
    assert [r["method"] for r in rows] == ["nocot", "icot_kd", "diffusion"]
    assert "accuracy_vs_speed.png" in _artifacts(client, parent.info.run_id)
    children = {c.info.run_name: c for c in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    name = parent.info.run_name
    assert {c.info.status for c in children.values()} == {"FINISHED"}
    coupled = _run(reasonlab_home, f"{kd_pipeline['name']}-coupled")
    for r in rows:
        trained = client.get_run(r["trained_run_id"])
        if r["method"] == "icot_kd":
            assert trained.info.run_id == coupled.info.run_id
            assert int(r["train_steps"]) == 80  # four stages of 20
        else:
            assert children[f"{name}-{r['method']}"].info.run_id == trained.info.run_id
            assert int(r["train_steps"]) == 20
        for b in (1, 10):  # the table's numbers are those of the evaluation runs
            evaluation = children[f"{name}-{r['method']}-bs{b}"]
            assert evaluation.data.tags["reasonlab.trained_run"] == trained.info.run_id
            assert evaluation.data.params["eval.batch_size"] == str(b)
            assert float(r[f"accuracy_bs{b}"]) == evaluation.data.metrics["test/accuracy"]
            assert float(r[f"examples_per_sec_bs{b}"]) == evaluation.data.metrics["test/examples_per_sec"]
            assert evaluation.data.metrics["test/tokens_per_example"] > 0
        assert int(r["n_params"]) == int(trained.data.params["param_count"])
    assert "pareto" in rows[0] and any(r["pareto"] == "True" for r in rows)
