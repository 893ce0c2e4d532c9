"""gRPC through the node Envoy: h2c from a real grpcio client in a pod, HTTP/2 upstream,
and a MeshPolicy allowing one method: OK for it, PERMISSION_DENIED (with the policy in
`webb observe`) for the other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.l7_support import EXAMPLE, agent, apply, eventually, flows, in_pod, status

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]
TARGET = "greeter.default.svc.cluster.local:50051"


def _call(state: Path, method: str) -> str:
    r = in_pod(state, "grpc-client", [sys.executable, str(EXAMPLE / "grpc_client.py"), TARGET, method])
    return r.stdout.strip() or r.stderr.strip()[-300:]


def test_grpc_method_policy(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent(state):
        apply(state, EXAMPLE / "grpc.yaml")
        assert eventually(lambda: _call(state, "Denied"), lambda out: out.startswith("OK")).startswith("OK Denied")
        apply(state, EXAMPLE / "grpc-policy.yaml")
        (svc,) = [s for s in status(state)["services"] if s["port"] == 50051 and ":" not in s["vip"]]
        assert svc["proxy_port"], svc  # the HTTP rule made it an L7 port
        assert _call(state, "Allowed") == "OK Allowed from greeter: hello"
        assert _call(state, "Denied").startswith("PERMISSION_DENIED")
        denied = eventually(lambda: [f for f in flows(state) if f.get("verdict") == "denied"], bool, 5)
        assert denied, flows(state)[-5:]
        f = denied[-1]
        assert (f["layer"], f["src"], f["path"]) == ("L7", "default/grpc-client", "/demo.Greeter/Denied")
        assert f["grpc_status"] == 7  # PERMISSION_DENIED: Envoy's gRPC form of the RBAC 403 (HTTP status 200)
        assert f["policy"] == "default/greeter-allowed-only#ingress[0]" and f["reason"] == "l7-policy-denied"
        assert "POST /demo\\.Greeter/Allowed" in f["why"]
        assert f["protocol"] == "HTTP/2"
        r = subprocess.run([sys.executable, "-m", "mesh.cli", "observe", "--state-dir", str(state), "--verdict", "denied"],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert "greeter-allowed-only" in r.stdout and "/demo.Greeter/Denied" in r.stdout, r.stdout
