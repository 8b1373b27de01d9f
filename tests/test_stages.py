"""Staged job files, without Ray: how stages are merged from the shared sections, where command-line
overrides land, dropping a stage, and the order and cycle checks."""
from __future__ import annotations

import pytest
import yaml

from conftest import REPO
from reasonlab.config import ConfigError
from reasonlab.runref import RunRef
from reasonlab.stages import Pipeline, load_job

KD = REPO / "jobs" / "icot_kd.yaml"


def test_stages_merge_the_shared_sections_and_run_in_dependency_order():
    job = load_job(KD)
    assert isinstance(job, Pipeline) and [s.name for s in job.stages] == ["teacher", "student", "emulator", "coupled"]
    teacher, student, emulator, coupled = job.stages
    assert teacher.cfg.method.name == "cot" and teacher.cfg.train.max_steps == 2000
    assert emulator.cfg.train.max_steps == 3000 and emulator.cfg.train.lr == teacher.cfg.train.lr  # merged key by key
    assert coupled.cfg.train.lr == 3e-4
    assert {s.cfg.model.d_model for s in job.stages} == {128}
    assert student.needs == {"teacher": "teacher"} and coupled.needs == {"student": "student", "emulator": "emulator"}


def test_overrides_reach_every_stage_one_stage_or_the_stages_whose_method_has_the_key():
    job = load_job(KD, ["train.max_steps=7", "stages.student.train.lr=0.5", "method.fix_emulator=true",
                        "method.teacher=some-cot-run"])
    assert {s.cfg.train.max_steps for s in job.stages} == {7}  # over each stage's own value too
    assert [s.cfg.train.lr for s in job.stages] == [1e-3, 0.5, 1e-3, 3e-4]
    coupled = job.stages[-1].cfg.method
    assert coupled.fix_emulator is True
    # method.teacher reaches the two stages that read a teacher, which then no longer need the teacher stage
    assert [s.cfg.method.teacher for s in job.stages[1:3]] == [RunRef("some-cot-run")] * 2
    assert job.stages[1].needs == {}


def test_a_stage_can_be_dropped_when_a_finished_run_stands_in_for_it():
    job = load_job(KD, ["stages.teacher=null", "method.teacher=some-cot-run"])
    assert [s.name for s in job.stages] == ["student", "emulator", "coupled"]
    with pytest.raises(ConfigError, match="stages.studnt=null: no stage 'studnt'"):
        load_job(KD, ["stages.studnt=null"])


def test_a_job_without_stages_is_one_config():
    cfg = load_job(REPO / "jobs" / "si_mult_2x2.yaml", ["train.max_steps=5"])
    assert not isinstance(cfg, Pipeline) and cfg.train.max_steps == 5


@pytest.mark.parametrize("stages, message", [
    ({"a": {"method": {"name": "kd_student", "teacher": "a"}}}, "a cycle: a → a"),
    ({"t": {"method": {"name": "cot"}}, "s": {"method": {"name": "kd_student", "teacher": "t@100"}}},
     "a stage's model has no snapshots"),
    ({"t": {"method": {"name": "cot"}, "tracking": {"run_name": "x"}}}, "tracking.run_name is set for the whole job"),
    ({"t": {"method": {"name": "cot", "lr": 1}}}, "stages.t: method.lr: unknown key"),
    ([], "stages: expected a mapping"),
])
def test_bad_stages(tmp_path, stages, message):
    job = yaml.safe_load(KD.read_text())
    job["stages"] = stages
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    with pytest.raises(ConfigError, match=message):
        load_job(path)
