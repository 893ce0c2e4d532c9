"""Pinned datapath: survives its owner (even SIGKILL), is adopted, and is removed by cleanup."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from datapath.loader import OBJECT_PATH, Datapath, cleanup, pin_dir_for
from datapath.maps import DatapathState
from datapath.types import Backend, ServiceEntry
from mesh.runtime.local import LocalNode
from tests.conftest import ROOT

pytestmark = [pytest.mark.root, pytest.mark.bpf]
VIP = "10.96.201.10"

ECHO_SERVER = """
import socket, threading, time
srv = socket.create_server(("0.0.0.0", 8080)); srv.settimeout(30)
def serve(c):
    with c:
        while data := c.recv(100): c.sendall(data)
end = time.monotonic() + 30
while time.monotonic() < end:
    try: c, _ = srv.accept()
    except TimeoutError: break
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
# Keeps one connection open; each line on stdin → one round trip on it, then one new connection.
CLIENT = """
import socket, sys, time
end = time.monotonic() + 10
while True:  # the echo server may still be starting
    try: s = socket.create_connection((sys.argv[1], 80), timeout=3); break
    except ConnectionRefusedError:
        if time.monotonic() > end: raise
        time.sleep(0.05)
for line in sys.stdin:
    s.sendall(line.encode()); old = s.recv(100).decode().strip()
    try:
        n = socket.create_connection((sys.argv[1], 80), timeout=3); n.sendall(b"x"); new = n.recv(10).decode(); n.close()
    except OSError as e:
        new = type(e).__name__
    print(old, new, flush=True)
"""
# An "agent" that loads and fills the datapath, says so, then waits to be killed.
OWNER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from datapath.loader import Datapath, pin_dir_for
from datapath.maps import DatapathState
from datapath.types import Backend, ServiceEntry
dp = Datapath(sys.argv[2], pin_dir_for(sys.argv[3]))
dp.apply(DatapathState(services=[ServiceEntry(sys.argv[4], 80, 5, (Backend(sys.argv[5], 8080),))]))
print(json.dumps({"adopted": dp.adopted}), flush=True)
time.sleep(60)
"""


def test_sigkilled_owner_keeps_connections_and_restart_adopts(node: LocalNode) -> None:
    srv = node.ensure_pod("default/echo", [sys.executable, "-c", ECHO_SERVER])
    cli = node.ensure_pod("default/client", ["sleep", "60"])
    name, cg = node.config.name, str(node.config.pods_cgroup)
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(ROOT), cg, name, VIP, srv.ip],
                             stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    assert json.loads(owner.stdout.readline()) == {"adopted": False}
    client = node.spawn(cli, [sys.executable, "-c", CLIENT, VIP], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None

    def step(word: str) -> list[str]:
        client.stdin.write(word.encode() + b"\n")  # type: ignore[union-attr]
        client.stdin.flush()  # type: ignore[union-attr]
        return client.stdout.readline().decode().split()  # type: ignore[union-attr]

    try:
        assert step("before") == ["before", "x"]
        owner.send_signal(signal.SIGKILL)  # the agent dies hard
        owner.wait(timeout=10)
        assert step("during") == ["during", "x"]  # old connection alive, new one still translated

        again = Datapath(cg, pin_dir_for(name))
        try:
            assert again.adopted
            state = DatapathState(services=[ServiceEntry(VIP, 80, 5, (Backend(srv.ip, 8080),))])
            assert again.apply(state) == 0  # the state survived too
            assert step("after") == ["after", "x"]
        finally:
            again.close()
        removed = cleanup(pin_dir_for(name), cg)  # returns once the kernel has detached them
        assert "link_webb_sock4_connect" in removed and "webb_services" in removed
        # detached: the VIP is no longer translated and the blackhole route answers (EINVAL)
        assert step("cleaned") == ["cleaned", "OSError"]
    finally:
        client.kill()
        client.wait(timeout=10)
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=10)
        cleanup(pin_dir_for(name))


def test_new_object_reuses_pinned_maps_and_swaps_programs(node: LocalNode, tmp_path: Path) -> None:
    name, cg = node.config.name, str(node.config.pods_cgroup)
    first = Datapath(cg, pin_dir_for(name))
    try:
        first.apply(DatapathState(services=[ServiceEntry(VIP, 80, 5, (Backend("10.244.200.9", 8080),))]))
        first.close()
        # same code, different bytes: as after an upgrade
        changed = tmp_path / "sock.bpf.o"
        changed.write_bytes(OBJECT_PATH.read_bytes() + b"\0")
        changed.with_name("sock.bpf.o.sha256").write_text(hashlib.sha256(changed.read_bytes()).hexdigest() + "\n")
        second = Datapath(cg, pin_dir_for(name), object_path=changed)
        assert not second.adopted
        assert second.apply(DatapathState(services=[ServiceEntry(VIP, 80, 5, (Backend("10.244.200.9", 8080),))])) == 0
        second.close()
        third = Datapath(cg, pin_dir_for(name), object_path=changed)
        assert third.adopted
        third.close()
    finally:
        cleanup(pin_dir_for(name))
