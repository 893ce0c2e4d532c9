"""WebSocket upgrade through an L7 service: the `websockets` client in a pod, the echo
server in another, the node Envoy (RBAC on the upgrade request) in between."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.e2e.l7_support import EXAMPLE, agent, apply, eventually, flows, in_pod, status

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]


def test_websocket_echo_through_envoy(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent(state):
        apply(state, EXAMPLE / "websocket.yaml")
        (svc,) = [s for s in status(state)["services"] if s["port"] == 80 and ":" not in s["vip"]]
        assert svc["proxy_port"], svc  # served by Envoy: the policy has an HTTP rule

        def run() -> str:
            r = in_pod(state, "ws-client", [sys.executable, str(EXAMPLE / "ws_client.py"), "echo.default.svc.cluster.local",
                                            "one", "two", "x" * 70000])
            return r.stdout + r.stderr[-500:]

        out = eventually(run, lambda o: o.startswith("echo: one"))
        assert out.splitlines() == ["echo: one", "echo: two", "echo: " + "x" * 70000], out[:500]
        upgrades = eventually(lambda: [f for f in flows(state) if f.get("path") == "/echo"], bool, 5)
        assert upgrades[-1]["status"] == 101 and upgrades[-1]["verdict"] == "forwarded"
