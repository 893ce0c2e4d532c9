"""One L7 listener: the proxy asks getsockopt(SO_ORIGINAL_DST) which service a redirected connection is for.

Real kernel, real sockets: a client pod connects to a VIP whose service goes to the node proxy; the
"proxy" here is a plain server that accepts and asks the kernel, as Envoy's original_dst listener
filter does, and answers with what it got. Both places a proxy runs: as a pod (the cluster: the agent's
pod, in kubelet's pod cgroup) and in a cgroup of its own beside the pods (the embedded node's Envoy).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datapath.loader import Datapath, pin_dir_for
from datapath.maps import DatapathState
from datapath.types import EP_PROXY, IDENTITY_NODE, Backend, ServiceEntry
from mesh.runtime import cgroups
from mesh.runtime.local import LocalNode, Sandbox
from tests.conftest import SLOW

pytestmark = [pytest.mark.root, pytest.mark.bpf]
VIP, VIP6, VIP_EMBEDDED = "10.96.201.10", "fd00:10:96::c9:10", "10.96.201.11"
CLIENT_ID = 1001

# Answers each connection with what getsockopt(SO_ORIGINAL_DST) says: "orig <ip> <port>" or "none <errno>",
# for argv[1] seconds (generous: a loaded machine spawns each client slowly; the pod goes at teardown).
PROXY = r"""
import socket, struct, sys, threading, time
life = float(sys.argv[1])
def serve(host, port):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.create_server((host, port), family=fam); srv.settimeout(life)
    end = time.monotonic() + life
    while time.monotonic() < end:
        try: c, _ = srv.accept()
        except TimeoutError: break
        try:
            if fam == socket.AF_INET:
                port_, ip = struct.unpack("!2xH4s8x", c.getsockopt(socket.SOL_IP, 80, 16))
            else:
                port_, ip = struct.unpack("!2xH4x16s4x", c.getsockopt(socket.IPPROTO_IPV6, 80, 28))
            try:  # answered once only
                c.getsockopt(socket.SOL_IP, 80, 16) if fam == socket.AF_INET else c.getsockopt(socket.IPPROTO_IPV6, 80, 28)
                again = "again"
            except OSError:
                again = ""
            c.sendall(f"orig {socket.inet_ntop(fam, ip)} {port_}{again}".encode())
        except OSError as e:
            c.sendall(f"none {e.errno}".encode())
        except Exception as e:  # an answer of the wrong shape: say so
            c.sendall(f"bad {e!r}".encode())
        c.close()
for a in sys.argv[2:]:
    host, port = a.rsplit(":", 1)
    threading.Thread(target=serve, args=(host.strip("[]"), int(port)), daemon=True).start()
print("listening", flush=True)
time.sleep(life)
"""
CLIENT = """
import socket, sys
for _ in range(int(sys.argv[4]) if len(sys.argv) > 4 else 1):  # one process, many connections (a slow guest spawns slowly)
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(s.recv(100).decode()); s.close()
"""


def _ask(node: LocalNode, c: Sandbox, ip: str, port: int, n: int = 1) -> str:
    p = node.spawn(c, [sys.executable, "-c", CLIENT, ip, str(port), str(3 * SLOW), str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=15 * SLOW)
    assert p.returncode == 0, err.decode()
    return out.decode().strip()


def _until(node: LocalNode, c: Sandbox, ip: str, port: int) -> str:
    deadline = time.monotonic() + 10 * SLOW
    while True:
        try:
            return _ask(node, c, ip, port)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def proxy_cgroup(node: LocalNode) -> Iterator[Path]:
    cg = node.config.cgroup / "proxy"
    cg.mkdir(parents=True, exist_ok=True)
    yield cg
    cgroups.remove_tree(cg)


def test_proxy_pod_gets_the_original_destination(node: LocalNode) -> None:
    proxy = node.ensure_pod("webb-system/proxy", [sys.executable, "-c", PROXY, str(180 * SLOW), "0.0.0.0:15001", "[::]:15001"])
    client = node.ensure_pod("default/client", ["sleep", "60"])
    dp = Datapath(str(node.config.pods_cgroup), pin_dir_for(node.config.name))
    try:
        dp.apply(DatapathState(
            services=[ServiceEntry(VIP, 80, 7, (Backend("10.244.200.250", 8080),), proxy_ip=proxy.ip, proxy_port=15001),
                      ServiceEntry(VIP6, 8080, 8, (Backend("fd00::1", 8080),), proxy_ip=proxy.ip6, proxy_port=15001)],
            endpoints={client.ip: (CLIENT_ID, 0), client.ip6: (CLIENT_ID, 0)},
            cgroups={client.cgroup_id: (CLIENT_ID, 0), proxy.cgroup_id: (IDENTITY_NODE, EP_PROXY)},
            policy=[]))
        assert _until(node, client, VIP, 80) == f"orig {VIP} 80"
        assert _ask(node, client, VIP6, 8080) == f"orig {VIP6} 8080"
        # straight to the proxy (no redirect): the kernel's own answer stays (no conntrack entry)
        assert _ask(node, client, proxy.ip, 15001).startswith("none ")
        assert _ask(node, client, proxy.ip6, 15001).startswith("none ")
        # many connections, each its own answer (the key is the client's port)
        rounds = int(os.environ.get("WEBB_ORIGDST_ROUNDS", "10"))
        assert _ask(node, client, VIP, 80, rounds).splitlines() == [f"orig {VIP} 80"] * rounds
    finally:
        dp.close(unpin=True)


def test_proxy_beside_the_pods_gets_the_original_destination(node: LocalNode, proxy_cgroup: Path) -> None:
    """The embedded node: Envoy on the bridge's gateway address, in a cgroup of its own (not a pod's)."""
    gw = node.config.gateway
    client = node.ensure_pod("default/client", ["sleep", "60"])
    # the proxy joins its cgroup before it starts (exec): no moment outside it
    proc = subprocess.Popen(["sh", "-c", 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"', "sh", str(proxy_cgroup),
                             sys.executable, "-c", PROXY, str(180 * SLOW), f"{gw}:15002"], stdout=subprocess.PIPE)
    dp = Datapath(str(node.config.pods_cgroup), pin_dir_for(node.config.name), proxy_cgroup=str(proxy_cgroup))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"listening"
        dp.apply(DatapathState(
            services=[ServiceEntry(VIP_EMBEDDED, 80, 9, (Backend("10.244.200.250", 8080),), proxy_ip=gw, proxy_port=15002)],
            endpoints={client.ip: (CLIENT_ID, 0)}, cgroups={client.cgroup_id: (CLIENT_ID, 0)}, policy=[]))
        assert _until(node, client, VIP_EMBEDDED, 80) == f"orig {VIP_EMBEDDED} 80"
    finally:
        proc.kill()
        proc.wait()
        dp.close(unpin=True)
    # detached from the proxy's cgroup too: its getsockopt is the kernel's again
    assert not pin_dir_for(node.config.name).exists()
