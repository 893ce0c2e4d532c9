"""The real `hubble` CLI against a Webb node (issue 15): the Star Wars demo on a real agent (BPF, Envoy,
the kernel), `webb hubble serve` over the node's state dir, and hubble (built from
github.com/cilium/cilium, make hubble-cli) showing Webb's denials, with the pods' names and the drop
reason: xwing refused at connect() by MeshPolicy default/rule1 (L4), tiefighter's PUT /v1/exhaust-port
refused by Envoy's RBAC (L7, 403)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, leftovers
from tests.e2e.l7_support import agent, apply, curl, free_port
from tests.hubble_cli import popen_hubble, run_hubble

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]
STARWARS = ROOT / "examples/starwars"
URL = "http://deathstar.default.svc.cluster.local"


@contextmanager
def hubble_serve(state: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`webb hubble serve` until the block ends (and at most 180 s), ready when `hubble status` says Ok."""
    proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "hubble", "serve", "--state-dir", str(state),
                             "--listen", f"127.0.0.1:{port}", "--lifetime", "180"], cwd=ROOT,
                            stdout=open(state / "hubble.log", "ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while run_hubble("status", "--server", f"127.0.0.1:{port}", timeout_s=10).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (state / "hubble.log").read_text()[-3000:]
            time.sleep(0.2)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """The stdout lines of a running process, as they come (a reader thread that ends with the process)."""
    q: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line)
    threading.Thread(target=read, daemon=True).start()
    return q


def _collect(q: queue.Queue[str], done: Callable[[list[dict[str, Any]]], bool], timeout_s: float) -> list[dict[str, Any]]:
    """Flows from the queue until ``done(flows)`` (then what else comes within a second: curl may try
    IPv6 and IPv4, two denials) or the time is up."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got.append(json.loads(q.get(timeout=0.1))["flow"])
        except queue.Empty:
            continue
        if done(got):
            deadline = min(deadline, time.monotonic() + 1.0)
    return got


def _both(flows: list[dict[str, Any]]) -> bool:
    return any(f["Type"] == "L3_L4" for f in flows) and any(f["Type"] == "L7" for f in flows)


def test_hubble_observe_shows_webbs_denials_with_pods_and_drop_reasons(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    server = f"127.0.0.1:{port}"
    with agent(state):
        apply(state, STARWARS / "01-app.yaml")
        apply(state, STARWARS / "policy.yaml")
        assert curl(state, "tiefighter", URL + "/v1/request-landing", "-X", "POST")[0] == 200
        with hubble_serve(state, port):
            # followed from before the denials happen: they arrive as the agent writes them
            follower = popen_hubble("observe", "--server", server, "--follow", "--verdict", "DROPPED", "-o", "json")
            try:
                time.sleep(1.0)  # its stream is open
                code, said = curl(state, "xwing", URL + "/v1/request-landing", "-X", "POST")
                assert code == 0 and "Ship landed" not in said, said  # refused at connect()
                code, said = curl(state, "tiefighter", URL + "/v1/exhaust-port", "-X", "PUT")
                assert code == 403 and "Panic" not in said, said
                followed = _collect(_lines(follower), _both, 20)
            finally:
                follower.terminate()
                follower.wait(timeout=10)
            assert _both(followed), (followed, follower.stderr.read() if follower.stderr else "")

            # the same, asked for afterwards: the last drops
            r = run_hubble("observe", "--server", server, "--verdict", "DROPPED", "--last", str(len(followed)), "-o", "json")
            assert r.returncode == 0, r.stderr
            last = [json.loads(line)["flow"] for line in r.stdout.splitlines()]
            assert sorted(f["uuid"] for f in last) == sorted(f["uuid"] for f in followed)
            l4 = next(f for f in last if f["Type"] == "L3_L4")
            l7 = next(f for f in last if f["Type"] == "L7")
            assert l4["verdict"] == "DROPPED" and l4["drop_reason_desc"] == "POLICY_DENIED"
            assert (l4["source"]["namespace"], l4["source"]["pod_name"]) == ("default", "xwing")
            assert l4["destination_service"] == {"namespace": "default", "name": "deathstar"}
            assert l4["l4"]["TCP"]["destination_port"] == 80
            assert {"name": "rule1", "namespace": "default", "kind": "MeshPolicy"}.items() <= l4["ingress_denied_by"][0].items()
            assert "no ingress rule allows default/xwing" in l4["Summary"]
            assert l4["node_name"] == "node1"
            assert l7["verdict"] == "DROPPED" and l7["drop_reason_desc"] == "POLICY_DENIED"
            assert l7["source"]["pod_name"] == "tiefighter"
            assert (l7["l7"]["http"]["method"], l7["l7"]["http"]["url"], l7["l7"]["http"]["code"]) == ("PUT", "/v1/exhaust-port", 403)
            assert "l7-policy-denied" in l7["Summary"]

            # the CLI's own lines (compact): pods, Hubble's drop reason, Webb's why
            compact = run_hubble("observe", "--server", server, "--verdict", "DROPPED", "--from-pod", "default/xwing")
            assert compact.returncode == 0, compact.stderr
            line = compact.stdout.strip().splitlines()[-1]
            assert "default/xwing" in line and "default/deathstar" in line and "Policy denied DROPPED" in line, line
            assert "MeshPolicy default/rule1" in line, line
            l7only = run_hubble("observe", "--server", server, "--http-status", "403", "--http-method", "PUT", "-o", "json")
            assert [json.loads(x)["flow"]["l7"]["http"]["url"] for x in l7only.stdout.splitlines()] == ["/v1/exhaust-port"]
            allowed = run_hubble("observe", "--server", server, "--verdict", "FORWARDED", "--protocol", "http", "-o", "json")
            assert any(json.loads(x)["flow"]["l7"]["http"]["code"] == 200 for x in allowed.stdout.splitlines()), allowed.stdout

            status = run_hubble("status", "--server", server)
            assert status.returncode == 0 and f"Healthcheck (via {server}): Ok" in status.stdout, status.stdout + status.stderr
            assert "Current/Max Flows:" in status.stdout and "/4,095" in status.stdout, status.stdout
            nodes = run_hubble("list", "nodes", "--server", server)
            assert nodes.returncode == 0 and "node1" in nodes.stdout and "Connected" in nodes.stdout, nodes.stdout
    assert leftovers("webb-node1-") == []
