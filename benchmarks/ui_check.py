"""`reasonlab ui` opened in a real browser: how long the server takes to answer and how much memory it holds,
which view a reasonlab experiment opens in, which columns its runs table shows, what its Models tab lists.

Run by hand (not in CI), with Debian's Chromium (`apt-get install chromium`) driven over the DevTools protocol
(aiohttp, which Ray already installs; no Playwright):

    python benchmarks/ui_check.py                          # the runs in $REASONLAB_HOME (~/.reasonlab)
    python benchmarks/ui_check.py --home /tmp/rl --fixture # first a one-run store there, without Ray
    python benchmarks/ui_check.py --ui-command 'python -m mlflow ui ...'   # time another server instead

It prints what it saw, one line per check, then a JSON summary; screenshots go to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_memory(pgid: int) -> dict:
    """Processes of the process group `pgid`: how many, and their resident (RSS) and proportional (PSS,
    shared pages split between the processes sharing them) memory in MiB."""
    n, rss, pss = 0, 0, 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            rollup = Path(f"/proc/{entry}/smaps_rollup").read_text().splitlines()
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:]}
        n, rss, pss = n + 1, rss + fields.get("Rss", 0), pss + fields.get("Pss", 0)
    return {"processes": n, "rss_mib": round(rss / 1024), "pss_mib": round(pss / 1024)}


def make_fixture(home: Path) -> None:
    """A one-run store in `home` as `reasonlab train` leaves it (experiment, params, metrics, final model),
    written by the same tracking and train functions, with a tiny untrained model and no Ray."""
    os.environ["REASONLAB_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import torch

    from reasonlab.config import load_config
    from reasonlab.methods import make_method
    from reasonlab.tasks import make_task
    from reasonlab.tokenizer import build_tokenizer
    from reasonlab.tracking import DriverRun, RunLogger
    from reasonlab.train import log_model, size_params

    cfg = load_config(str(REPO / "jobs" / "quickstart.yaml"),
                   ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "tracking.run_name=ui-check"])
    task, method = make_task(cfg.task), make_method(cfg.method, cfg)
    tokenizer = build_tokenizer(task)
    method.setup(task, tokenizer)
    model = method.build_model(cfg.model, tokenizer, 64, torch.device("cpu"))
    run = DriverRun(cfg, cfg.tracking.run_name)
    with run.closing():
        logger = RunLogger(run.uri, run.run_id)
        logger.log_params(size_params(model, range(len(tokenizer))))
        for step in (20, 40):
            logger.log_metrics({"train/loss": 2.0 / step, "train/lr": 1e-3, "train/tokens_per_sec": 1e4}, step)
        logger.log_metrics({"eval/accuracy": 0.5, "eval/examples_per_sec": 100.0}, 40)
        logger.log_metrics({"test/accuracy": 0.5, "test/examples_per_sec": 100.0}, 40)
        log_model(model, tokenizer, method, logger, "model", logged_model_step=40)


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def send(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout: float = 60.0):
        """The value of `expression` once it is truthy (polled), or None after `timeout` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = await self.eval(expression)
            except RuntimeError:
                value = None  # the page is navigating
            if value:
                return value
            await asyncio.sleep(0.25)
        return None

    async def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"]))


def flavors(artifact_uri: str) -> list[str]:
    """The flavours in a local logged model's MLmodel file (its `flavors:` keys)."""
    mlmodel = Path(artifact_uri.removeprefix("file://")) / "MLmodel"
    if not mlmodel.is_file():
        return []
    lines = mlmodel.read_text().splitlines()
    start = lines.index("flavors:") + 1 if "flavors:" in lines else len(lines)
    out = []
    for line in lines[start:]:
        if not line.startswith(" "):
            break
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            out.append(line.strip()[:-1])
    return out


TEXT = "document.body ? document.body.innerText : ''"
HEADERS = ("[...document.querySelectorAll('.ag-header-cell-text, .ag-header-group-text, [role=columnheader]')]"
           ".map(e => e.textContent.trim()).filter((t, i, all) => t && all.indexOf(t) === i)")
TABS = ("[...document.querySelectorAll('[role=tab], [role=radio], [aria-selected=true], [aria-checked=true]')]"
        ".map(e => (e.getAttribute('aria-selected') === 'true' || e.getAttribute('aria-checked') === 'true' ? '*' : '')"
        " + e.textContent.trim()).filter(t => t && t.length < 40)")
ROWS = ("[...new Set([...document.querySelectorAll('[role=row]')].map(r => r.innerText.replace(/\\s+/g, ' ').trim())"
        ".filter(t => t && !t.startsWith('Model attributes')))]")
DIALOGS = "[...document.querySelectorAll('[role=dialog]')].map(e => e.innerText.trim().slice(0, 120))"


async def browse(chromium: str, base: str, experiment_url: str, experiment_id: str, out: Path) -> dict:
    import aiohttp

    profile = tempfile.mkdtemp(prefix="ui-check-chromium-")
    browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--disable-dev-shm-usage", "--window-size=3000,1000", f"--user-data-dir={profile}",
                                "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen = {}
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            assert time.time() < deadline and browser.poll() is None, "chromium did not start"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                target = next(t for t in await r.json() if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Page.enable")
                await page.send("Runtime.enable")

                # 1. the address `reasonlab ui` prints: which view the experiment opens in
                t0 = time.time()
                await page.goto(experiment_url)
                await page.wait_for(f"({TEXT}).length > 200 && ({HEADERS}).length + ({TABS}).length > 0", 90)
                await asyncio.sleep(3)  # let redirects and pop-overs settle
                seen["experiment"] = {"opened": experiment_url, "seconds_to_content": round(time.time() - t0, 1),
                                      "landed_on": await page.eval("location.hash"), "tabs": await page.eval(TABS),
                                      "dialogs": await page.eval(DIALOGS),
                                      "mentions_traces": "Traces" in (await page.eval(TEXT)),
                                      "column_headers": await page.eval(HEADERS)}
                await page.screenshot(out / "1_experiment.png")

                # 2. the experiment's Models tab (logged models), in the same view
                query = experiment_url.partition("?")[2]
                await page.goto(f"{base}/#/experiments/{experiment_id}/models" + (f"?{query}" if query else ""))
                await page.wait_for(f"({TEXT}).includes('Models')", 60)
                await asyncio.sleep(4)
                text = await page.eval(TEXT)
                seen["models_tab"] = {"landed_on": await page.eval("location.hash"),
                                      "column_headers": await page.eval(HEADERS), "rows": await page.eval(ROWS),
                                      "text": text[:600]}
                await page.screenshot(out / "2_models.png")

                # 2b. the first logged model's page: can it be registered from there?
                async with http.post(f"{base}/ajax-api/2.0/mlflow/logged-models/search",
                                     json={"experiment_ids": [experiment_id]}) as r:
                    models = (await r.json()).get("models", [])
                seen["logged_models"] = [{"name": lm["info"]["name"], "model_id": lm["info"]["model_id"],
                                          "flavors": flavors(lm["info"].get("artifact_uri", "")),
                                          "source_run_id": lm["info"].get("source_run_id")} for lm in models]
                if models:
                    model_id = models[0]["info"]["model_id"]
                    await page.goto(f"{base}/#/experiments/{experiment_id}/models/{model_id}"
                                    + (f"?{query}" if query else ""))
                    await page.wait_for(f"({TEXT}).includes('{model_id}') || ({TEXT}).includes('Register')", 60)
                    await asyncio.sleep(3)
                    text = await page.eval(TEXT)
                    seen["model_page"] = {"landed_on": await page.eval("location.hash"),
                                          "register_button": "Register model" in text, "text": text[:400]}
                    await page.screenshot(out / "2b_model_page.png")
                    clicked = await page.eval("(() => { const b = [...document.querySelectorAll('button')].find("
                                              "e => e.textContent.trim() === 'Register model'); "
                                              "if (b) b.click(); return !!b; })()")
                    dialog = await page.wait_for(f"({DIALOGS}).join(' | ')", 20) if clicked else None
                    seen["model_page"]["register_dialog"] = (dialog or "")[:200]
                    await page.screenshot(out / "2c_register_dialog.png")

                # 3. the same tab opened without our address: MLflow's own default (GenAI) workflow
                await page.goto("about:blank")
                await page.goto(f"{base}/#/experiments/{experiment_id}")
                await page.wait_for(f"({TEXT}).length > 200", 60)
                await asyncio.sleep(4)
                seen["plain_link"] = {"landed_on": await page.eval("location.hash"), "tabs": await page.eval(TABS)}
                await page.screenshot(out / "3_plain_link.png")
    finally:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)
    return seen


def wait_until_answers(base: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the UI server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/experiments/search?max_results=10",
                                        timeout=5) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"the UI server did not answer within {timeout:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", help="REASONLAB_HOME whose runs to show (default: the environment's)")
    p.add_argument("--fixture", action="store_true", help="first write a one-run store into --home")
    p.add_argument("--experiment", default="reasonlab")
    p.add_argument("--ui-command", help="start this instead of `reasonlab ui --port PORT` ({port} is replaced)")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--out", default="ui_check_out", help="folder for the screenshots (default ./ui_check_out)")
    p.add_argument("--timeout", type=float, default=180)
    args = p.parse_args()
    if args.home:
        os.environ["REASONLAB_HOME"] = str(Path(args.home).resolve())
    if args.fixture:
        if not args.home:
            print("ui_check: --fixture needs --home (a folder for the new store)", file=sys.stderr)
            return 2
        make_fixture(Path(args.home))
    if not Path(args.chromium).is_file():
        print(f"ui_check: no Chromium at {args.chromium} (apt-get install chromium, or --chromium PATH)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = (shlex.split(args.ui_command.format(port=port)) if args.ui_command
               else [str(Path(sys.executable).parent / "reasonlab"), "ui", "--port", str(port)])
    log = open(out / "ui.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seconds = wait_until_answers(base, proc, args.timeout)
        memory_at_answer = group_memory(proc.pid)
        print(f"server answered after {seconds:.1f} s; {memory_at_answer['processes']} processes, "
              f"RSS {memory_at_answer['rss_mib']} MiB, PSS {memory_at_answer['pss_mib']} MiB", flush=True)
        with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name="
                                    f"{args.experiment}", timeout=10) as r:
            experiment = json.load(r)["experiment"]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        log.flush()
        printed = [w for line in (out / "ui.log").read_text().splitlines() for w in line.split()
                   if w.startswith("http://127.0.0.1") and "#/experiments/" in w]
        experiment_url = printed[0] if printed else f"{base}/#/experiments/{experiment['experiment_id']}"
        seen = asyncio.run(browse(args.chromium, base, experiment_url, experiment["experiment_id"], out))
        memory_after = group_memory(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()

    e, m, plain = seen["experiment"], seen["models_tab"], seen["plain_link"]
    print(f"experiment tags: mlflow.experimentKind={tags.get('mlflow.experimentKind')}; "
          f"shared views: {[k for k in tags if k.startswith('mlflow.sharedViewState.')]}")
    print(f"opened {e['opened']} -> {e['landed_on']} in {e['seconds_to_content']} s; tabs {e['tabs']}; "
          f"dialogs {e['dialogs']}")
    print(f"runs table columns: {e['column_headers']}")
    print(f"Models tab: {m['landed_on']}; rows {m['rows']}")
    print(f"logged models: {seen.get('logged_models')}; model page: "
          f"{ {k: v for k, v in seen.get('model_page', {}).items() if k != 'text'} }")
    print(f"plain experiment link (MLflow's default workflow) -> {plain['landed_on']}; tabs {plain['tabs']}")
    print(f"memory after browsing: {memory_after}")
    print(json.dumps({"seconds_to_answer": round(seconds, 1), "memory_at_answer": memory_at_answer,
                      "memory_after_browsing": memory_after, "tags": tags, **seen}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
