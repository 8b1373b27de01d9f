"""How a driver stops when it is told to: SIGTERM (`kill`, `timeout`, `ray job stop`) is handled as Ctrl-C.

Ray's `ray.init` installs a SIGTERM handler that raises SystemExit wherever the driver is, and Train and Tune
have their own Ctrl-C handling (Train aborts its workers, then exits; Tune stops its trials and saves the
experiment so `Tuner.restore` can resume it). So on SIGTERM the driver first closes what it has open as KILLED
(`ray job stop` sends SIGKILL 3 s later: RAY_JOB_STOP_WAIT_TIME_S), then calls the SIGINT handler, and the
stop takes the same path as Ctrl-C, whichever of those handlers is installed at that moment (a KeyboardInterrupt
where SIGINT is ignored, as in a background job started by a script). `handle_sigterm` is called when
the CLI starts and again after `ray.init` (`connect`), which replaces it.

`connect` is also where a driver joins Ray: an address nothing answers on, or a cluster that refuses the token,
is one line before any run exists, and the job's runtime env carries what every worker and actor of it needs
(quiet logging, the cluster's address, Train's poll interval). After a stop, `disconnect` leaves Ray before
the CLI's last line, which names the command that resumes what was stopped.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from typing import Callable

from reasonlab.errors import ConfigError

_on_stop: dict[int, Callable[[], None]] = {}  # what to close first on SIGTERM, by handle
received: list[int] = []  # the stop signals received, for the CLI's last line
run_names: list[str] = []  # the top-level runs this process started or resumed: a stopped one resumes by name
resume_hint: list[str] = []  # the command that resumes what was stopped, for the CLI's last line


def on_stop(close: Callable[[], None]) -> int:
    """Call `close` first if SIGTERM comes (e.g. a run's end as KILLED); returns a handle for `done`."""
    handle = id(close)
    _on_stop[handle] = close
    return handle


def done(handle: int) -> None:
    _on_stop.pop(handle, None)


def _sigterm(signum, frame) -> None:
    received.append(signum)
    for close in list(_on_stop.values()):
        try:
            close()
        except Exception:  # a store that cannot be reached must not stop the stop
            pass
    _on_stop.clear()
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):  # Train's, Tune's, or Python's own (KeyboardInterrupt)
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (`nohup reasonlab ... &` from a script): a stop all the same
        raise KeyboardInterrupt


def handle_sigterm() -> None:
    """SIGTERM handled as described above (only the main thread may install handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


def connect() -> None:
    """Connect this driver to Ray (RAY_ADDRESS, or a local instance) unless it is connected, with Ray's own
    logging quiet below warnings, and keep SIGTERM handled as Ctrl-C."""
    import ray

    if not ray.is_initialized():
        # the job's workers and actors log at WARNING too: their INFO lines (checkpoint created, result reported,
        # worker group started, dataset execution) came between our step lines. Ray Data configures its own
        # logger in each actor that runs a dataset (the split coordinator's "Dataset ... execution finished"
        # arrived after a stopped driver's last line), and reads its level from the environment there. Train's
        # DataConfig still passes a deprecated option of Ray Data's, which warned once per worker. Train's
        # controller polls its workers every 2 s by default, and a worker's report (every evaluation and
        # checkpoint) waits for that poll: at 0.25 s a 300-step run reporting 15 times took 45 s instead of 74 s
        env = {"RAY_DATA_LOG_LEVEL": os.environ.get("RAY_DATA_LOG_LEVEL", "WARNING"),
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"),
               "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS",
                                                "ignore:`ExecutionOptions.exclude_resources` is deprecated")}
        address = os.environ.get("RAY_ADDRESS")
        _check_reachable(address)  # Ray's own connect waited over ten minutes for a port nothing listens on
        if address and address not in ("auto", "local"):
            # Train's placement-group cleaner (an actor) asks the state API with no address, which picks the
            # latest of several Ray instances on a machine: with another running, it failed to stop after 12 s
            # at the end of every run and a killed trial's placement group leaked
            env["RAY_ADDRESS"] = address
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True, configure_logging=True,
                     logging_config=ray.LoggingConfig(log_level="WARNING"), runtime_env={"env_vars": env})
        except ConnectionError as e:
            raise ConfigError(f"RAY_ADDRESS={address}: {_unreachable(e)}") from None
    handle_sigterm()


def _check_reachable(address: str | None) -> None:
    """A `host:port` address whose port takes no connection is refused in one line within seconds."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({e})") from None


def _unreachable(error: BaseException) -> str:
    """Why `ray.init` could not connect, in one line. Ray names the refused token only inside the text of the
    error it chains (the last connection attempt's traceback)."""
    chain, cause = [], error
    while cause is not None and len(chain) < 10:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    if any("AuthenticationError" in text or "InvalidAuthToken" in text for text in chain):
        return ("the Ray cluster there refused this driver's token: use the cluster's own "
                "(RAY_AUTH_MODE=token, and `ray get-auth-token` on its head node)")
    return f"no Ray cluster answers there ({chain[0].splitlines()[0]})"


def disconnect() -> None:
    """Leave Ray after a stop, so no line forwarded from a worker or actor comes after the driver's last one."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        with contextlib.suppress(Exception):
            sys.modules["ray"].shutdown()


@contextlib.contextmanager
def tune_interruption():
    """Whether Tune's own Ctrl-C handler ended a `Tuner.fit()` run inside the block: the yielded list holds True
    afterwards if so. Tune installs its handler for the fit and, on the first SIGINT (or SIGTERM, through ours),
    puts back the handler it found, which is this block's marker; a fit that ends normally leaves Tune's."""
    state: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.getsignal(signal.SIGINT)

    def marker(signum, frame):
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, marker)
    try:
        yield state
    finally:
        state.append(signal.getsignal(signal.SIGINT) is marker)
        signal.signal(signal.SIGINT, previous)
