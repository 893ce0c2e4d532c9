"""A config the parser accepts but Envoy refuses (a valid RE2 regex above Envoy's program size limit,
a runtime setting of Envoy's: re2.max_program_size.error_level, 100 by default) quarantines the
object, not the node: `webb apply` fails naming it with Envoy's message, its previous version stays
in force, other objects keep converging, and a fixed version applies again.
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
ALLIANCE = """apiVersion: webb.io/v1alpha1
kind: MeshPolicy
metadata: {name: alliance-l4, namespace: default}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: alliance}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


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
        said = " ".join(r.stderr.split())
        assert r.returncode == 1, said
        assert "MeshPolicy default/rule1: Envoy rejected it" in said and "program size" in said and "quarantined" in said, said
        status = " ".join(_webb("status", "--state-dir", str(state)).stdout.split())
        assert "MeshPolicy default/rule1: Envoy rejected it" in status and "previous version stays in force" in status, status
        assert landing(node) == "Ship landed"  # the previous rule1 still serves
        assert _exhaust(node) == "Access denied"

        # the node is not frozen: another policy (it changes Envoy's listener too) applies beside the quarantined one
        other = tmp_path / "alliance.yaml"
        other.write_text(ALLIANCE)
        r = _webb("apply", "-f", str(other), "--state-dir", str(state))
        assert r.returncode == 0 and "warning" in r.stderr and "rule1" in r.stderr, r.stderr
        assert request(node, "xwing", "POST", "/v1/request-landing").body.strip() == "Ship landed"
        assert _exhaust(node) == "Access denied"  # rule1's previous version, still in force
        assert _webb("delete", "-f", str(other), "--state-dir", str(state)).returncode == 0

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
