"""One local Ray instance (token authentication on) and one throwaway reasonlab home per test session."""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ICOT = SHARED / "data" / "icot"
BIN = Path(sys.executable).parent

# The session's Ray head has token authentication on; Ray reads the mode once, so set it before any import
os.environ["RAY_AUTH_MODE"] = "token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def reasonlab_home(tmp_path_factory):
    """Runs and checkpoints of the whole session go to a temporary home, never ~/.reasonlab."""
    home = tmp_path_factory.mktemp("reasonlab_home")
    saved = {k: os.environ.get(k) for k in ("REASONLAB_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["REASONLAB_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_head(reasonlab_home):
    """`ray start --head` on loopback, as a user would run it; drivers reach it through RAY_ADDRESS. A Ray test
    that fails is followed by a fresh head (see `pytest_runtest_makereport`), so what a failure leaves behind on
    the cluster cannot starve every later test; the dict is updated in place."""
    info = _start_head()
    _heads.append(info)
    yield info
    os.environ.pop("RAY_ADDRESS", None)
    _stop_head(info["temp_dir"])
    shutil.rmtree(info["temp_dir"], ignore_errors=True)
    _heads.clear()


_heads: list[dict] = []  # the session's head, once started


def _start_head() -> dict:
    ray = str(BIN / "ray")
    # not the RAY_ADDRESS of a head this replaces: `ray job submit` prefers it to its --address
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port, dashboard = _free_port(), _free_port()
    # its own temp dir (short: Ray's socket paths live under it) names this head's processes at teardown,
    # and its own ports: another Ray on the machine (an experiment) holds the fixed default ones
    temp_dir = tempfile.mkdtemp(prefix="rl-ray-", dir="/tmp")
    own_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    subprocess.run(
        [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--disable-usage-stats", f"--temp-dir={temp_dir}", *own_ports],
        env=env, check=True, capture_output=True, timeout=180,
    )
    info = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env,
            "temp_dir": temp_dir}
    os.environ.update(RAY_ADDRESS=info["address"], RAY_AUTH_MODE="token")
    _wait_for_dashboard(dashboard)
    return info


# What a Ray test's failure left on the cluster: the CPUs free, the placement groups, the live actors, and the
# resource requests Ray Data's and Train's AutoscalingCoordinator holds (Ray Data sizes its work by what that
# actor reserves to it, not by the CPUs free: a request left by a killed Train run holds its CPUs for 180 s)
_CLUSTER_STATE = r"""
import time, ray
ray.init(logging_level="ERROR")
from ray.util.state import list_actors, list_placement_groups
print("CPUs free:", ray.available_resources().get("CPU", 0.0), "of", ray.cluster_resources().get("CPU", 0.0))
for pg in list_placement_groups(limit=1000):
    if pg.state != "REMOVED":
        print("placement group", pg.placement_group_id, pg.state, "job", pg.creator_job_id, pg.bundles)
for a in list_actors(filters=[("state", "!=", "DEAD")], limit=1000):
    print("actor", a.class_name, a.state, "job", a.job_id, a.required_resources)
try:
    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    def requests(self):
        now = time.time()
        return {k: (v.requested_resources, v.reserved_resources, round(v.expiration_time - now))
                for k, v in self._ongoing_reqs.items()}
    for requester, (wants, has, left) in ray.get(coordinator.__ray_call__.remote(requests), timeout=20).items():
        print("request", requester, "wants", wants, "has", has, f"expires in {left} s")
except Exception as e:
    print("AutoscalingCoordinator:", type(e).__name__, e)
"""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """After a failed Ray test (or its fixture): the cluster's state goes into its report, and the next test gets
    a fresh head."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "teardown" or not report.failed or not _heads or "ray_head" not in item.fixturenames:
        return
    info = _heads[0]
    try:
        state = subprocess.run([sys.executable, "-c", _CLUSTER_STATE], capture_output=True, text=True, timeout=60,
                               env=dict(info["env"], RAY_ADDRESS=info["address"]))
        text = state.stdout + state.stderr[-2000:]
    except subprocess.TimeoutExpired:
        text = "no answer from the cluster within 60 s"
    report.sections.append(("Ray cluster after the failure", text))
    _stop_head(info["temp_dir"])
    shutil.rmtree(info["temp_dir"], ignore_errors=True)
    info.update(_start_head())


def _stop_head(temp_dir: str) -> None:
    """Kill this session's Ray processes only: those whose command line names its temp dir (GCS, raylet,
    dashboard, agents) and their descendants (workers, which rename themselves). `ray stop` would also
    stop any other Ray instance on the machine, such as an experiment running while the tests do."""
    cmdlines, parents = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                cmdlines[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    doomed = {pid for pid, cmd in cmdlines.items() if temp_dir in cmd}
    while True:  # add children until none is left out
        more = {pid for pid, ppid in parents.items() if ppid in doomed} - doomed
        if not more:
            break
        doomed |= more
    for pid in doomed:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in doomed):
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:  # a zombie (state Z) has exited; its parent has not collected it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_dashboard(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError("the Ray dashboard did not come up")


def reasonlab(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `reasonlab` console script."""
    exe = shutil.which("reasonlab", path=str(BIN)) or "reasonlab"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env or dict(os.environ))


# A process that has imported what the CLI imports before it reads a job (torch and transformers with the method
# registry: about five of the six seconds a fresh interpreter takes to refuse bad input) and never Ray; each call
# is a fork of it, a process of its own as a fresh interpreter would be.
_FORK_SERVER = r"""
import json, os, sys, traceback
import reasonlab.cli, reasonlab.config
assert "ray" not in sys.modules
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        out, err = (os.open(request[k], os.O_WRONLY | os.O_CREAT | os.O_TRUNC) for k in ("out", "err"))
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        try:
            rc = reasonlab.cli.main(request["args"])
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        print("RAY_IMPORTED" if "ray" in sys.modules else "NO_RAY", flush=True)
        sys.stderr.flush()
        os._exit(rc or 0)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""
_fork_server: subprocess.Popen | None = None


def cli_in_fresh_python(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a process of its own that has not imported Ray; stdout ends with RAY_IMPORTED or NO_RAY (was
    anything started?)."""
    global _fork_server
    if _fork_server is None or _fork_server.poll() is not None:
        _fork_server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=REPO)
        atexit.register(_fork_server.kill)
    with tempfile.TemporaryDirectory() as d:
        out, err = Path(d) / "out", Path(d) / "err"
        request = {"args": list(args), "env": dict(os.environ), "cwd": str(REPO), "out": str(out), "err": str(err)}
        _fork_server.stdin.write(json.dumps(request) + "\n")
        _fork_server.stdin.flush()
        if not select.select([_fork_server.stdout], [], [], 120)[0]:
            _fork_server.kill()
            raise subprocess.TimeoutExpired(["reasonlab", *args], 120)
        rc = int(_fork_server.stdout.readline())
        return subprocess.CompletedProcess(["reasonlab", *args], rc, out.read_text(), err.read_text())
