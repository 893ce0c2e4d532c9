"""Shared by the end-to-end tests (the layer-7 ones most): an agent of their own, its status, apply, run in a pod."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from mesh.runtime.local import LocalNode, NodeConfig, pod_sandbox
from tests.conftest import ROOT

EXAMPLE = ROOT / "examples/l7"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(state: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state / "status.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@contextmanager
def agent(state: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`webb agent` (node1, bridge webb0) until the block ends; SIGTERM removes what it made."""
    state.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "agent", "--state-dir", str(state), "--lifetime", "240", *args],
                            cwd=ROOT, stdout=open(state / "agent.log", "ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (status(state).get("pid") == proc.pid and status(state).get("running")):
            assert proc.poll() is None and time.monotonic() < deadline, (state / "agent.log").read_text()[-3000:]
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def apply(state: Path, path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mesh.cli", "apply", "-f", str(path), "--state-dir", str(state)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def in_pod(state: Path, pod: str, argv: Sequence[str], timeout_s: float = 20) -> subprocess.CompletedProcess[str]:
    """Run argv in a pod's netns and cgroup (so connect() goes through the datapath)."""
    cfg = NodeConfig(state_dir=state)
    proc = LocalNode(cfg).spawn(pod_sandbox(cfg, f"default/{pod}"), list(argv),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out.decode(), err.decode())


def curl(state: Path, pod: str, url: str, *opts: str) -> tuple[int, str]:
    """(HTTP status, body) of one request from ``pod``; status 0 when curl itself failed."""
    r = in_pod(state, pod, ["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *opts, url])
    body, _, code = r.stdout.rpartition("\n")
    return (int(code) if r.returncode == 0 and code.isdigit() else 0), body + r.stderr


def eventually(fn: Callable[[], T], ok: Callable[[T], bool], timeout_s: float = 20, step_s: float = 0.2) -> T:
    """fn() until ok(result) or the time is up; the last result either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if ok(got) or time.monotonic() > deadline:
            return got
        time.sleep(step_s)


def flows(state: Path) -> list[dict[str, Any]]:
    path = state / "flows.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
