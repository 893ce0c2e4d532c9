"""`webb wire up|down`: the node namespaces and the wire, and the agent command of each node."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, leftovers

pytestmark = [pytest.mark.root]
NODES = "wc1=10.244.241.0/24,wc2=10.244.242.0/24"


def _webb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", "wire", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"COLUMNS": "400", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def test_wire_up_prints_agent_commands_and_down_removes_it() -> None:
    try:
        r = _webb("up", "--nodes", NODES, "--prefix", "wc")
        assert r.returncode == 0, r.stderr
        assert sorted(leftovers("webb-node-wc")) == ["webb-node-wc1", "webb-node-wc2"]
        assert leftovers("webb-wire-wc") == ["webb-wire-wc"]
        assert "--node wc2 --node-netns webb-node-wc2 --pod-cidr 10.244.242.0/24" in r.stdout, r.stdout
        assert "--wire-ip 10.250.0.2" in r.stdout and "--ca-dir" in r.stdout
    finally:
        r = _webb("down", "--nodes", NODES, "--prefix", "wc")
    assert r.returncode == 0, r.stderr
    assert leftovers("webb-node-wc") == [] and leftovers("webb-wire-wc") == []


def test_bad_node_list_names_the_option() -> None:
    r = _webb("up", "--nodes", "wc1")
    assert r.returncode != 0 and "--nodes" in r.stderr and "name=podCIDR" in r.stderr, r.stderr
