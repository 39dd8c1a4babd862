"""Notebooks opened as in JupyterLab on a fresh clone: a real ``jupyter server`` (started here on a free port with a
token, stopped after) serves a ``git clone`` of this checkout, which has no ``runs/rl`` and no data or models.
Each notebook gets a session through the REST API (``POST /api/sessions``: the kernel starts in ``notebooks/``,
as under JupyterLab) and its cells are sent in order over the kernel's websocket with the notebook's default
parameters (full mode). A notebook that needs what only ``make`` builds must stop in its first working cell with
an error naming the command and how long it takes; the others must pass their first cells (running them to the
end takes minutes in full mode: ``make reproduce`` and tests/test_notebooks.py do that)."""

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

from kl_lib.study.nbrun import KERNEL_NAME

tornado_websocket = pytest.importorskip("tornado.websocket")
pytest.importorskip("jupyter_server")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# Notebooks that read what make builds: (command named in the error, code cell index where they stop).
STOPS = {"03_rl_finetuning.ipynb": "make study-base-model", "04_evaluation.ipynb": "make study",
         "05_off_policy.ipynb": "make study"}
# Code cells run of the others: imports, parameters and the first working cell, except 06, whose third cell
# loads a model from the hub (no network in tests).
FIRST_CELLS = {"06_real_model.ipynb": 2}
CELL_TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A fresh clone and a Jupyter server on it: yields (base url, token, clone)."""
    tmp = tmp_path_factory.mktemp("jupyter")
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (clone / "runs" / "rl").exists() and not (clone / "data" / "models").exists()
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": str(clone), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "KL_TRACKING": "", "MPLBACKEND": "agg"}
    log = open(tmp / "server.log", "w")  # noqa: SIM115 — closed after the server stops
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}",
                             "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={clone}", "--ServerApp.port_retries=0",
                             *(["--allow-root"] if os.geteuid() == 0 else [])],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                _request(base, token, "GET", "/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"jupyter server did not start: {(tmp / 'server.log').read_text()}") from None
                time.sleep(0.5)
        specs = _request(base, token, "GET", "/api/kernelspecs")["kernelspecs"]
        if KERNEL_NAME not in specs:
            pytest.skip(f"kernel {KERNEL_NAME!r} is not registered (make env registers it)")
        yield base, token, clone
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _request(base: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        text = resp.read()
    return json.loads(text) if text else {}


async def _execute(ws, session: str, code: str) -> dict:
    """Run ``code`` on the kernel behind ``ws``; the execute_reply's content, with the error's output if any."""
    msg_id = uuid.uuid4().hex
    await ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": session, "msg_type": "execute_request",
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    reply, idle = None, False
    while reply is None or not idle:
        raw = await asyncio.wait_for(ws.read_message(), CELL_TIMEOUT)
        assert raw is not None, "the kernel's websocket closed"
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["channel"] == "shell" and msg["msg_type"] == "execute_reply":
            reply = msg["content"]
        elif msg["channel"] == "iopub" and msg["msg_type"] == "status":
            idle = msg["content"]["execution_state"] == "idle"
    return reply


async def _run_cells(base: str, token: str, kernel_id: str, cells: list[str]) -> list[dict]:
    """Each cell's execute_reply, in order, up to and including the first that fails."""
    url = base.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?token={token}"
    ws = await tornado_websocket.websocket_connect(url)
    session, replies = uuid.uuid4().hex, []
    try:
        for code in cells:
            replies.append(await _execute(ws, session, code))
            if replies[-1]["status"] != "ok":
                break
    finally:
        ws.close()
    return replies


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opened_in_a_fresh_clone_runs_or_names_the_command(server, name):
    base, token, clone = server
    nb = nbformat.read(clone / "notebooks" / name, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    notebooks = os.path.realpath(clone / "notebooks")
    probe = (f"import kl_lib, os; assert kl_lib.__file__.startswith({str(clone)!r}), kl_lib.__file__; "
             f"assert os.path.realpath(os.getcwd()) == {notebooks!r}, os.getcwd()")
    session = _request(base, token, "POST", "/api/sessions",
                       {"path": f"notebooks/{name}", "type": "notebook", "name": name,
                        "kernel": {"name": KERNEL_NAME}})
    try:
        count = 3 if name in STOPS else FIRST_CELLS.get(name, 3)
        replies = asyncio.run(_run_cells(base, token, session["kernel"]["id"], [probe, *code[:count]]))
    finally:
        _request(base, token, "DELETE", f"/api/sessions/{session['id']}")
    assert replies[0]["status"] == "ok", replies[0]  # the clone's kl_lib, kernel started in notebooks/
    cells = replies[1:]
    if name in STOPS:
        assert [r["status"] for r in cells] == ["ok", "ok", "error"], cells  # imports, parameters, then the stop
        error = cells[-1]
        assert error["ename"] == "MissingPrerequisite", error
        assert f"run `{STOPS[name]}`" in error["evalue"] and " min on 2 CPU cores" in error["evalue"], error["evalue"]
    else:
        assert [r["status"] for r in cells] == ["ok"] * count, cells
