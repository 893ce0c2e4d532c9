"""MeshTLS STRICT in the kernel: a STRICT pod takes new TCP connections only from this node
(its pods and the tunnel's node address); established connections survive the switch."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator

import pytest

from datapath.loader import Datapath, pin_dir_for
from datapath.maps import DatapathState
from datapath.types import EP_LOCAL, EP_MTLS_STRICT, Reason, Verdict
from mesh.runtime.local import LocalNode, Sandbox
from tests.conftest import SLOW

pytestmark = [pytest.mark.root, pytest.mark.bpf]
SERVER_ID, CLIENT_ID = 1100, 1101
ECHO = """
import socket, sys, threading, time
srv = socket.create_server(("0.0.0.0", 7000)); srv.settimeout(float(sys.argv[1]))
def echo(c):
    with c:
        while d := c.recv(4096): c.sendall(d)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try: c, _ = srv.accept()
    except TimeoutError: break
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""
CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], 7000), timeout=float(sys.argv[2])); s.sendall(b"hi"); print(s.recv(10).decode())
"""


@pytest.fixture
def pods(node: LocalNode) -> Iterator[tuple[Sandbox, Sandbox]]:
    server = node.ensure_pod("secure/server", [sys.executable, "-c", ECHO, str(60 * SLOW)])
    client = node.ensure_pod("secure/client", ["sleep", str(60 * SLOW)])
    yield server, client


@pytest.fixture
def dp(node: LocalNode) -> Iterator[Datapath]:
    d = Datapath(str(node.config.pods_cgroup), pin_dir_for(node.config.name))
    yield d
    d.close(unpin=True)


def _state(server: Sandbox, client: Sandbox, strict: bool) -> DatapathState:
    flags = EP_LOCAL | (EP_MTLS_STRICT if strict else 0)
    return DatapathState(endpoints={server.ip: (SERVER_ID, flags), client.ip: (CLIENT_ID, EP_LOCAL)},
                         cgroups={server.cgroup_id: (SERVER_ID, flags), client.cgroup_id: (CLIENT_ID, EP_LOCAL)})


def _from_host(ip: str, timeout: float) -> socket.socket:
    """A connection from the node itself (the bridge address): outside the mesh."""
    return socket.create_connection((ip, 7000), timeout=timeout)


def _echo(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    return s.recv(100)


def _from_pod(node: LocalNode, client: Sandbox, ip: str) -> str:
    p = node.spawn(client, [sys.executable, "-c", CLIENT, ip, str(5 * SLOW)], stdout=-1, stderr=-1)
    out, err = p.communicate(timeout=20 * SLOW)
    assert p.returncode == 0, err.decode()
    return out.decode().strip()


def test_strict_refuses_new_plaintext_from_outside_keeps_established(node: LocalNode, pods: tuple, dp: Datapath) -> None:
    server, client = pods
    deadline = time.monotonic() + 10 * SLOW
    while True:  # PERMISSIVE: the node itself may connect
        dp.apply(_state(server, client, strict=False))
        try:
            established = _from_host(server.ip, 2 * SLOW)
            break
        except OSError:
            assert time.monotonic() < deadline, "echo server did not start"
            time.sleep(0.1)
    assert _echo(established, b"before") == b"before"
    dp.poll_events(0)
    dp.apply(_state(server, client, strict=True))  # PERMISSIVE -> STRICT
    with pytest.raises(TimeoutError):  # the SYN is dropped: no new plaintext from outside
        _from_host(server.ip, 1.5 * SLOW)
    assert _echo(established, b"still here") == b"still here"  # nothing established is cut
    assert _from_pod(node, client, server.ip) == "hi"  # a pod of this node still may
    assert dp.reason_counts()[Reason.MTLS_STRICT] >= 1
    drops = [e for e in dp.poll_events(200) if e.reason == Reason.MTLS_STRICT]
    assert drops and drops[0].verdict == Verdict.DROPPED and drops[0].dst_identity == SERVER_ID
    assert drops[0].new_ip == server.ip and drops[0].orig_ip == node.config.gateway
    assert drops[0].cgroup_id == server.cgroup_id  # the event names the pod that refused
    established.close()
    dp.apply(_state(server, client, strict=False))  # back to PERMISSIVE: the node connects again
    with _from_host(server.ip, 3 * SLOW) as s:
        assert _echo(s, b"again") == b"again"
