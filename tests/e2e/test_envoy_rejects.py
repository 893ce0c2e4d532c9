"""A config the parser accepts but Envoy refuses (a valid RE2 regex above Envoy's program size limit,
a runtime setting of Envoy's: re2.max_program_size.error_level, 100 by default):
`webb apply` and `webb status` show Envoy's own message, the last good config keeps serving
(Envoy and the datapath), and a fixed policy applies again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.cli.demo import request
from mesh.runtime.local import NodeConfig
from tests.conftest import ROOT, leftovers
from tests.e2e.test_agent_restart import landing, start_agent

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]
POLICY = (ROOT / "examples/starwars/policy.yaml").read_text()
BIG_REGEX = "/v1/(a{1,60})"  # RE2 program size 129


def _webb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=90)


def _exhaust(node: NodeConfig) -> str:
    return request(node, "tiefighter", "PUT", "/v1/exhaust-port").body.strip()


def test_envoy_rejection_is_shown_and_last_good_config_serves(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    node = NodeConfig(state_dir=state)
    agent = start_agent(state)
    try:
        assert _webb("apply", "-f", str(ROOT / "examples/starwars/01-app.yaml"), "--state-dir", str(state)).returncode == 0
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        r = _webb("apply", "-f", str(policy), "--state-dir", str(state))
        assert r.returncode == 0 and "rejected" not in r.stderr, r.stderr
        deadline = time.monotonic() + 20
        while _exhaust(node) != "Access denied":
            assert time.monotonic() < deadline
            time.sleep(0.2)

        policy.write_text(POLICY.replace('path: "/v1/request-landing"', f'path: "{BIG_REGEX}"'))
        r = _webb("apply", "-f", str(policy), "--state-dir", str(state))
        assert "Envoy rejected Listener" in r.stderr and "program size" in r.stderr, r.stderr
        status = _webb("status", "--state-dir", str(state)).stdout
        assert "Envoy rejected Listener" in status and "kept on the last accepted plan" in status, status
        assert landing(node) == "Ship landed"  # the last good listener and datapath still serve
        assert _exhaust(node) == "Access denied"

        policy.write_text(POLICY)
        r = _webb("apply", "-f", str(policy), "--state-dir", str(state))
        assert r.returncode == 0 and "rejected" not in r.stderr, r.stderr
        assert "rejected" not in _webb("status", "--state-dir", str(state)).stdout
        assert landing(node) == "Ship landed" and _exhaust(node) == "Access denied"
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    assert leftovers("webb-node1-") == []


def test_envoy_silence_is_retried_not_forgotten(tmp_path: Path) -> None:
    """An Envoy that neither ACKs nor NACKs (stopped with SIGSTOP): the agent reports it, keeps the
    last plan, and syncs again with backoff, so the config lands once Envoy answers."""
    import json
    import os

    state = tmp_path / "state"
    state.mkdir()
    node = NodeConfig(state_dir=state)
    agent = start_agent(state)
    envoy_pid = 0
    try:
        assert _webb("apply", "-f", str(ROOT / "examples/starwars/01-app.yaml"), "--state-dir", str(state)).returncode == 0
        envoy_pid = json.loads((state / "status.json").read_text())["envoy_pid"]
        os.kill(envoy_pid, signal.SIGSTOP)
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        assert _webb("apply", "-f", str(policy), "--state-dir", str(state), "--wait", "0").returncode == 0
        deadline = time.monotonic() + 30
        while not any("did not ACK it within" in e and "retrying in" in e
                      for e in json.loads((state / "status.json").read_text())["errors"]):
            assert time.monotonic() < deadline, (state / "status.json").read_text()
            time.sleep(0.2)
        os.kill(envoy_pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while _exhaust(node) != "Access denied":  # the L7 policy landed without any new change
            assert time.monotonic() < deadline, (state / "status.json").read_text()
            time.sleep(0.3)
        assert json.loads((state / "status.json").read_text())["errors"] == []
    finally:
        if envoy_pid:
            os.kill(envoy_pid, signal.SIGCONT)
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    assert leftovers("webb-node1-") == []
