"""The socket programs in the running kernel: pods (netns + cgroup) made by the test."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from datapath.loader import Datapath, pin_dir_for
from datapath.maps import LAYOUT, STATE_MAPS, DatapathState
from datapath.types import EP_AUDIT, EP_INGRESS_ENFORCED, PROTO_UDP, Backend, PolicyEntry, Reason, ServiceEntry, Verdict
from mesh.runtime.local import LocalNode, Sandbox
from tests.conftest import SLOW

pytestmark = [pytest.mark.root, pytest.mark.bpf]
VIP = "10.96.200.10"
SERVER_ID, CLIENT_ID = 1000, 1001

# Prints the peer the application sees, then the server's answer.
CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
print(s.getpeername()[0], s.getpeername()[1]); print(s.recv(100).decode())
"""
SERVER = """
import socket, sys, time
life = float(sys.argv[2])
srv = socket.create_server(("::", 8080), family=socket.AF_INET6, dualstack_ipv6=True); srv.settimeout(life)
end = time.monotonic() + life
while time.monotonic() < end:
    try: c, _ = srv.accept()
    except TimeoutError: break
    c.sendall(sys.argv[1].encode()); c.close()
"""


@pytest.fixture
def pods(node: LocalNode) -> Iterator[tuple[Sandbox, Sandbox, Sandbox]]:
    a = node.ensure_pod("default/server-a", [sys.executable, "-c", SERVER, "A", str(30 * SLOW)])
    b = node.ensure_pod("default/server-b", [sys.executable, "-c", SERVER, "B", str(30 * SLOW)])
    c = node.ensure_pod("default/client", ["sleep", "60"])
    yield a, b, c


@pytest.fixture
def dp(node: LocalNode) -> Iterator[Datapath]:
    d = Datapath(str(node.config.pods_cgroup), pin_dir_for(node.config.name))
    yield d
    d.close(unpin=True)
    assert not pin_dir_for(node.config.name).exists()


def _state(a: Sandbox, b: Sandbox, c: Sandbox, enforced: bool = False, allow: bool = True,
           backends: tuple[Backend, ...] | None = None, audit: bool = False, affinity: int = 0) -> DatapathState:
    be = backends if backends is not None else (Backend(a.ip, 8080), Backend(b.ip, 8080))
    flags = (EP_INGRESS_ENFORCED if enforced else 0) | (EP_AUDIT if audit else 0)
    return DatapathState(
        services=[ServiceEntry(VIP, 80, 7, be, affinity_timeout_s=affinity)],
        endpoints={a.ip: (SERVER_ID, flags), b.ip: (SERVER_ID, flags), c.ip: (CLIENT_ID, 0)},
        cgroups={a.cgroup_id: (SERVER_ID, flags), b.cgroup_id: (SERVER_ID, flags), c.cgroup_id: (CLIENT_ID, 0)},
        policy=[PolicyEntry(SERVER_ID, CLIENT_ID, 8080, 1)] if allow else [],
    )


def _connect(node: LocalNode, c: Sandbox, ip: str = VIP, port: int = 80) -> subprocess.CompletedProcess[str]:
    p = node.spawn(c, [sys.executable, "-c", CLIENT, ip, str(port), str(3 * SLOW)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=15 * SLOW)
    return subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())


def _wait_listening(node: LocalNode, c: Sandbox, ips: list[str]) -> None:
    for ip in ips:
        deadline = time.monotonic() + 10 * SLOW
        while _connect(node, c, ip, 8080).returncode != 0:
            assert time.monotonic() < deadline, f"server at {ip} did not start"
            time.sleep(0.1)


def test_layout_matches_btf(dp: Datapath) -> None:
    # Datapath() already ran check_layout; every map is there with the sizes Python uses
    for name, (key, value) in LAYOUT.items():
        assert (dp.maps[name].key_size, dp.maps[name].value_size) == (key.size, value.size)


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


def test_no_backend_is_refused_with_reason(node: LocalNode, pods: tuple, dp: Datapath) -> None:
    a, b, c = pods
    dp.apply(_state(a, b, c, backends=()))
    r = _connect(node, c)
    assert "ConnectionRefusedError" in r.stderr, r.stderr  # ECONNREFUSED, like a closed port
    assert any(e.reason == Reason.NO_BACKEND for e in dp.poll_events(100))


def test_audit_mode_counts_would_deny_and_allows(node: LocalNode, pods: tuple, dp: Datapath) -> None:
    a, b, c = pods
    _wait_listening(node, c, [a.ip, b.ip])
    dp.apply(_state(a, b, c, enforced=True, allow=False, audit=True))
    before = dp.reason_counts()[Reason.POLICY_AUDIT]
    assert _connect(node, c).returncode == 0
    assert dp.reason_counts()[Reason.POLICY_AUDIT] == before + 1
    assert any(e.verdict == Verdict.AUDIT for e in dp.poll_events(100))


def test_client_ip_affinity_sticks_to_one_backend(node: LocalNode, pods: tuple, dp: Datapath) -> None:
    a, b, c = pods
    _wait_listening(node, c, [a.ip, b.ip])
    dp.apply(_state(a, b, c, affinity=60))
    answers = {_connect(node, c).stdout.split("\n")[1] for _ in range(12)}
    assert len(answers) == 1, answers  # 12 random picks over 2 backends would differ (p = 2^-11)
    dp.apply(_state(a, b, c, affinity=60, backends=(Backend(b.ip, 8080),)))
    assert _connect(node, c).stdout.split("\n")[1] == "B"  # a stale affinity entry is not followed


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
    assert all(not list(dp.maps[n].keys()) for n in STATE_MAPS)


UDP_SERVER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 5353)); s.settimeout(30)
end = time.monotonic() + 30
while time.monotonic() < end:
    try: data, peer = s.recvfrom(100)
    except TimeoutError: break
    s.sendto(sys.argv[1].encode() + data, peer)
"""
UDP_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
for _ in range(20):  # the server may still be starting: bounded retries
    s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
    try:
        data, peer = s.recvfrom(100); print(peer[0], peer[1], data.decode()); break
    except TimeoutError: continue
"""


def test_udp_sendmsg_rewritten_and_reply_comes_from_vip(node: LocalNode, dp: Datapath) -> None:
    srv = node.ensure_pod("default/dns", [sys.executable, "-c", UDP_SERVER, "A"])
    cli = node.ensure_pod("default/udp-client", ["sleep", "60"])
    dp.apply(DatapathState(services=[ServiceEntry(VIP, 53, 9, (Backend(srv.ip, 5353),), proto=PROTO_UDP)]))
    p = node.spawn(cli, [sys.executable, "-c", UDP_CLIENT, VIP, "53"], stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=20)
    assert out.decode().strip() == f"{VIP} 53 Aping"  # recvmsg4 shows the VIP as the source


VIP6 = "fd00:10:96::c8:10"
CLIENT6 = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
print(s.getpeername()[0], s.getpeername()[1]); print(s.recv(100).decode())
"""


def test_ipv6_vip_rewritten_policy_applies(node: LocalNode, pods: tuple, dp: Datapath) -> None:
    a, b, c = pods
    _wait_listening(node, c, [a.ip])
    st = DatapathState(
        services=[ServiceEntry(VIP6, 80, 8, (Backend(a.ip6, 8080),))],
        endpoints={a.ip6: (SERVER_ID, 0), c.ip6: (CLIENT_ID, 0)},
        cgroups={c.cgroup_id: (CLIENT_ID, 0)},
    )
    dp.apply(st)
    r = _connect(node, c, VIP6, 80)
    assert r.returncode == 0, r.stderr
    peer, answer = r.stdout.split("\n")[:2]
    assert (peer, answer) == (f"{VIP6} 80", "A")  # getpeername6 shows the VIP
    events = [e for e in dp.poll_events(100) if e.orig_ip == VIP6]
    assert events and events[0].new_ip == a.ip6 and events[0].reason == Reason.SERVICE
    st.endpoints[a.ip6] = (SERVER_ID, EP_INGRESS_ENFORCED)  # selected, nothing allowed
    dp.apply(st)
    assert "PermissionError" in _connect(node, c, VIP6, 80).stderr
    assert any(e.verdict == Verdict.DENIED and e.new_ip == a.ip6 for e in dp.poll_events(100))


def test_a_container_cgroup_under_a_pod_cgroup_is_that_pod(node: LocalNode, pods: tuple, dp: Datapath) -> None:
    """kubelet puts each container (the pause one too) in a child of the pod's cgroup: the
    nearest ancestor the datapath knows is the source pod; a cgroup under no known pod is
    unknown and denied where policy applies (fail closed)."""
    import dataclasses

    from mesh.runtime import cgroups

    a, b, c = pods
    _wait_listening(node, c, [a.ip, b.ip])
    container = c.cgroup / "container-1"
    stranger = node.config.pods_cgroup / "not-a-pod"
    for cg in (container, stranger):
        cg.mkdir(exist_ok=True)
    try:
        dp.apply(_state(a, b, c, enforced=True, allow=True))
        dp.poll_events(10)
        r = _connect(node, dataclasses.replace(c, cgroup=container))
        assert r.returncode == 0, r.stderr
        ev = [e for e in dp.poll_events(100) if e.reason == Reason.SERVICE]
        assert ev and ev[-1].src_identity == CLIENT_ID and ev[-1].cgroup_id == c.cgroup_id  # named by the pod's cgroup
        r = _connect(node, dataclasses.replace(c, cgroup=stranger))
        assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
        denied = [e for e in dp.poll_events(100) if e.verdict == Verdict.DENIED]
        assert denied and denied[-1].cgroup_id == cgroups.cgroup_id(stranger)
    finally:
        for cg in (container, stranger):
            deadline = time.monotonic() + 10 * SLOW
            while cg.exists():
                try:
                    cg.rmdir()
                except OSError:  # its process is still leaving
                    assert time.monotonic() < deadline, f"remove cgroup {cg}"
                    time.sleep(0.05)
