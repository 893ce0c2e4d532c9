"""`webb hubble relay --peers-dns NAME:PORT` (mesh.hubble.relay.PeerWatch): the peers are NAME's
addresses, resolved again and again; nodes that appear are asked, nodes gone are not. Two real
`webb hubble serve` servers on 127.0.0.1 (tests/unit/test_hubble_relay.py's nodes); the resolver is
a function the test gives (what DNS would answer, changed between two resolutions), and the real
getaddrinfo for "localhost". No root needed."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.hubble.api import load
from mesh.hubble.relay import PeerWatch, Relay, resolve_dns, serve_relay
from tests.conftest import ROOT
from tests.hubble_cli import run_hubble
from tests.unit.test_hubble_relay import WEBB_RELAY, Node, make_node, statuses
from tests.unit.test_hubble_server import free_port, record, seqs

observer_pb = load("observer.observer_pb2")
observer_grpc = load("observer.observer_pb2_grpc")
relay_pb = load("relay.relay_pb2")


class Dns:
    """What the resolver answers now: a list of addresses, or an OSError (a DNS server that is down)."""

    def __init__(self) -> None:
        self.answer: list[str] | OSError = []
        self.asked: list[tuple[str, int]] = []

    def __call__(self, name: str, port: int) -> list[str]:
        self.asked.append((name, port))
        if isinstance(self.answer, OSError):
            raise self.answer
        return list(self.answer)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    ns = [make_node(tmp_path, "node1", 0), make_node(tmp_path, "node2", 1)]
    yield ns
    for n in ns:
        n.stop()
        n.store.stop()


@pytest.fixture
def relay() -> Iterator[tuple[Relay, Any]]:
    port = free_port()
    server, r = serve_relay([], f"127.0.0.1:{port}", peer_timeout_s=5, dynamic=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield r, observer_grpc.ObserverStub(channel)
    channel.close()
    server.stop(grace=0).wait(5)
    r.close()


def names(responses: list[Any]) -> set[str]:
    return {r.node_name for r in responses if r.HasField("flow")}


def test_peers_follow_what_the_name_resolves_to(nodes: list[Node], relay: tuple[Relay, Any]) -> None:
    n1, n2 = nodes
    r, observer = relay
    dns = Dns()
    watch = PeerWatch(r, "webb-hubble-peer.webb-system.svc.cluster.local", 4244, interval_s=3600, resolve=dns)

    def flows() -> list[Any]:
        return list(observer.GetFlows(observer_pb.GetFlowsRequest(), timeout=10))

    def connected() -> tuple[int, int]:
        st = observer.ServerStatus(observer_pb.ServerStatusRequest(), timeout=10)
        return st.num_connected_nodes.value, st.num_unavailable_nodes.value

    assert watch.refresh() and not r.peers and flows() == [] and connected() == (0, 0)  # no node yet: nothing, no error
    assert dns.asked == [("webb-hubble-peer.webb-system.svc.cluster.local", 4244)]
    dns.answer = [n1.address]
    assert watch.refresh()
    assert seqs(flows()) == [0, 2, 4, 6, 8] and names(flows()) == {"node1"} and connected() == (1, 0)
    dns.answer = [n2.address, n1.address, n2.address]  # a node appears (a duplicate is one peer)
    assert watch.refresh()
    assert seqs(flows()) == list(range(10)) and names(flows()) == {"node1", "node2"} and connected() == (2, 0)
    assert sorted(p.address for p in r.peers) == sorted([n1.address, n2.address])
    dns.answer = OSError("Temporary failure in name resolution")  # the DNS server away: the peers stay
    assert not watch.refresh()
    assert connected() == (2, 0)
    dns.answer = [n2.address]  # node1 gone
    assert watch.refresh()
    got = flows()
    assert seqs(got) == [1, 3, 5, 7, 9] and statuses(got) == [(relay_pb.NODE_CONNECTED, [n2.address])]
    assert connected() == (1, 0)
    nodes_ = observer.GetNodes(observer_pb.GetNodesRequest(), timeout=10).nodes
    assert [n.name for n in nodes_] == ["node2"]
    dns.answer = []  # the name is gone (no endpoints): no peer
    assert watch.refresh() and flows() == [] and connected() == (0, 0)


def test_the_watch_resolves_again_by_itself_and_stops(nodes: list[Node], relay: tuple[Relay, Any]) -> None:
    n1, n2 = nodes
    r, _ = relay
    dns = Dns()
    dns.answer = [n1.address]
    watch = PeerWatch(r, "peers", 4244, interval_s=0.1, resolve=dns).start()
    try:
        assert [p.address for p in r.peers] == [n1.address]  # resolved before start() returns
        dns.answer = [n1.address, n2.address]
        deadline = time.monotonic() + 5
        while len(r.peers) != 2:
            assert time.monotonic() < deadline, "the new address was not taken"
            time.sleep(0.05)
    finally:
        watch.stop()
    asked = len(dns.asked)
    time.sleep(0.3)
    assert len(dns.asked) == asked  # stopped: no more resolutions


def test_a_follower_gets_nodes_that_appear_and_is_told_of_nodes_gone(nodes: list[Node], relay: tuple[Relay, Any]) -> None:
    n1, n2 = nodes
    r, observer = relay
    r.set_peers([n1.address])
    stream = observer.GetFlows(observer_pb.GetFlowsRequest(follow=True, number=1), timeout=60)
    assert seqs([next(stream)]) == [8]
    r.set_peers([n1.address, n2.address])  # node2 appears while the client follows
    got = next(stream)
    assert seqs([got]) == [9] and got.node_name == "node2"  # its last one, as for the peers of the start
    n2.log.write([record(40)])
    got = next(stream)
    assert seqs([got]) == [40] and got.node_name == "node2"
    r.set_peers([n2.address])  # node1 gone
    got = next(stream)
    assert statuses([got]) == [(relay_pb.NODE_UNAVAILABLE, [n1.address])] and "no longer a peer" in got.node_status.message
    n1.log.write([record(41)])  # no longer asked
    n2.log.write([record(42)])
    assert seqs([next(stream)]) == [42]
    stream.cancel()


def test_resolve_dns_gives_every_address_of_a_name() -> None:
    expected = {f"[{a[4][0]}]:4244" if a[0] == socket.AF_INET6 else f"{a[4][0]}:4244"
                for a in socket.getaddrinfo("localhost", 4244, type=socket.SOCK_STREAM)}
    got = resolve_dns("localhost", 4244)
    assert "127.0.0.1:4244" in got and set(got) == expected and len(got) == len(expected)


def test_webb_hubble_relay_peers_dns_with_the_hubble_cli(nodes: list[Node]) -> None:
    """The command as the chart runs it: --peers-dns over "localhost" at node1's port (its 127.0.0.1)."""
    n1, _ = nodes
    server = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([*WEBB_RELAY, "--peers-dns", f"localhost:{n1.port}", "--dns-interval", "1", "--listen", server,
                             "--lifetime", "60"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while (st := run_hubble("status", "--server", server, timeout_s=10)).returncode != 0 or "Connected Nodes: 1/1" not in st.stdout:
            assert proc.poll() is None and time.monotonic() < deadline, (st.stdout, st.stderr, proc.poll())
            time.sleep(0.2)
        out = run_hubble("observe", "--server", server, "--last", "3", "-o", "json")
        assert out.returncode == 0, out.stderr
        lines = [json.loads(ln) for ln in out.stdout.splitlines() if ln.strip()]
        assert [ln["flow"]["node_name"] for ln in lines] == ["node1"] * 3, out.stdout
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0 and "over the addresses of localhost" in err, err


@pytest.mark.parametrize("args,message", [
    (["--peers-dns", "webb_hubble peer:4244"], "use NAME:PORT"),
    (["--peers-dns", "peers:99999"], "use NAME:PORT"),
    (["--peers-dns", "peers"], "use NAME:PORT"),
    (["--peers-dns", "peers:4244", "--peer", "127.0.0.1:4244"], "one of the two"),
], ids=["space", "port", "no-port", "both"])
def test_a_bad_peers_dns_is_refused_naming_the_flag(args: list[str], message: str) -> None:
    r = subprocess.run([*WEBB_RELAY, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    out = " ".join(r.stderr.replace("│", " ").split())
    assert r.returncode == 2 and message in out and "--peers-dns" in out, r.stderr
