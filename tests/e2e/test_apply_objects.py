"""`webb apply` / `webb delete` keyed on objects, against a running agent: a state dir left by the
previous `webb` (manifests stored by file name) is migrated without the agent losing an object,
the two examples' ``01-app.yaml`` run side by side, deleting one removes only its objects, a dry
run changes nothing the agent sees, and `webb get` shows what the agent runs.

The agent is started without --lifetime (it runs until stopped) under `timeout`, so it ends in
bounded time even if this test dies; it is stopped by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mesh.cli.demo import request
from mesh.runtime.local import NodeConfig
from tests.conftest import ROOT, leftovers
from tests.e2e.l7_support import curl, eventually, status

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]
STARWARS, L7 = ROOT / "examples/starwars/01-app.yaml", ROOT / "examples/l7/01-app.yaml"
L7_PODS = {"default/web-v1", "default/web-v2", "default/client"}
STARWARS_PODS = {"default/deathstar-1", "default/deathstar-2", "default/tiefighter", "default/xwing"}


def _webb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=90, env={"COLUMNS": "250", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def _old_layout(manifests: Path) -> None:
    """What the previous `webb apply -f examples/starwars/01-app.yaml` left: the file under its own
    name, Pod paths made absolute."""
    manifests.mkdir(parents=True)
    docs = list(yaml.safe_load_all(STARWARS.read_text()))
    for d in docs:
        if d["kind"] == "Pod":
            c = d["spec"]["containers"][0]
            c["command"] = [str(STARWARS.parent / a[2:]) if a.startswith("./") else a for a in c["command"]]
    (manifests / "01-app.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))


def _landing(node: NodeConfig) -> str:
    return request(node, "tiefighter", "POST", "/v1/request-landing").body.strip()


def test_object_keyed_manifests_with_a_running_agent(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _old_layout(state / "manifests")
    node = NodeConfig(state_dir=state)
    proc = subprocess.Popen(["timeout", "300", sys.executable, "-m", "mesh.cli", "agent", "--state-dir", str(state)],
                            cwd=ROOT, stdout=open(tmp_path / "agent.log", "ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (status(state).get("running") and STARWARS_PODS <= set(status(state).get("pods") or {})):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "agent.log").read_text()[-3000:]
            time.sleep(0.1)
        assert eventually(lambda: _landing(node), lambda b: b == "Ship landed") == "Ship landed"
        ips = {k: p["ip"] for k, p in status(state)["pods"].items()}

        # the second 01-app.yaml: the old layout is migrated, the Death Star stays
        r = _webb("apply", "-f", str(L7), "--state-dir", str(state))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "migrated 5 object(s) of 1 file(s) stored by file name (01-app.yaml)" in " ".join(r.stderr.split())
        assert "node node1 applied manifests" in r.stderr
        assert sorted((state / "manifests").glob("*.yaml"))[0].name == "Pod_default_client.yaml"
        st = eventually(lambda: status(state), lambda s: L7_PODS | STARWARS_PODS <= set(s["pods"]))
        assert L7_PODS | STARWARS_PODS <= set(st["pods"]), st["pods"]
        assert {k: st["pods"][k]["ip"] for k in ips} == ips  # the starwars pods were not restarted elsewhere
        assert _landing(node) == "Ship landed"
        code, body = eventually(lambda: curl(state, "client", "http://web-v2.default.svc.cluster.local/"),
                                lambda c: c[0] == 200)
        assert code == 200 and body.startswith("web-v2"), body

        # webb get shows what the agent runs
        r = _webb("get", "pods", "--state-dir", str(state))
        assert r.returncode == 0, r.stderr
        rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[1:]}
        assert rows["deathstar-1"] == ["deathstar-1", "Running", ips["default/deathstar-1"], "node1"]
        assert rows["web-v2"][1] == "Running" and rows["web-v2"][2] == st["pods"]["default/web-v2"]["ip"]
        r = _webb("get", "services", "--state-dir", str(state))
        svc = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[1:]}
        assert svc["deathstar"][3:] == ["2", "Applied"], r.stdout  # two backends, as the agent reports

        # a dry run changes nothing the agent sees
        version = status(state)["applied"]["source_version"]
        r = _webb("delete", "--dry-run", "-f", str(STARWARS), "--state-dir", str(state))
        assert r.returncode == 0 and r.stdout.count("deleted (dry run)") == 5, r.stdout + r.stderr
        time.sleep(1)
        assert status(state)["applied"]["source_version"] == version

        # deleting the l7 file removes its objects only
        r = _webb("delete", "-f", str(L7), "--state-dir", str(state))
        assert r.returncode == 0, r.stdout + r.stderr
        st = eventually(lambda: status(state), lambda s: not (L7_PODS & set(s["pods"])))
        assert set(st["pods"]) == STARWARS_PODS, st["pods"]
        assert _landing(node) == "Ship landed"
        assert proc.poll() is None  # no --lifetime: still running
    finally:
        proc.send_signal(signal.SIGTERM)  # timeout passes it on to the agent
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            if pid := status(state).get("pid"):
                os.kill(pid, signal.SIGKILL)  # the agent itself: `timeout` then ends
            proc.wait(timeout=10)
    assert status(state)["running"] is False
    assert leftovers("webb-node1-") == []
