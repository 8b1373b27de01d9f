"""cluster.yaml is a valid Ray cluster-launcher config, checked by Ray's own code, without any cloud.

Ray 2.60 has no `ray up --dry-run`, so this uses what `ray up` runs first (private API):
prepare_config merges the AWS provider's defaults.yaml (a local file read; no boto3, no network)
and validate_config checks Ray's JSON schema plus head_node_type / min_workers rules.
"""
from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p3|p4d|p4de|p5|p5e|p5en|p6-b200)\.")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Prove the check makes no cloud calls: any socket connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster.yaml validation tried to open a connection: {args[1:]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture
def prepared() -> dict:
    return check(raw())


def test_cluster_yaml_passes_ray_validation(prepared):
    assert prepared["cluster_name"] == "reasonlab"
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # Only our own node types: the provider defaults must not have added any.
    assert set(prepared["available_node_types"]) == set(raw()["available_node_types"])


def test_misspelled_top_level_key_is_rejected():
    config = raw()
    config["setup_comands"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        check(config)


def test_min_workers_above_max_workers_is_rejected():
    config = raw()
    node_types = config["available_node_types"]
    workers = [name for name in node_types if name != config["head_node_type"]]
    for name in workers:
        node_types[name]["min_workers"] = node_types[name]["max_workers"] = config["max_workers"]
    assert sum(node_types[n]["min_workers"] for n in workers) > config["max_workers"]
    with pytest.raises(ValueError, match="max_workers"):
        check(config)


def test_head_runs_no_tasks_and_there_are_gpu_workers(prepared):
    node_types = prepared["available_node_types"]
    head = node_types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["max_workers"] == 0
    gpu_types = [
        name for name, t in node_types.items()
        if name != prepared["head_node_type"] and t["max_workers"] > 0
        and (t["resources"].get("GPU", 0) > 0 or GPU_INSTANCE.match(t["node_config"]["InstanceType"]))
    ]
    assert gpu_types, "no worker type with a GPU"
    for name in gpu_types:
        assert node_types[name]["min_workers"] == 0
    # One AMI everywhere: Ray needs the same Python on every node.
    images = {t["node_config"].get("ImageId") for t in node_types.values()}
    assert len(images) == 1 and next(iter(images)).startswith("ami-")


def test_setup_pins_this_ray_and_installs_the_project(prepared):
    pin = f'ray[default]=={ray.__version__}'
    # prepare_config merges setup_commands into the head's and the workers' lists.
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[key]
        assert any("pip install" in c and pin in c for c in commands), (key, pin)
        assert any(re.search(r"pip install -e \"?(~|\$HOME)/reasonlab", c) for c in commands), key
        assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in commands), key
    # Every pinned Ray in the file is this version.
    pins = re.findall(r"ray\[default\]==([\w.]+)", CLUSTER_YAML.read_text())
    assert pins and set(pins) == {ray.__version__}


def test_file_mounts_carry_project_and_auth_token(prepared):
    mounts = prepared["file_mounts"]
    assert mounts["~/reasonlab"] == "."
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in prepared["rsync_filter"]  # keeps .venv/ out of the copy


def test_start_commands_are_the_modern_form(prepared):
    head = " ".join(prepared["head_start_ray_commands"])
    workers = " ".join(prepared["worker_start_ray_commands"])
    assert prepared["head_start_ray_commands"][0] == "ray stop"
    assert prepared["worker_start_ray_commands"][0] == "ray stop"
    assert "ray start --head --port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers
    assert "redis" not in head + workers
