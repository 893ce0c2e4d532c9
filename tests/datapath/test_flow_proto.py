"""L4 flows name the protocol the kernel saw: a UDP datagram (sendmsg), a connected UDP socket
(connect) and a TCP connect to VIPs without backends each become a flow of their own protocol
(the real datapath and the agent's from_event; no agent)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from datapath.loader import Datapath, pin_dir_for
from datapath.maps import DatapathState
from datapath.types import PROTO_TCP, PROTO_UDP, ServiceEntry
from mesh.agent.flows import Names, from_event
from mesh.runtime.local import LocalNode

pytestmark = [pytest.mark.root, pytest.mark.bpf]
VIP = "10.96.202.11"
CLIENT = f"""
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", ("{VIP}", 53))
except OSError as e:
    print("sendto", e.errno)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    c.connect(("{VIP}", 54))
except OSError as e:
    print("udp connect", e.errno)
t = socket.socket()
try:
    t.connect(("{VIP}", 80))
except OSError as e:
    print("tcp connect", e.errno)
"""


def test_udp_and_tcp_flows_name_their_protocol(node: LocalNode) -> None:
    cli = node.ensure_pod("default/proto", ["sleep", "60"])
    dp = Datapath(str(node.config.pods_cgroup), pin_dir_for(node.config.name))
    try:
        dp.apply(DatapathState(services=[ServiceEntry(VIP, 53, 1, (), proto=PROTO_UDP),
                                         ServiceEntry(VIP, 54, 2, (), proto=PROTO_UDP),
                                         ServiceEntry(VIP, 80, 3, (), proto=PROTO_TCP)]))
        names = Names(pod_by_cgroup={cli.cgroup_id: cli.key})
        p = node.spawn(cli, [sys.executable, "-c", CLIENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err.decode()
        assert out.decode().count("111") == 3, out.decode()  # ECONNREFUSED, each: no backend
        flows = []
        deadline = time.monotonic() + 10
        while len(flows) < 3 and time.monotonic() < deadline:
            flows += [from_event(e, names) for e in dp.poll_events(50)]
        got = sorted((f["dst"], f["protocol"], f["verdict"], f["reason"]) for f in flows)
        assert got == [(f"{VIP}:53", "UDP", "dropped", "no-backend"), (f"{VIP}:54", "UDP", "dropped", "no-backend"),
                       (f"{VIP}:80", "TCP", "dropped", "no-backend")], flows
        assert {f["src"] for f in flows} == {"default/proto"}
    finally:
        dp.close(unpin=True)
