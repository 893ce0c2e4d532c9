"""The node's teardown, on a second node of its own (webb-kn2: webbkn1, 10.121.0.0/24, 10.122.1.0/24,
/webbkube2): nothing of it stays on the host, whether the manual session's ``down`` stops it or the
process holding it dies by SIGKILL (then its guard undoes it from the record)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import cleanup
from tests.cluster.cleanup import Record
from tests.cluster.node import REPO, NodeConfig

pytestmark = [pytest.mark.kube, pytest.mark.root]

CFG = NodeConfig.numbered(2)
UP_S = 300.0
GUARD_S = 90.0


def node_cli(*args: str, timeout_s: float = UP_S + 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.cluster.node", *args, "--node", "2"], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)


def record() -> Record | None:
    return Record.load(CFG.run_dir / cleanup.RECORD_NAME)


def busybox_pod(rec: Record) -> None:
    """A pod, so that containerd shims, container processes, netns and rootfs mounts exist."""
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bb", "namespace": "default"},
                "spec": {"terminationGracePeriodSeconds": 1, "containers": [
                    {"name": "bb", "image": "webb.local/busybox:1", "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]}}
    kubectl = [rec.kubectl, "--kubeconfig", rec.kubeconfig]
    subprocess.run([*kubectl, "apply", "-f", "-"], input=json.dumps(manifest), check=True, capture_output=True, text=True, timeout=60)
    subprocess.run([*kubectl, "wait", "--for=condition=Ready", "pod/bb", "--timeout=120s"], check=True, capture_output=True,
                   timeout=130)
    assert cleanup.shim_pids(rec.containerd_socket)
    assert cleanup.cgroup_procs(rec.cgroup_root)
    assert cleanup.mounts_under(rec.run_dir, rec.state_dir)


def sysctls() -> dict[str, str]:
    return {s: cleanup.read_sysctl(s) for s in cleanup.SYSCTLS}


def test_up_then_down_leaves_nothing() -> None:
    before = sysctls()
    try:
        up = node_cli("up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "Ready in" in up.stdout
        rec = record()
        assert rec is not None and rec.ready
        busybox_pod(rec)
        down = node_cli("down", timeout_s=360)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "nothing left" in down.stdout
        assert cleanup.leftovers(rec) == []
    finally:
        if record() is not None:
            node_cli("down", timeout_s=360)
    assert sysctls() == before
    assert not CFG.run_dir.exists() and not CFG.state_dir.exists()
    assert not cleanup.link_exists(CFG.bridge)


def test_sigkill_of_the_owner_leaves_nothing(tmp_path: Path) -> None:
    """The process holding the node is killed outright: every daemon gets SIGTERM (parent death), and the
    guard stops what outlives them (shims, containers), unmounts, and removes the rest."""
    before = sysctls()
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        serve = subprocess.Popen([sys.executable, "-m", "tests.cluster.node", "serve", "--node", "2"], cwd=REPO, stdout=f,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    rec = None
    try:
        deadline = time.monotonic() + UP_S
        while "serve: up" not in log.read_text(errors="replace"):
            assert serve.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, f"webb-kn2 not up after {UP_S:.0f} s"
            time.sleep(0.2)
        rec = record()
        assert rec is not None
        busybox_pod(rec)
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait(10)
        t0 = time.monotonic()
        while record() is not None or cleanup.leftovers(rec):
            assert time.monotonic() - t0 < GUARD_S, f"left after {GUARD_S:.0f} s: {cleanup.leftovers(rec)}"
            time.sleep(0.2)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)
        if (left := record()) is not None:  # the guard did not finish: do it here, so the machine is clean anyway
            cleanup.cleanup(left)
    assert cleanup.leftovers(rec) == []
    assert sysctls() == before
    assert not CFG.run_dir.exists() and not CFG.state_dir.exists()
