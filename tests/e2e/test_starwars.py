"""The Star Wars example end to end: agent, pods, BPF, Envoy, and `webb observe`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.cli.demo import run_starwars
from mesh.runtime.cgroups import node_cgroup
from tests.conftest import ROOT, leftovers

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]


def _webb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("sockmap", [False, True], ids=["plain", "sockmap"])
def test_starwars_outcomes_with_and_without_policy(tmp_path: Path, sockmap: bool) -> None:
    state = tmp_path / "state"
    # run_starwars checks all six outcomes (three without the policy, three with it)
    assert run_starwars(ROOT / "examples/starwars", state, agent_args=("--sockmap",) if sockmap else ()) == 0
    if sockmap:  # it ran accelerated (status now says off: the agent has stopped)
        assert "sockmap acceleration: self-test passed" in (state / "agent.log").read_text()
        assert json.loads((state / "status.json").read_text())["sockmap"]["enabled"] is False

    # everything it made is gone: pods' netns, bridge, cgroups, Envoy
    assert leftovers("webb-node1-") == []
    assert subprocess.run(["ip", "link", "show", "webb0"], capture_output=True).returncode != 0
    assert not node_cgroup("node1").exists()
    status = json.loads((state / "status.json").read_text())
    assert status["running"] is False
    assert status["envoy"]["Listener"]["acked"], status

    # webb observe names the drop and the 403 and the policy behind each
    r = _webb("observe", "--state-dir", str(state), "--verdict", "denied", "-o", "json")
    assert r.returncode == 0, r.stderr
    flows = [json.loads(line) for line in r.stdout.splitlines()]
    l4 = [f for f in flows if f["layer"] == "L4"]
    l7 = [f for f in flows if f["layer"] == "L7"]
    assert l4 and l4[-1]["src"] == "default/xwing" and l4[-1]["reason"] == "policy-denied"
    assert l4[-1]["policy"] == "default/rule1"
    assert l7 and l7[-1]["src"] == "default/tiefighter" and l7[-1]["status"] == 403
    assert (l7[-1]["method"], l7[-1]["path"]) == ("PUT", "/v1/exhaust-port")
    assert "default/rule1" in l7[-1]["policy"]
    table = _webb("observe", "--state-dir", str(state), "--pod", "xwing", "--verdict", "denied").stdout
    assert "DENIED policy-denied" in table and "MeshPolicy default/rule1" in table


def test_apply_rejects_malformed_policy_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "examples/starwars/policy.yaml").read_text().replace('port: "80"', 'port: "eighty"'))
    r = _webb("apply", "-f", str(bad), "--state-dir", str(tmp_path / "state"), "--wait", "0")
    assert r.returncode == 1
    assert "spec.ingress[0].toPorts[0].ports[0].port" in r.stderr and "1-65535" in r.stderr
    assert not (tmp_path / "state" / "manifests" / "bad.yaml").exists()
