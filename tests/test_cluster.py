"""Resources the cluster cannot offer fail fast: the decision as a pure function, then once on the local Ray."""
from __future__ import annotations

import pytest

from conftest import cli_in_fresh_python, reasonlab
from reasonlab.cluster import resource_shortfall

LAPTOP = [{"CPU": 2.0, "memory": 8e9, "object_store_memory": 2e9, "node:__internal_head__": 1.0}]
GPU_BOX = [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 1.0}]


@pytest.mark.parametrize("per_worker, workers, nodes, message", [
    ({"CPU": 1.0, "GPU": 0.25}, 1, LAPTOP,
     "scaling.use_gpu: the job asks for 0.25 GPU per worker, but the cluster has no GPUs (1 node with CPU 2)"),
    ({"CPU": 4.0}, 1, LAPTOP, "scaling.cpus_per_worker: 4 CPU per worker, but no node has more than 2 (1 node with"),
    ({"CPU": 1.0, "GPU": 2.0}, 1, GPU_BOX,
     "scaling.gpus_per_worker: 2 GPU per worker, but no node has more than 1 (2 nodes with CPU 16, GPU 1)"),
    ({"CPU": 1.0, "GPU": 1.0}, 3, GPU_BOX, "scaling.num_workers: 3 workers of CPU 1, GPU 1 each, but the cluster "
                                            "holds at most 2 at once"),
    ({"CPU": 8.0, "GPU": 1.0}, 1, [{"CPU": 8.0}, {"CPU": 2.0, "GPU": 1.0}],
     "scaling: no node holds one worker's CPU 8, GPU 1 together"),
])
def test_a_request_no_node_of_a_fixed_cluster_can_hold_names_the_key(per_worker, workers, nodes, message):
    problem = resource_shortfall(per_worker, workers, nodes, node_types=[])
    assert problem is not None and problem.startswith(message), problem
    assert "\n" not in problem


@pytest.mark.parametrize("per_worker, workers, nodes", [
    ({"CPU": 0.5}, 1, LAPTOP),
    ({"CPU": 0.9}, 2, LAPTOP),  # fractional workers share a node
    ({"CPU": 1.0, "GPU": 0.25}, 8, GPU_BOX),  # four trials per GPU
    ({"CPU": 1 / 3}, 6, LAPTOP),  # Ray rounds to 1/10000: six thirds fit in 2 CPUs
])
def test_requests_a_fixed_cluster_can_hold_pass(per_worker, workers, nodes):
    assert resource_shortfall(per_worker, workers, nodes, node_types=[]) is None


GPU_TYPE = {"name": "gpu-workers", "resources": {"CPU": 8, "GPU": 4}, "max_count": 2}


def test_an_autoscaling_cluster_waits_for_what_its_node_types_could_add():
    head = [{"CPU": 2.0}]  # no GPU now: the autoscaler would add GPU nodes for the job
    assert resource_shortfall({"CPU": 1.0, "GPU": 0.25}, 1, head, [GPU_TYPE]) is None
    assert resource_shortfall({"CPU": 1.0, "GPU": 1.0}, 8, head, [GPU_TYPE]) is None  # 2 nodes x 4 GPUs
    assert resource_shortfall({"CPU": 1.0, "GPU": 1.0}, 100, head, [{**GPU_TYPE, "max_count": -1}]) is None
    # what no node type has fails even there, and the offer lists the types
    problem = resource_shortfall({"CPU": 1.0, "GPU": 8.0}, 1, head, [GPU_TYPE])
    assert problem.startswith("scaling.gpus_per_worker: 8 GPU per worker, but no node has more than 4 "
                              "(1 node with CPU 2; the autoscaler may add gpu-workers (CPU 8, GPU 4) x2)"), problem
    assert resource_shortfall({"CPU": 1.0, "GPU": 1.0}, 9, head, [GPU_TYPE]).startswith("scaling.num_workers: 9")
    # a node type that may not be added (max_count 0) offers nothing
    assert resource_shortfall({"CPU": 1.0, "GPU": 1.0}, 1, head, [{**GPU_TYPE, "max_count": 0}]).startswith(
        "scaling.use_gpu:")


def test_an_autoscaler_that_does_not_publish_its_node_types_decides_nothing():
    assert resource_shortfall({"CPU": 1.0, "GPU": 1.0}, 1, LAPTOP, node_types=None) is None


@pytest.mark.ray
def test_a_gpu_job_on_the_local_cpu_cluster_exits_2_before_any_run(ray_head, reasonlab_home):
    """The CLI end to end on the session's CPU-only Ray head: one line, exit status 2, no MLflow run created."""
    from mlflow.tracking import MlflowClient

    before = _run_count(MlflowClient(f"sqlite:///{reasonlab_home / 'mlflow.db'}"))
    result = cli_in_fresh_python("train", "jobs/quickstart.yaml", "scaling.use_gpu=true",
                                 "tracking.run_name=wants-a-gpu")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "reasonlab: error: scaling.use_gpu: the job asks for 1 GPU per worker, but the cluster has no GPUs "
        "(1 node with CPU 2); set scaling.use_gpu=false, or run it on a cluster with GPUs"]
    assert _run_count(MlflowClient(f"sqlite:///{reasonlab_home / 'mlflow.db'}")) == before


def _run_count(client) -> int:
    try:
        return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())
    except Exception:  # no store yet
        return 0


def test_the_sweep_checks_its_trials_against_the_cluster(monkeypatch):
    """`reasonlab sweep search_spaces/capacity_vs_size.yaml` on a CPU-only cluster: each trial's workers ask for a
    quarter GPU; refused before the parent run (here against a stand-in cluster, without Ray)."""
    import ray

    import reasonlab.cluster
    from conftest import REPO
    from reasonlab.config import ConfigError
    from reasonlab.sweep import check_trial_resources, load_sweep

    sweep = load_sweep(REPO / "search_spaces" / "capacity_vs_size.yaml")
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(reasonlab.cluster, "cluster_offer", lambda: (LAPTOP, []))
    with pytest.raises(ConfigError, match=r"^sweep capacity_vs_size: scaling.use_gpu: the job asks for 0.25 GPU"):
        check_trial_resources(sweep, sweep.trial_config(0))
    monkeypatch.setattr(reasonlab.cluster, "cluster_offer", lambda: (GPU_BOX, []))
    check_trial_resources(sweep, sweep.trial_config(0))  # two 1-GPU nodes hold a trial's worker


def _listening_nowhere() -> str:
    import socket

    with socket.socket() as s:  # a port just freed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_an_address_where_no_cluster_listens_exits_2_in_one_line(reasonlab_home, monkeypatch):
    """Ray's own connect waited over ten minutes for such an address; the driver says so within seconds."""
    address = _listening_nowhere()
    monkeypatch.setenv("RAY_ADDRESS", address)
    result = reasonlab("train", "jobs/quickstart.yaml", "tracking.run_name=nowhere", timeout=60)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"reasonlab: error: RAY_ADDRESS={address}: no Ray cluster answers there ("), lines
    assert "starting run" not in result.stdout


@pytest.mark.ray
def test_a_cluster_that_refuses_the_token_exits_2_in_one_line(ray_head, reasonlab_home):
    # one connection attempt instead of Ray's twenty, a second apart
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["address"], RAY_AUTH_TOKEN="0" * 32,
               RAY_gcs_server_port_wait_time_s="1")
    result = reasonlab("train", "jobs/quickstart.yaml", "tracking.run_name=wrong-token", timeout=180, env=env)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"reasonlab: error: RAY_ADDRESS={ray_head['address']}: the Ray cluster there refused this driver's token: "
        "use the cluster's own (RAY_AUTH_MODE=token, and `ray get-auth-token` on its head node)")
