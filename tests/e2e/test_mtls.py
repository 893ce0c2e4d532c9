"""mTLS between two nodes on one machine (MeshTLS): a workload request crosses the wire
inside the tunnel (no plaintext on the wire, the client pod's SPIFFE identity presented and
checked), STRICT refuses plaintext from outside the mesh, PERMISSIVE takes both, and
switching PERMISSIVE -> STRICT cuts no established connection.

On this host the tunnel's records are user-space TLS (no kTLS in the kernel) and status says
so; the kTLS records themselves are tested in the 6.1 guest (tests/datapath/test_tunnel.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.runtime.cluster import Wire
from mesh.runtime.local import call_in_netns as in_ns
from tests.capture import Capture
from tests.conftest import SLOW
from tests.e2e.test_multinode import CLUSTER_CIDR, NODES, MultiNode, _curl, _vip
from tunnel.ktls import kernel_has_ktls

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]
MARKER = f"webb-mtls-{uuid.uuid4().hex}"

APP = """\
apiVersion: v1
kind: Namespace
metadata: {{name: empire}}
---
apiVersion: v1
kind: Service
metadata: {{name: deathstar, namespace: empire}}
spec:
  selector: {{app: deathstar}}
  ports: [{{port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: deathstar, namespace: empire, labels: {{app: deathstar}}}}
spec:
  nodeName: mn2
  serviceAccountName: deathstar
  containers:
  - name: web
    image: python:3.11-slim
    command: [python3, -m, http.server, "8080", --bind, 0.0.0.0, --directory, "{www}"]
    ports: [{{containerPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: tie, namespace: empire, labels: {{app: tie}}}}
spec:
  nodeName: mn1
  serviceAccountName: tie
  containers: [{{name: c, image: busybox, command: [sleep, "300"]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: xwing, namespace: default, labels: {{app: xwing}}}}
spec:
  nodeName: mn1
  containers: [{{name: c, image: busybox, command: [sleep, "300"]}}]
---
apiVersion: webb.io/v1alpha1
kind: MeshPolicy
metadata: {{name: deathstar, namespace: empire}}
spec:
  endpointSelector: {{matchLabels: {{app: deathstar}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: tie}}}}]
    toPorts: [{{ports: [{{port: "8080", protocol: TCP}}]}}]
"""
MESHTLS = """\
apiVersion: webb.io/v1alpha1
kind: MeshTLS
metadata: {{name: default, namespace: empire}}
spec: {{mode: {mode}}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNode]:
    mn = MultiNode(Wire(NODES, prefix="mn", cluster_cidr=CLUSTER_CIDR), tmp_path_factory.mktemp("mtls"))
    mn.manifests.mkdir()
    try:
        mn.wire.setup()
        for n in mn.wire:
            mn.start(n)
        mn.wait_running(60 * SLOW)
        www = mn.root / "www"
        www.mkdir()
        (www / "index.html").write_text(MARKER + "\n")
        mn.put("app.yaml", APP.format(www=www))
        mn.wait_applied(mn.put("meshtls.yaml", MESHTLS.format(mode="STRICT")), timeout_s=30 * SLOW)
        yield mn
    finally:
        errors = mn.cleanup()
        assert not errors, errors


def _set_mode(cluster: MultiNode, mode: str) -> None:
    cluster.wait_applied(cluster.put("meshtls.yaml", MESHTLS.format(mode=mode)), timeout_s=30 * SLOW)
    for node in ("mn1", "mn2"):
        deadline = time.monotonic() + 20 * SLOW
        while cluster.status(node).get("mtls", {}).get("namespaces", {}).get("empire") != mode:
            assert time.monotonic() < deadline, cluster.status(node).get("mtls")
            time.sleep(0.05)


def _flows(cluster: MultiNode, node: str) -> list[dict[str, Any]]:
    p = cluster.state(node) / "flows.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _wait_flow(cluster: MultiNode, node: str, pred: Any, timeout_s: float = 10 * SLOW) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [f for f in _flows(cluster, node) if pred(f)]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, _flows(cluster, node)[-10:]
        time.sleep(0.1)


def _curl_retry(cluster: MultiNode, pod: str, url: str, want: int = 200, tries: int = 40) -> tuple[int, str, str]:
    for _ in range(tries):  # the server pod may still be starting
        code, body, err = _curl(cluster, "mn1", pod, url)
        if code == want:
            break
        time.sleep(0.3)
    return code, body, err


def _from_node(cluster: MultiNode, node: str, ip: str, timeout: float) -> socket.socket:
    """A TCP connection from the node's own netns (not a pod: outside the mesh)."""
    return in_ns(cluster.wire.node(node).netns, lambda: socket.create_connection((ip, 8080), timeout=timeout))


def test_request_crosses_the_wire_encrypted_with_the_client_identity(cluster: MultiNode) -> None:
    _set_mode(cluster, "STRICT")
    vip = _vip(cluster, "mn1", "empire/tie", "deathstar.empire.svc.cluster.local")
    wire = cluster.wire.node("mn2")
    # the server pod may still be starting: wait until a request gets through (on the emulated 6.1 guest
    # this took longer than the capture's 60 s, which then saw nothing), then capture one request
    code, body, err = _curl_retry(cluster, "empire/tie", f"http://{vip}/")
    assert (code, body.strip()) == (200, MARKER), (code, body, err, cluster.log("mn1"), cluster.status("mn1"))
    with Capture(cluster.wire.netns, wire.wire_if, timeout_s=120 * SLOW) as cap:
        code, body, err = _curl(cluster, "mn1", "empire/tie", f"http://{vip}/")
        time.sleep(0.2)
    assert (code, body.strip()) == (200, MARKER), (code, body, err, cluster.log("mn1"), cluster.status("mn1"))
    frames = b"".join(cap.frames)
    assert len(cap.frames) > 5, "the capture saw nothing: not on the wire?"
    assert MARKER.encode() not in frames and b"GET / HTTP" not in frames, "plaintext on the wire"
    assert b"\x17\x03\x03" in frames  # TLS records
    records = "ktls" if kernel_has_ktls() else "userspace"
    out = _wait_flow(cluster, "mn1", lambda f: f.get("reason") == "mtls-tunnel" and f.get("src") == "empire/tie")
    assert out["tls"] == records and out["peer"] == "spiffe://cluster.local/ns/empire/sa/deathstar", out
    assert out["dst_pod"] == "empire/deathstar" and out["verdict"] == "forwarded"
    inbound = _wait_flow(cluster, "mn2", lambda f: f.get("reason") == "mtls-accepted")
    assert inbound["peer"] == "spiffe://cluster.local/ns/empire/sa/tie" and inbound["src"] == "empire/tie", inbound
    st = cluster.status("mn1")["mtls"]
    assert st["records"] == records and ("no kTLS" in st["why"]) == (records == "userspace"), st
    text = subprocess.run([sys.executable, "-m", "mesh.cli", "status", "--state-dir", str(cluster.state("mn1"))],
                          capture_output=True, text=True, timeout=30 * SLOW, env={**os.environ, "COLUMNS": "300"}).stdout
    assert ("records in the kernel (kTLS)" if records == "ktls" else "records in user space") in text, text
    assert "empire=STRICT" in text, text
    ids = {i["spiffe_id"] for i in cluster.status("mn2")["mtls"]["identities"]}
    assert "spiffe://cluster.local/ns/empire/sa/deathstar" in ids


def test_policy_still_denies_with_a_reason(cluster: MultiNode) -> None:
    _set_mode(cluster, "STRICT")
    vip = _vip(cluster, "mn1", "default/xwing", "deathstar.empire.svc.cluster.local")
    code, _, err = _curl(cluster, "mn1", "default/xwing", f"http://{vip}/")
    assert code == 0, err  # refused at connect() on mn1, before any packet
    denied = _wait_flow(cluster, "mn1", lambda f: f.get("verdict") == "denied" and f.get("src") == "default/xwing")
    assert "MeshPolicy empire/deathstar" in denied.get("why", ""), denied


def test_strict_refuses_plaintext_from_outside_permissive_takes_it(cluster: MultiNode) -> None:
    server_ip = cluster.status("mn2")["pods"]["empire/deathstar"]["ip"]
    _set_mode(cluster, "PERMISSIVE")
    with _from_node(cluster, "mn1", server_ip, 5 * SLOW) as s:  # plaintext across the wire: accepted
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert MARKER.encode() in s.recv(4096) + s.recv(4096)
    _set_mode(cluster, "STRICT")
    with pytest.raises(TimeoutError):  # the SYN is dropped in mn2's kernel
        _from_node(cluster, "mn1", server_ip, 2)
    reasons = cluster.status("mn2").get("reason_counts", {})
    assert reasons.get("mtls-strict", 0) >= 1, reasons
    drop = _wait_flow(cluster, "mn2", lambda f: f.get("reason") == "mtls-strict")
    assert drop["verdict"] == "dropped" and drop["dst_pod"] == "empire/deathstar", drop
    assert "MeshTLS STRICT" in drop["why"] and "outside the mesh" in drop["why"], drop
    # ...while the tunnel still gets through
    vip = _vip(cluster, "mn1", "empire/tie", "deathstar.empire.svc.cluster.local")
    assert _curl_retry(cluster, "empire/tie", f"http://{vip}/")[0] == 200


def test_permissive_to_strict_keeps_established_connections(cluster: MultiNode) -> None:
    server_ip = cluster.status("mn2")["pods"]["empire/deathstar"]["ip"]
    _set_mode(cluster, "PERMISSIVE")
    s = _from_node(cluster, "mn1", server_ip, 10 * SLOW)
    try:
        s.sendall(b"GET / HTTP/1.0\r\n")  # half a request: the connection stays open
        _set_mode(cluster, "STRICT")
        time.sleep(0.5)
        s.sendall(b"\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        assert MARKER.encode() in answer, answer[:200]
    finally:
        s.close()


def test_certificates_are_listed_and_keys_private(cluster: MultiNode) -> None:
    certs = cluster.state("mn2") / "certs"
    index = json.loads((certs / "identities.json").read_text())
    ds = next(i for i in index if i["spiffe_id"] == "spiffe://cluster.local/ns/empire/sa/deathstar")
    assert abs((ds["not_after"] - ds["not_before"]) - (24 * 3600 + 60)) < 5  # 24 h (+ 60 s clock skew)
    assert ds["renew_at"] < ds["not_after"]
    key = certs / "empire" / "deathstar" / "key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (Path(cluster.root) / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600


L7 = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: deathstar, namespace: empire}
spec:
  parentRefs: [{group: "", kind: Service, name: deathstar, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: deathstar, port: 80}]
    timeouts: {request: 5s}
"""


def _envoy_admin(cluster: MultiNode, node: str, path: str) -> Any:
    import urllib.request

    def get() -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:15000{path}", timeout=10 * SLOW) as r:
            return json.loads(r.read())
    return in_ns(cluster.wire.node(node).netns, get)


def test_l7_service_across_nodes_is_envoy_originated_mtls_with_sds_certificates(cluster: MultiNode) -> None:
    """An HTTPRoute with a Service parent makes deathstar:80 layer 7: mn1's Envoy reaches mn2's pod through mn2's mTLS port
    for it, presenting the node proxy certificate it got by SDS; STRICT is satisfied."""
    _set_mode(cluster, "STRICT")
    cluster.wait_applied(cluster.put("l7.yaml", L7), timeout_s=30 * SLOW)
    try:
        wire = cluster.wire.node("mn2")
        deadline = time.monotonic() + 20 * SLOW
        while not cluster.status("mn2").get("mtls", {}).get("envoy_mtls_ports"):
            assert time.monotonic() < deadline, cluster.status("mn2").get("mtls")
            time.sleep(0.1)
        (port,) = cluster.status("mn2")["mtls"]["envoy_mtls_ports"].values()
        vip = _vip(cluster, "mn1", "empire/tie", "deathstar.empire.svc.cluster.local")
        with Capture(cluster.wire.netns, wire.wire_if) as cap:
            code, body, err = _curl_retry(cluster, "empire/tie", f"http://{vip}/")
            time.sleep(0.2)
        assert (code, body.strip()) == (200, MARKER), (code, body, err, cluster.status("mn1")["errors"])
        frames = b"".join(cap.frames)
        assert MARKER.encode() not in frames and b"GET / HTTP" not in frames, "plaintext on the wire"
        log = cluster.state("mn1") / "envoy-access.jsonl"
        entries = [json.loads(x) for x in log.read_text().splitlines()]
        assert any(e.get("upstream") == f"{wire.wire_ip}:{port}" and e.get("status") == 200 for e in entries), entries[-3:]
        inbound = _wait_flow(cluster, "mn2", lambda f: f.get("reason") == "mtls-accepted" and f.get("src") == "node proxy")
        assert inbound["peer"] == "spiffe://cluster.local/ns/webb-system/sa/webb-node-proxy", inbound
        assert inbound["dst_pod"] == "empire/deathstar"
        # SDS: Envoy holds the node proxy certificate and the trust bundle, the key redacted
        dump = _envoy_admin(cluster, "mn1", "/config_dump?resource=dynamic_active_secrets")
        names = {c["name"] for c in dump["configs"]}
        assert {"spiffe://cluster.local/ns/webb-system/sa/webb-node-proxy", "spiffe://cluster.local"} <= names, names
        assert "PRIVATE KEY" not in json.dumps(dump)
    finally:
        cluster.wait_applied(cluster.remove("l7.yaml"), timeout_s=30 * SLOW)


BROKEN = """\
apiVersion: v1
kind: Pod
metadata: {name: deathstar-broken, namespace: empire, labels: {app: deathstar}}
spec:
  nodeName: mn2
  serviceAccountName: deathstar
  containers: [{name: c, image: busybox, command: [sleep, "300"]}]
"""


def test_a_backend_that_fails_is_skipped(cluster: MultiNode) -> None:
    """A second deathstar pod that listens on nothing: the tunnel listener tries the next backend,
    every request still succeeds, and the failure is a flow with its reason."""
    _set_mode(cluster, "STRICT")
    cluster.wait_applied(cluster.put("broken.yaml", BROKEN), timeout_s=30 * SLOW)
    try:
        vip = _vip(cluster, "mn1", "empire/tie", "deathstar.empire.svc.cluster.local")
        deadline = time.monotonic() + 20 * SLOW
        while not any(s["vip"] == vip and s["backends"] == 2 for s in cluster.status("mn1")["services"]):
            assert time.monotonic() < deadline, cluster.status("mn1")["services"]
            time.sleep(0.1)
        for _ in range(4):  # round robin: both pods are tried first at least once
            code, body, err = _curl(cluster, "mn1", "empire/tie", f"http://{vip}/")
            assert (code, body.strip()) == (200, MARKER), json.dumps(
                [code, body, err, _flows(cluster, "mn1")[-4:], _flows(cluster, "mn2")[-4:]], indent=1)
        failed = _wait_flow(cluster, "mn1", lambda f: f.get("reason") == "mtls-failed" and "connect" in f.get("why", ""))
        assert failed["verdict"] == "failed" and failed["dst_pod"] == "empire/deathstar-broken", failed
    finally:
        cluster.wait_applied(cluster.remove("broken.yaml"), timeout_s=30 * SLOW)
