"""Gateway API end to end (embedded): the node Envoy serves a Gateway of class webb on a free
port of 127.0.0.1, routes by hostname and path to pods, applies a header filter, answers 404
for a host no route has; the status of every object says what is served."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.l7_support import EXAMPLE, agent, apply, eventually, free_port, status

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]
GATEWAY = EXAMPLE.parent / "gateway/gateway.yaml"


def _curl(host: str, port: int, path: str, *opts: str) -> tuple[int, str]:
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "--resolve", f"{host}:{port}:127.0.0.1", "-w", "\n%{http_code}",
                        *opts, f"http://{host}:{port}{path}"], capture_output=True, text=True, timeout=20)
    body, _, code = r.stdout.rpartition("\n")
    return (int(code) if r.returncode == 0 and code.isdigit() else 0), body + r.stderr


def test_gateway_routes_by_host_and_path(tmp_path: Path) -> None:
    state, port = tmp_path / "state", free_port()
    docs = list(yaml.safe_load_all(GATEWAY.read_text()))
    docs[1]["spec"]["listeners"][0]["port"] = port
    gw = tmp_path / "gateway.yaml"
    gw.write_text(yaml.safe_dump_all(docs))
    with agent(state):
        apply(state, EXAMPLE / "01-app.yaml")
        apply(state, gw)
        code, body = eventually(lambda: _curl("shop.example.test", port, "/"), lambda r: r[0] == 200)
        assert code == 200 and body.split()[0] == "web-v1", (code, body, status(state)["errors"], status(state).get("gateway_status"))
        assert _curl("shop.example.test", port, "/v2/items")[1].split()[0] == "web-v2"
        assert _curl("shop.example.test", port, "/v2x")[1].split()[0] == "web-v1"  # PathPrefix: whole elements
        assert _curl("other.example.test", port, "/")[0] == 404  # the listener takes it; no route has the host
        assert _curl("shop.other.test", port, "/")[0] == 404
        st = status(state)
        gws = {k: json.loads(v) for k, v in st["gateway_status"].items()}
        programmed = [c for c in gws["Gateway default/shop"]["conditions"] if c["type"] == "Programmed"]
        assert programmed[0]["status"] == "True", gws
        assert gws["Gateway default/shop"]["listeners"][0]["attachedRoutes"] == 1
