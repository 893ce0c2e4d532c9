"""Envoy under change and under failure: a config push drops no request in flight; a crashed
Envoy is restarted (with backoff) and gets its config back from the same xDS server."""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xds import model as xm
from xds import resources as r
from xds.cache import Snapshot

from .conftest import NODE, Plane, call, free_port

pytestmark = pytest.mark.envoy
SLOW_S = 2.0


class _Slow(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/slow":
            time.sleep(SLOW_S)
        body = b"done\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_backend() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def _svc(backend: int, listen: int, path: str) -> xm.HttpService:
    return xm.HttpService("default/web:80", "127.0.0.1", listen, (("127.0.0.1", backend),),
                         (xm.RbacPolicy("default/p#ingress[0]", None, (xm.HttpRule("GET", path),)),))


def test_config_change_does_not_drop_requests_in_flight(plane: Plane, slow_backend: int, tmp_path: Path) -> None:
    listen, log = free_port(), str(tmp_path / "access.jsonl")
    first = Snapshot.of(r.build([_svc(slow_backend, listen, "/.*")], log))
    plane.cache.set_snapshot(NODE, first)
    assert plane.cache.wait_acked(NODE, first, 10)
    results: list[tuple[int, str]] = []
    t = threading.Thread(target=lambda: results.append(call(listen, "GET", "/slow")))
    t.start()
    time.sleep(SLOW_S / 4)  # the request is now inside Envoy, waiting on the backend
    # the service's RBAC changes (its RouteConfiguration: the listener stays) and so does the cluster's endpoint set
    second = Snapshot.of(r.build([_svc(slow_backend, listen, "/(slow|fast)")], log,
                                 upstreams=[xm.Upstream("default/web:80", (("127.0.0.1", slow_backend),
                                                                          ("127.0.0.1", slow_backend)))]))
    assert second.versions[r.ROUTE] != first.versions[r.ROUTE] and second.versions[r.LISTENER] == first.versions[r.LISTENER]
    plane.cache.set_snapshot(NODE, second)
    assert plane.cache.wait_acked(NODE, second, 10)
    t.join(timeout=SLOW_S * 5)
    assert results == [(200, "done\n")]  # finished on the old listener, which drained
    assert call(listen, "GET", "/fast") == (200, "done\n")  # the new one serves
    assert call(listen, "GET", "/other")[0] == 403


def test_crashed_envoy_restarts_with_backoff_and_gets_config_back(plane: Plane, slow_backend: int,
                                                                  tmp_path: Path) -> None:
    listen = free_port()
    snap = Snapshot.of(r.build([_svc(slow_backend, listen, "/.*")], str(tmp_path / "access.jsonl")))
    plane.cache.set_snapshot(NODE, snap)
    assert plane.cache.wait_acked(NODE, snap, 10)
    envoy = plane.envoy
    assert envoy.proc is not None
    os.kill(envoy.proc.pid, signal.SIGKILL)
    envoy.proc.wait(timeout=10)
    assert envoy.check() is True and envoy.restarts == 1  # restarted at once the first time...
    first_pid = envoy.proc.pid
    envoy.wait_ready()
    assert envoy.check() is True and envoy.proc.pid == first_pid  # ...and left alone while it runs
    deadline = time.monotonic() + 15
    while call(listen, "GET", "/") != (200, "done\n"):  # the same server serves it its config again
        assert time.monotonic() < deadline, "restarted Envoy did not get its listener back"
        time.sleep(0.1)
    os.kill(envoy.proc.pid, signal.SIGKILL)
    envoy.proc.wait(timeout=10)
    assert envoy.check() is False  # a second crash within the backoff: not restarted yet
    time.sleep(1.1)
    assert envoy.check() is True and envoy.restarts == 2
    envoy.wait_ready()
