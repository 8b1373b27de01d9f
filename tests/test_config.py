"""Job files and overrides: typed, validated, one clear line and exit status 2 on bad input."""
from __future__ import annotations

import socket

import pytest

from conftest import REPO, cli_in_fresh_python
from reasonlab.config import Config, ConfigError, load_config
from reasonlab.stages import load_job
from reasonlab.tasks import make_task

QUICKSTART = REPO / "jobs" / "quickstart.yaml"


def test_quickstart_loads_and_overrides_apply():
    cfg = load_config(QUICKSTART, ["train.lr=3e-4", "model.n_layer=2", "task.a_digits=5", "scaling.use_gpu=true"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layer == 2 and cfg.task.a_digits == 5 and cfg.scaling.use_gpu is True
    assert cfg.job == "quickstart"
    flat = cfg.flat()
    assert flat["train.lr"] == 3e-4 and flat["task.name"] == "multiplication"
    assert set(k.split(".")[0] for k in flat) == {"task", "model", "method", "train", "eval", "tracking", "scaling"}


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(QUICKSTART, ["train.max_steps=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path).to_dict() == {**cfg.to_dict(), "job": "resolved"}


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1"], "train.lrr: unknown key"),
    (["model.n_layer=two"], "model.n_layer: expected an integer, got str 'two'"),
    (["model.n_layer=2.5"], "model.n_layer: expected an integer"),
    (["train.lr=0"], "train.lr: expected a value > 0, got 0.0"),
    (["train.lr=-1e-3"], "train.lr: expected a value > 0"),
    (["train.max_steps=0"], "train.max_steps: expected a value > 0, got 0"),
    (["model.arch=bert"], "model.arch: expected one of ['gpt2', 'llama'], got 'bert'"),
    (["method.name=magic"], "method.name: unknown method 'magic'"),
    (["task.name=sorting"], "task.name: unknown task 'sorting'"),
    (["optimizer.lr=1"], "optimizer: unknown section"),
    (["scaling.use_gpu=yes please"], "scaling.use_gpu: expected true or false"),
    (["train.batch_size=63", "scaling.num_workers=2"], "train.batch_size: 63 is not divisible"),
    (["model.d_model=130"], "model.d_model: 130 is not divisible by model.n_head=4"),
    (["train.lr"], "train.lr: expected an override of the form section.key=value"),
    (["task.a_digits=0"], "task.a_digits: expected 1 to 18 digits"),
    (["task.valid_path=/nonexistent.txt"], "task.valid_path: file not found"),
    (["tracking.run_name=a'b"], "tracking.run_name: expected letters, digits"),
    (["tracking.run_name=../up"], "tracking.run_name: expected letters, digits"),
    (["train.lr=1e400"], "train.lr: expected a finite number, got '1e400'"),
    (["train.weight_decay=.nan"], "train.weight_decay: expected a finite number, got nan"),
    (["model.pretrained=/nonexistent/dir"], "model.pretrained: /nonexistent/dir is not a folder holding a saved model"),
    (["model.pretrained=./no/such/model"], "/no/such/model is not a folder holding a saved model"),
    (["model.pretrained=~/no/such/model"], "/no/such/model is not a folder holding a saved model"),
    (["model.pretrained=owner/bad name!"], "model.pretrained: 'owner/bad name!' is neither a local model folder nor"),
    (["model.pretrained=owner/a--b"], "model.pretrained: 'owner/a--b' is neither a local model folder nor a hub id"),
    (["model.pretrained=-x"], "model.pretrained: '-x' is neither a local model folder nor a hub id"),
    (["eval.steps=4"], "eval.steps: sampling steps apply to diffusion methods; method.name is 'cot'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, override)
    assert message in str(e.value)


def test_local_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray workers run in another directory: the resolved config names files absolutely."""
    from conftest import REPO

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "test.txt").write_text("1 2 * 3 4||x #### 1 2 3 4\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "jobs" / "quickstart.yaml", ["task.test_path=test.txt", "model.pretrained=./model"])
    assert cfg.task.test_path == str(tmp_path / "test.txt") and cfg.model.pretrained == str(tmp_path / "model")
    assert load_config(REPO / "jobs" / "quickstart.yaml", ["model.pretrained=gpt2"]).model.pretrained == "gpt2"


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(bad)
    bad.write_text("model: {n_layer: 2}\n")
    with pytest.raises(ConfigError, match="task.name: required"):
        load_config(bad)
    bad.write_text("task: {name: gsm8k}\n")
    with pytest.raises(ConfigError, match="task.train_path: required"):
        load_config(bad)
    bad.write_bytes(b"task: {name: multiplication}\nmodel: {arch: \xff\xfe}\n")
    with pytest.raises(ConfigError, match="bad.yaml: not a UTF-8 text file"):
        load_config(bad)
    bad.write_bytes(b"task: {name: multiplication}\n\x00\x01\x02")  # valid UTF-8, but binary
    with pytest.raises(ConfigError, match=r"bad.yaml: not a text file \(control character 0x00 at byte 29\)") as e:
        load_config(bad)
    assert "\n" not in str(e.value)




@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub with an empty cache under tmp_path, online, and a hub endpoint nothing listens on."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connecting is refused at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    return constants


def test_a_hub_model_that_cannot_be_had_is_refused_by_the_driver_in_one_line(hub, tmp_path, capsys, monkeypatch):
    from reasonlab.cli import main
    from reasonlab.models.hub import check_hub_model

    with pytest.raises(ConfigError, match=r"model.pretrained: owner/model: cannot reach http://127.0.0.1:\d+ \("):
        check_hub_model("owner/model")
    hub.HF_HUB_OFFLINE = True
    with pytest.raises(ConfigError, match="owner/model is not in the local Hugging Face cache .* HF_HUB_OFFLINE"):
        check_hub_model("owner/model")
    # the CLI: exit status 2 and one line, from the driver before Ray or an MLflow run
    import reasonlab.tracking

    monkeypatch.setattr(reasonlab.tracking, "DriverRun", lambda *a, **k: pytest.fail("an MLflow run was created"))
    assert main(["train", str(QUICKSTART), "model.pretrained=owner/model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reasonlab: error: model.pretrained: owner/model is not in the local")
    assert len(err.splitlines()) == 1
    # a model in the cache loads offline: nothing asked
    snapshot = tmp_path / "hub" / "models--owner--model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--owner--model" / "refs").mkdir()
    (tmp_path / "hub" / "models--owner--model" / "refs" / "main").write_text("abc")
    check_hub_model("owner/model")


def test_a_hub_that_does_not_answer_fails_the_check_instead_of_hanging(hub, monkeypatch):
    import threading

    from huggingface_hub import HfApi

    from reasonlab.models.hub import check_hub_model

    release = threading.Event()
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: release.wait(60))  # a lookup that never returns
    try:
        with pytest.raises(ConfigError, match=r"model.pretrained: owner/model: no answer from .* within 0.5 s"):
            check_hub_model("owner/model", timeout=0.5)
    finally:
        release.set()


@pytest.mark.parametrize("args, message", [
    (["train", "jobs/quickstart.yaml", "train.lr=-1"], "train.lr: expected a value > 0"),
    (["train", "jobs/quickstart.yaml", "model.n_layers=4"], "model.n_layers: unknown key"),
    (["train", "jobs/quickstart.yaml", "train.max_steps=ten"], "train.max_steps: expected an integer"),
    (["train", "jobs/does_not_exist.yaml"], "jobs/does_not_exist.yaml: job file not found"),
    (["data", "sample", "multiplication", "a_digits=x"], "task.a_digits: expected an integer"),
    (["data", "sample", "nonsense"], "nonsense: unknown task"),
])
def test_cli_rejects_bad_input_with_one_line_and_status_2(args, message):
    result = cli_in_fresh_python(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"reasonlab: error: {result.stderr.split('error: ', 1)[1].strip()}"]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "NO_RAY" in result.stdout  # nothing started


def test_data_sample_prints_icot_lines():
    result = cli_in_fresh_python("data", "sample", "multiplication", "-n", "5", "--seed", "3",
                                 "a_digits=4", "b_digits=4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()[:-1]
    assert len(lines) == 5
    from reasonlab.tasks.multiplication import multiplication_example, operands
    for line in lines:
        a, b = operands(line.split("||")[0])
        assert multiplication_example(a, b, 4, 4).line() == line
    again = cli_in_fresh_python("data", "sample", "multiplication", "-n", "5", "--seed", "4",
                                "a_digits=4", "b_digits=4")
    assert again.stdout.splitlines()[:-1] != lines
    test_split = cli_in_fresh_python("data", "sample", "multiplication", "-n", "2", "--split", "test",
                                     f"test_path={REPO.parent / 'shared/data/icot/4_by_4_mult/test.txt'}")
    assert test_split.stdout.splitlines()[:-1] == (
        (REPO.parent / "shared/data/icot/4_by_4_mult/test.txt").read_text().splitlines()[:2])


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_file_loads_and_its_task_makes_examples(job):
    loaded = load_job(job)
    configs = [loaded] if isinstance(loaded, Config) else [stage.cfg for stage in loaded.stages]
    for cfg in configs:
        example = make_task(cfg.task).examples(0, 1)[0]
        assert example.prompt and example.answer, f"{job.name}: an empty example {example}"
