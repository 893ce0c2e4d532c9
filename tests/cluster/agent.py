"""``webb agent --kube`` on the test node as a host process (host network, as the DaemonSet runs
it): started after the CRDs and ``webb-system`` exist, stopped by SIGTERM (a clean stop unpins)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mesh.status import AgentStatus
from tests.cluster.node import KubeNode

ROOT = Path(__file__).resolve().parents[2]


def prepare(node: KubeNode) -> None:
    """What an installer makes before the agents: Webb's CRDs and its namespace (node reports go there)."""
    node.kubectl("apply", "-f", str(ROOT / "crds"))
    if node.kubectl("get", "namespace", "webb-system", check=False).returncode != 0:
        node.kubectl("create", "namespace", "webb-system")


@contextmanager
def host_agent(node: KubeNode, state: Path, lifetime_s: float = 900.0, start_timeout_s: float = 60.0,
               extra: tuple[str, ...] = (), envoy_admin_port: int = 0) -> Iterator[subprocess.Popen[bytes]]:
    """The agent, running and with a first plan applied; its log is ``state/agent.log``. On exit it
    is stopped (SIGTERM, then SIGKILL after 30 s) and must have exited 0 and left no pins."""
    prepare(node)
    with open(state / "agent.log", "ab") as log:
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "SIGTERM", "--", sys.executable, "-m", "mesh.cli", "agent", "--kube", str(node.kubeconfig),
             "--node", node.name, "--kubelet-cgroup-root", str(node.cgroup_root), "--service-cidr", node.service_cidr,
             "--state-dir", str(state), "--envoy-admin-port", str(envoy_admin_port), "--lifetime", str(lifetime_s), *extra],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout_s
        while (st := AgentStatus.read(state)) is None or not (st.running and st.applied.plan_version):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not apply a first plan in {start_timeout_s:.0f} s: "
                                   f"{(state / 'agent.log').read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, (state / "agent.log").read_text()[-3000:]
    assert not Path(f"/sys/fs/bpf/webb/{node.name}").exists(), "pins left behind"
