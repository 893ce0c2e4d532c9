"""The socket programs in the running kernel: pods (netns + cgroup) made by the test."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from datapath.loader import Datapath
from datapath.maps import Backend, DatapathState, PolicyEntry, Reason, ServiceEntry, Verdict
from mesh.runtime.local import LocalNode, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.bpf]
VIP = "10.96.200.10"
SERVER_ID, CLIENT_ID = 1000, 1001

# Prints the peer the application sees, then the server's answer.
CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print(s.getpeername()[0], s.getpeername()[1]); print(s.recv(100).decode())
"""
SERVER = """
import socket, sys, time
srv = socket.create_server(("0.0.0.0", 8080)); srv.settimeout(30)
end = time.monotonic() + 30
while time.monotonic() < end:
    try: c, _ = srv.accept()
    except TimeoutError: break
    c.sendall(sys.argv[1].encode()); c.close()
"""


@pytest.fixture
def pods(node: LocalNode) -> Iterator[tuple[Sandbox, Sandbox, Sandbox]]:
    a = node.ensure_pod("default/server-a", [sys.executable, "-c", SERVER, "A"])
    b = node.ensure_pod("default/server-b", [sys.executable, "-c", SERVER, "B"])
    c = node.ensure_pod("default/client", ["sleep", "60"])
    yield a, b, c


@pytest.fixture
def dp(node: LocalNode) -> Iterator[Datapath]:
    d = Datapath(str(node.config.pods_cgroup))
    yield d
    d.close()


def _state(a: Sandbox, b: Sandbox, c: Sandbox, enforced: bool = False, allow: bool = True,
           backends: tuple[Backend, ...] | None = None) -> DatapathState:
    be = backends if backends is not None else (Backend(a.ip, 8080), Backend(b.ip, 8080))
    return DatapathState(
        services=[ServiceEntry(VIP, 80, 7, be)],
        endpoints={a.ip: (SERVER_ID, enforced), b.ip: (SERVER_ID, enforced), c.ip: (CLIENT_ID, False)},
        cgroups={a.cgroup_id: (SERVER_ID, enforced), b.cgroup_id: (SERVER_ID, enforced), c.cgroup_id: (CLIENT_ID, False)},
        policy=[PolicyEntry(SERVER_ID, CLIENT_ID, 8080, 1)] if allow else [],
    )


def _connect(node: LocalNode, c: Sandbox, ip: str = VIP, port: int = 80) -> subprocess.CompletedProcess[str]:
    p = node.spawn(c, [sys.executable, "-c", CLIENT, ip, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=15)
    return subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())


def _wait_listening(node: LocalNode, c: Sandbox, ips: list[str]) -> None:
    for ip in ips:
        deadline = time.monotonic() + 10
        while _connect(node, c, ip, 8080).returncode != 0:
            assert time.monotonic() < deadline, f"server at {ip} did not start"
            time.sleep(0.1)


def test_layout_matches_btf(dp: Datapath) -> None:
    # Datapath() already ran check_layout; every map is there with the sizes Python uses
    assert dp.maps["webb_services"].key_size == 8


def test_vip_rewritten_to_both_backends_and_peer_is_vip(node: LocalNode, pods: tuple, dp: Datapath) -> None:
    a, b, c = pods
    _wait_listening(node, c, [a.ip, b.ip])
    dp.apply(_state(a, b, c))
    seen = set()
    for _ in range(40):
        r = _connect(node, c)
        assert r.returncode == 0, r.stderr
        peer, answer = r.stdout.split("\n")[:2]
        assert peer == f"{VIP} 80"  # getpeername4 reverses the rewrite
        seen.add(answer)
        if seen == {"A", "B"}:
            break
    assert seen == {"A", "B"}
    events = dp.poll_events(100)
    assert any(e.reason == Reason.SERVICE and e.orig_ip == VIP and e.new_port == 8080 for e in events)


def test_policy_denies_at_connect_with_reason(node: LocalNode, pods: tuple, dp: Datapath) -> None:
    a, b, c = pods
    _wait_listening(node, c, [a.ip, b.ip])
    dp.apply(_state(a, b, c, enforced=True, allow=False))
    before = dp.reason_counts()[Reason.POLICY_DENIED]
    r = _connect(node, c)
    assert r.returncode != 0 and "PermissionError" in r.stderr  # EPERM from connect()
    r = _connect(node, c, a.ip, 8080)  # straight to the pod IP: same verdict
    assert "PermissionError" in r.stderr
    assert dp.reason_counts()[Reason.POLICY_DENIED] == before + 2
    denied = [e for e in dp.poll_events(100) if e.verdict == Verdict.DENIED]
    assert len(denied) == 2 and denied[0].src_identity == CLIENT_ID and denied[0].dst_identity == SERVER_ID
    dp.apply(_state(a, b, c, enforced=True, allow=True))
    assert _connect(node, c).returncode == 0


def test_no_backend_is_dropped_with_reason(node: LocalNode, pods: tuple, dp: Datapath) -> None:
    a, b, c = pods
    dp.apply(_state(a, b, c, backends=()))
    r = _connect(node, c)
    assert r.returncode != 0
    assert any(e.reason == Reason.NO_BACKEND for e in dp.poll_events(100))


def test_unrewritten_vip_is_blackholed(node: LocalNode, pods: tuple) -> None:
    # no datapath loaded: the service CIDR must fail at once inside the pod, never leave
    _, _, c = pods
    r = _connect(node, c)
    assert r.returncode != 0
    assert "Invalid argument" in r.stderr, r.stderr  # EINVAL from the blackhole route


def test_apply_is_idempotent_and_removes_stale_entries(node: LocalNode, pods: tuple, dp: Datapath) -> None:
    a, b, c = pods
    st = _state(a, b, c)
    assert dp.apply(st) > 0
    assert dp.apply(st) == 0
    dp.apply(DatapathState())
    assert all(not list(m.keys()) for n, m in dp.maps.items() if n != "webb_reason_counts")
