"""Whether the Ray cluster can ever hold a job's workers, decided before Train or Tune starts waiting for them.

Ray Train waits for a worker group no node can hold (a GPU on a CPU-only cluster) until its start-up times out,
then its failure policy starts it again, forever. So the driver asks first, after `ray.init` and before an
MLflow run exists: `check_cluster_resources` raises a ConfigError naming the key and what the cluster offers.

On an autoscaling cluster the answer counts the nodes the autoscaler may add. Ray publishes their types in the
GCS cluster config on some platforms (what Ray Train's own check reads); where an autoscaler runs but does not
publish them (the cluster launcher, KubeRay), nothing is decided and the job waits for scaling as before. A
cluster of nodes started by hand (`ray start`, `ray.init()`) is fixed: what its nodes have is all there is.

`resource_shortfall` is the decision, a pure function of plain dicts, so it is tested without Ray.
"""
from __future__ import annotations

import json
import math

from reasonlab.errors import ConfigError

EPS = 1e-4  # Ray counts resources in units of 1/10000
SHOWN = ("CPU", "GPU")  # the resources an offer is described by (besides the requested ones)
KEYS = {"CPU": "scaling.cpus_per_worker", "GPU": "scaling.gpus_per_worker"}


def resource_shortfall(per_worker: dict[str, float], num_workers: int, nodes: list[dict[str, float]],
                       node_types: list[dict] | None) -> str | None:
    """Why `num_workers` workers needing `per_worker` each can never all run on this cluster (one line naming
    the config key), or None if they can, or may once the autoscaler adds nodes.

    nodes: the total resources of each alive node. node_types: the node types an autoscaler may add, each
    {"name": str, "resources": {...}, "max_count": int (-1: no limit)}; [] for a fixed cluster; None when an
    autoscaler manages the cluster without saying what it may add (no verdict then).
    """
    if node_types is None:
        return None
    wanted = {k: v for k, v in per_worker.items() if v > 0}
    shapes = [(dict(n), 1) for n in nodes] + [(dict(t["resources"]), t["max_count"])
                                              for t in node_types if t["max_count"] != 0]
    capacity = 0.0
    for resources, count in shapes:
        fit = _workers_per_node(wanted, resources)
        capacity += math.inf if fit and count < 0 else fit * count
    if capacity >= num_workers:
        return None
    offer = describe_offer(nodes, node_types, wanted)
    for name, amount in wanted.items():
        most = max((resources.get(name, 0.0) for resources, _ in shapes), default=0.0)
        if most + EPS >= amount:
            continue
        if name == "GPU" and most == 0:
            return (f"scaling.use_gpu: the job asks for {amount:g} GPU per worker, but the cluster has no GPUs "
                    f"({offer}); set scaling.use_gpu=false, or run it on a cluster with GPUs")
        key = KEYS.get(name, "scaling")
        return f"{key}: {amount:g} {name} per worker, but no node has more than {most:g} ({offer})"
    if capacity == 0:
        return f"scaling: no node holds one worker's {_show(wanted)} together ({offer})"
    return (f"scaling.num_workers: {num_workers} workers of {_show(wanted)} each, but the cluster holds at most "
            f"{capacity:g} at once ({offer})")


def _workers_per_node(wanted: dict[str, float], resources: dict[str, float]) -> int:
    if not wanted:
        return 1_000_000
    return min(math.floor((resources.get(name, 0.0) + EPS) / amount) for name, amount in wanted.items())


def describe_offer(nodes: list[dict[str, float]], node_types: list[dict], wanted: dict | None = None) -> str:
    """`1 node with CPU 2` / `2 nodes with CPU 8, GPU 1; the autoscaler may add gpu (CPU 8, GPU 4) x4`."""
    keys = list(dict.fromkeys([*SHOWN, *(wanted or {})]))
    groups: dict[str, int] = {}
    for node in nodes:
        shape = _show({k: node.get(k, 0.0) for k in keys if node.get(k, 0.0)}) or "no CPUs or GPUs"
        groups[shape] = groups.get(shape, 0) + 1
    text = "; ".join(f"{n} node{'s' if n > 1 else ''} with {shape}" for shape, n in groups.items()) or "no nodes"
    extra = [f"{t.get('name') or 'a node type'} ({_show({k: v for k, v in t['resources'].items() if k in keys})}) "
             f"x{'any' if t['max_count'] < 0 else t['max_count']}" for t in node_types if t["max_count"] != 0]
    return text + (f"; the autoscaler may add {', '.join(extra)}" if extra else "")


def _show(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in resources.items())


# ----------------------------------------------------------------------------------------------------
# Asking the connected cluster


def check_cluster_resources(requests: list[tuple[dict[str, float], int]], where: str = "") -> None:
    """ConfigError (prefixed `where`) if the connected Ray cluster can never hold one of these worker groups,
    each (resources per worker, number of workers): the one check of `reasonlab train` and `reasonlab sweep`."""
    nodes, node_types = cluster_offer()
    for per_worker, num_workers in requests:
        problem = resource_shortfall(per_worker, num_workers, nodes, node_types)
        if problem:
            raise ConfigError(f"{where}{problem}")


def cluster_offer() -> tuple[list[dict[str, float]], list[dict] | None]:
    """(total resources of each alive node, the node types an autoscaler may add or None): see resource_shortfall."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return nodes, _node_types()


def _node_types() -> list[dict] | None:
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()  # what Ray Train's own resource check reads
        if config is not None and config.node_group_configs:
            return [{"name": g.name, "resources": {k: float(v) for k, v in g.resources.items()},
                     "max_count": g.max_count} for g in config.node_group_configs]
        return None if _managed_by_autoscaler() else []
    except Exception:  # noqa: BLE001 (a Ray that answers differently: decide nothing, wait as before)
        return None


def _managed_by_autoscaler() -> bool:
    """Nodes of named types present or being launched: a cluster an autoscaler manages (the cluster launcher and
    KubeRay name every node's type; a node started by hand has none, and Ray calls it `node_<id>`)."""
    import ray
    from ray._private import ray_constants
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.experimental import internal_kv

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    if status.pending_launches or status.pending_nodes:
        return True
    if any(n.ray_node_type_name != f"node_{n.node_id}" for n in [*status.active_nodes, *status.idle_nodes]):
        return True
    # the v1 autoscaler (RAY_UP_enable_autoscaler_v2=0) reports the types of the nodes it manages
    raw = internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
    mapping = report.get("node_type_mapping") or {}
    return bool(report.get("pending_launches")) or any(t != f"node_{i}" for i, t in mapping.items())
