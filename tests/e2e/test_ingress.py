"""Ingress (class webb) end to end: the node Envoy's ingress listeners on 127.0.0.1 (free
high ports), host/path routing to pods, HTTPS with a certificate made now and delivered by
SDS, 404 for an unknown host, a missing Secret reported while the rest keeps working."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.certs import server_cert
from tests.e2e.l7_support import EXAMPLE, agent, apply, eventually, free_port, status

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]


def _curl(url: str, host: str, port: int, *opts: str) -> tuple[int, str]:
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "--resolve", f"{host}:{port}:127.0.0.1", "-w", "\n%{http_code}",
                        *opts, url], capture_output=True, text=True, timeout=20)
    body, _, code = r.stdout.rpartition("\n")
    return (int(code) if r.returncode == 0 and code.isdigit() else 0), body + r.stderr


def _secret(path: Path, name: str, cert: bytes, key: bytes) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"tls.crt": base64.b64encode(cert).decode(), "tls.key": base64.b64encode(key).decode()}}))
    return path


def test_ingress_http_https_and_unknown_host(tmp_path: Path) -> None:
    state, http, https = tmp_path / "state", free_port(), free_port()
    ca, cert, key = server_cert(tmp_path, "shop.example.test")
    with agent(state, "--ingress-http-port", str(http), "--ingress-https-port", str(https)):
        apply(state, EXAMPLE / "01-app.yaml")
        apply(state, _secret(tmp_path / "shop-tls.yaml", "shop-tls", cert, key))
        apply(state, EXAMPLE / "ingress.yaml")
        shop = f"http://shop.example.test:{http}"
        code, body = eventually(lambda: _curl(shop + "/", "shop.example.test", http), lambda r: r[0] == 200)
        assert (code, body.split()[0]) == (200, "web-v1")
        assert _curl(shop + "/v2/items", "shop.example.test", http)[1].split()[0] == "web-v2"
        assert _curl(shop + "/v2x", "shop.example.test", http)[1].split()[0] == "web-v1"  # Prefix: whole path elements
        assert _curl(f"http://nowhere.example.test:{http}/", "nowhere.example.test", http)[0] == 404
        assert _curl(f"http://legacy.example.test:{http}/", "legacy.example.test", http)[0] == 404  # class nginx

        code, body = _curl(f"https://shop.example.test:{https}/v2/", "shop.example.test", https, "--cacert", str(ca))
        assert (code, body.split()[0]) == (200, "web-v2"), body

        # the Ingress whose Secret is missing: a warning naming it; its HTTP routes still work
        api = f"http://api.example.test:{http}/status"
        assert _curl(api, "api.example.test", http)[1].split()[0] == "web-v2"
        assert _curl(api + "/x", "api.example.test", http)[0] == 404  # Exact
        errors = "\n".join(status(state)["errors"])
        assert "Ingress default/api: spec.tls[0].secretName: Secret default/api-tls not found" in errors
        assert "Ingress default/legacy: spec.ingressClassName 'nginx' is not 'webb'; ignored" in errors
        assert _curl(f"https://api.example.test:{https}/status", "api.example.test", https, "--cacert", str(ca))[0] == 0

    key_lines = [line for line in key.decode().splitlines() if "-----" not in line]
    b64 = base64.b64encode(key).decode()
    for f in (state / "agent.log", state / "status.json", state / "flows.jsonl"):
        text = f.read_text() if f.exists() else ""
        assert b64[:40] not in text and not any(line in text for line in key_lines), f"key material in {f}"
