"""`webb hubble relay` (mesh.hubble.relay) over two real `webb hubble serve` servers (nodes node1 and
node2, each over flow files written as the agent writes them, mesh.agent.flows.FlowLog), all on
127.0.0.1: asked by a gRPC client made from the generated stubs and by the real `hubble` CLI. A node's
server is stopped (and started again) to see what the relay says of it. No root needed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.agent.flows import FlowLog
from mesh.hubble.api import load
from mesh.hubble.relay import Relay, serve_relay
from mesh.hubble.server import HealthCheckRequest, HealthCheckResponse, serve
from mesh.hubble.store import Store
from tests.conftest import ROOT
from tests.hubble_cli import run_hubble
from tests.unit.test_hubble_server import T0, free_port, record, seqs

flow_pb = load("flow.flow_pb2")
observer_pb = load("observer.observer_pb2")
observer_grpc = load("observer.observer_pb2_grpc")
relay_pb = load("relay.relay_pb2")
DROPPED_AT = {"node1": [0, 4, 8], "node2": [3, 7]}


@dataclass
class Node:
    name: str
    state: Path
    store: Store
    port: int
    server: grpc.Server | None = None
    log: FlowLog = field(init=False)

    def __post_init__(self) -> None:
        self.log = FlowLog(self.state / "flows.jsonl")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, max_workers: int = 16) -> None:
        self.server = serve(self.store, self.address, max_workers=max_workers)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0).wait(5)
            self.server = None


def make_node(tmp_path: Path, name: str, at: int) -> Node:
    """node1's flows at T0+0, 2, 4, 6, 8; node2's at T0+1, 3, ... 9; dropped at DROPPED_AT."""
    state = tmp_path / name
    state.mkdir()
    FlowLog(state / "flows.jsonl").write([record(t, "denied" if t in DROPPED_AT[name] else "forwarded")
                                          for t in range(at, 10, 2)])
    (state / "status.json").write_text(json.dumps({"node": name, "running": True, "pid": os.getpid(), "updated": time.time()}))
    store = Store([state], max_flows=50, poll_s=0.05)
    store.start()
    node = Node(name, state, store, free_port())
    node.start()
    return node


@dataclass
class Cluster:
    nodes: list[Node]
    relay: Relay
    server: grpc.Server
    port: int
    channel: grpc.Channel
    observer: Any

    def flows(self, timeout_s: float = 10, **req: Any) -> list[Any]:
        return list(self.observer.GetFlows(observer_pb.GetFlowsRequest(**req), timeout=timeout_s))


def start_relay(peers: list[str], **kw: Any) -> tuple[grpc.Server, Relay, int]:
    port = free_port()
    server, relay = serve_relay(peers, f"127.0.0.1:{port}", **kw)
    return server, relay, port


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = [make_node(tmp_path, "node1", 0), make_node(tmp_path, "node2", 1)]
    server, relay, port = start_relay([n.address for n in nodes], peer_timeout_s=5)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    c = Cluster(nodes, relay, server, port, channel, observer_grpc.ObserverStub(channel))
    yield c
    channel.close()
    server.stop(grace=0).wait(5)
    relay.close()
    for n in nodes:
        n.stop()
        n.store.stop()


def statuses(responses: list[Any]) -> list[tuple[int, list[str]]]:
    return [(r.node_status.state_change, list(r.node_status.node_names)) for r in responses if r.HasField("node_status")]


def test_one_view_over_both_nodes_merged_by_time(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes
    last = cluster.flows(number=3)  # each node sends its last 3; the relay keeps the last 3 of the six
    assert seqs(last) == [7, 8, 9] and [r.node_name for r in last if r.HasField("flow")] == ["node2", "node1", "node2"]
    assert [r.flow.node_name for r in last if r.HasField("flow")] == ["node2", "node1", "node2"]
    assert statuses(last) == [(relay_pb.NODE_CONNECTED, [n1.address, n2.address])]
    assert seqs(cluster.flows(number=3, first=True)) == [0, 1, 2]
    everything = cluster.flows()
    assert seqs(everything) == list(range(10))
    assert [r.node_name for r in everything if r.HasField("flow")] == ["node1", "node2"] * 5
    since = flow_pb.Flow().time.__class__(seconds=int(T0) + 4)
    assert seqs(cluster.flows(since=since, number=2)) == [4, 5]  # since: the first 2 after it, as a node answers
    dropped = cluster.flows(whitelist=[flow_pb.FlowFilter(verdict=[flow_pb.DROPPED])])
    assert seqs(dropped) == [0, 3, 4, 7, 8]
    assert [r.node_name for r in dropped if r.HasField("flow")] == ["node1", "node2", "node1", "node2", "node1"]
    only2 = cluster.flows(number=2, whitelist=[flow_pb.FlowFilter(node_name=["node2"])])
    assert seqs(only2) == [7, 9]
    with pytest.raises(grpc.RpcError) as e:  # refused by the relay as a node refuses it
        cluster.flows(whitelist=[flow_pb.FlowFilter(source_label=["app=x"])])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "source_label: not supported" in str(e.value.details())


def test_status_nodes_namespaces_and_health(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes
    st = cluster.observer.ServerStatus(observer_pb.ServerStatusRequest(), timeout=10)
    assert (st.num_flows, st.max_flows, st.seen_flows) == (10, 100, 10)
    assert (st.num_connected_nodes.value, st.num_unavailable_nodes.value, list(st.unavailable_nodes)) == (2, 0, [])
    nodes = cluster.observer.GetNodes(observer_pb.GetNodesRequest(), timeout=10).nodes
    assert [(n.name, n.state, n.address, n.num_flows) for n in nodes] == [
        ("node1", relay_pb.NODE_CONNECTED, n1.address, 5), ("node2", relay_pb.NODE_CONNECTED, n2.address, 5)]
    ns = cluster.observer.GetNamespaces(observer_pb.GetNamespacesRequest(), timeout=10)
    assert [n.namespace for n in ns.namespaces] == ["default"]
    check = cluster.channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=HealthCheckRequest.SerializeToString,
                                        response_deserializer=HealthCheckResponse.FromString)
    assert check(HealthCheckRequest(service="hubble.server.Observer"), timeout=5).status == 1


def test_follow_streams_what_either_node_appends(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes
    stream = cluster.observer.GetFlows(observer_pb.GetFlowsRequest(number=1, follow=True), timeout=30)
    got = [r for r in (next(stream), next(stream))]
    assert sorted(seqs(got)) == [8, 9]  # each node's last one
    n2.log.write([record(20, src="default/xwing")])
    r = next(stream)
    assert seqs([r]) == [20] and r.node_name == "node2" and r.flow.source.pod_name == "xwing"
    n1.log.write([record(21)])
    r = next(stream)
    assert seqs([r]) == [21] and r.node_name == "node1"
    stream.cancel()


def test_a_node_that_is_down_is_said_and_the_other_still_answers(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes
    n2.stop()
    started = time.monotonic()
    got = cluster.flows(number=3)
    assert time.monotonic() - started < 5  # never waits for the one that is down
    assert seqs(got) == [4, 6, 8] and {r.node_name for r in got if r.HasField("flow")} == {"node1"}
    assert statuses(got) == [(relay_pb.NODE_CONNECTED, [n1.address]), (relay_pb.NODE_UNAVAILABLE, [n2.address])]
    st = cluster.observer.ServerStatus(observer_pb.ServerStatusRequest(), timeout=10)
    assert (st.num_connected_nodes.value, st.num_unavailable_nodes.value, list(st.unavailable_nodes)) == (1, 1, [n2.address])
    assert (st.num_flows, st.max_flows) == (5, 50)
    nodes = cluster.observer.GetNodes(observer_pb.GetNodesRequest(), timeout=10).nodes
    assert [(n.name, n.state) for n in nodes] == [("node1", relay_pb.NODE_CONNECTED), (n2.address, relay_pb.NODE_UNAVAILABLE)]
    assert [n.namespace for n in cluster.observer.GetNamespaces(observer_pb.GetNamespacesRequest(), timeout=10).namespaces] \
        == ["default"]


def test_a_peer_that_accepts_but_never_answers_costs_the_peer_timeout_not_a_hang(tmp_path: Path) -> None:
    node = make_node(tmp_path, "node1", 0)
    with socket.socket() as silent:  # the kernel accepts its connections; nobody speaks HTTP/2 on them
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mute = f"127.0.0.1:{silent.getsockname()[1]}"
        server, relay, port = start_relay([node.address, mute], peer_timeout_s=1)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                obs = observer_grpc.ObserverStub(ch)
                started = time.monotonic()
                got = list(obs.GetFlows(observer_pb.GetFlowsRequest(number=2), timeout=20))
                assert time.monotonic() - started < 5
                assert seqs(got) == [6, 8] and statuses(got)[1:] == [(relay_pb.NODE_UNAVAILABLE, [mute])], statuses(got)
                st = obs.ServerStatus(observer_pb.ServerStatusRequest(), timeout=20)
                assert (st.num_connected_nodes.value, list(st.unavailable_nodes)) == (1, [mute])
        finally:
            server.stop(grace=0).wait(5)
            relay.close()
            node.stop()
            node.store.stop()


def test_a_follower_is_told_a_node_left_and_gets_its_flows_again_when_it_is_back(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes
    stream = cluster.observer.GetFlows(observer_pb.GetFlowsRequest(follow=True), timeout=60)
    time.sleep(0.5)  # both nodes' followers have taken their place
    n2.log.write([record(29)])
    assert seqs([next(stream)]) == [29]
    n2.stop()
    r = next(stream)
    assert statuses([r]) == [(relay_pb.NODE_UNAVAILABLE, [n2.address])]
    n1.log.write([record(30)])  # node1 still streams
    assert seqs([next(stream)]) == [30]
    n2.log.write([record(31, src="default/xwing")])  # while node2's server is down: not lost
    n2.start()
    r = next(stream)
    assert statuses([r]) == [(relay_pb.NODE_CONNECTED, [n2.address])]
    r = next(stream)
    assert seqs([r]) == [31] and r.node_name == "node2"
    n2.log.write([record(32)])
    assert seqs([next(stream)]) == [32]
    stream.cancel()


def test_when_the_client_leaves_the_nodes_streams_are_stopped(tmp_path: Path) -> None:
    """Each node serves one call at a time: while the relay follows, the node is busy; once the
    relay's client cancels, the node answers again (its follower was cancelled, not left running)."""
    node = make_node(tmp_path, "node1", 0)
    node.stop()
    node.start(max_workers=1)
    server, relay, port = start_relay([node.address])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, grpc.insecure_channel(node.address) as direct:
            stream = observer_grpc.ObserverStub(ch).GetFlows(observer_pb.GetFlowsRequest(number=1, follow=True), timeout=30)
            assert seqs([next(stream)]) == [8]
            with pytest.raises(grpc.RpcError) as e:
                observer_grpc.ObserverStub(direct).ServerStatus(observer_pb.ServerStatusRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stream.cancel()
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert observer_grpc.ObserverStub(direct).ServerStatus(observer_pb.ServerStatusRequest(), timeout=5).num_flows == 5
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "the node's stream was not stopped"
                    time.sleep(0.1)
    finally:
        server.stop(grace=0).wait(5)
        relay.close()
        node.stop()
        node.store.stop()


def test_a_relay_refuses_to_be_a_relays_peer(cluster: Cluster) -> None:
    server, relay, port = start_relay([f"127.0.0.1:{cluster.port}"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            got = list(observer_grpc.ObserverStub(ch).GetFlows(observer_pb.GetFlowsRequest(), timeout=10))
        assert seqs(got) == []
        [err] = [r.node_status for r in got if r.HasField("node_status")]
        assert err.state_change == relay_pb.NODE_ERROR and "asked by another relay" in err.message
    finally:
        server.stop(grace=0).wait(5)
        relay.close()


# ---- `webb hubble relay` and the real hubble CLI ----
WEBB_RELAY = [sys.executable, "-m", "mesh.cli", "hubble", "relay"]


@pytest.mark.parametrize(("args", "message"), [
    (["--peer", "localhost:4245"], "use ADDRESS:PORT"),
    (["--peer", "127.0.0.1:99999"], "use ADDRESS:PORT"),
    (["--peer", "[oops]:1"], "use ADDRESS:PORT"),
    (["--peer", "127.0.0.1:4245", "--listen", "127.0.0.1:4245"], "the relay's own --listen address"),
    ([], "Missing option '--peer'"),
], ids=["name", "port", "v6", "itself", "none"])
def test_a_bad_peer_is_refused_naming_the_flag(args: list[str], message: str) -> None:
    r = subprocess.run([*WEBB_RELAY, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    out = " ".join(r.stderr.replace("│", " ").split())  # rich's error box, wrapped to the terminal
    assert r.returncode == 2 and message in out and "--peer" in out, r.stderr


def test_the_hubble_cli_through_webb_hubble_relay(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes
    port = free_port()
    server = f"127.0.0.1:{port}"
    proc = subprocess.Popen([*WEBB_RELAY, "--peer", n1.address, "--peer", n2.address, "--listen", server, "--lifetime", "90"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while run_hubble("status", "--server", server, timeout_s=10).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
            time.sleep(0.2)
        r = run_hubble("observe", "--server", server, "--last", "5", "-o", "json")
        assert r.returncode == 0, r.stderr
        flows = [json.loads(line) for line in r.stdout.splitlines()]
        assert [f["node_name"] for f in flows] == ["node2", "node1", "node2", "node1", "node2"], flows  # T0+5 .. T0+9
        times = [f["flow"]["time"] for f in flows]
        assert times == sorted(times) and len(set(times)) == 5, times
        status = run_hubble("status", "--server", server)
        assert status.returncode == 0 and "10/100" in status.stdout and "Connected Nodes: 2/2" in status.stdout, status.stdout
        nodes = run_hubble("list", "nodes", "--server", server)
        assert [ln.split()[:2] for ln in nodes.stdout.splitlines()[1:]] == [["node1", "Connected"], ["node2", "Connected"]], \
            nodes.stdout + nodes.stderr
        n2.stop()
        r = run_hubble("observe", "--server", server, "--last", "5", "-o", "json")
        assert r.returncode == 0, r.stderr
        assert [json.loads(line)["node_name"] for line in r.stdout.splitlines()] == ["node1"] * 5
        assert "NODE_UNAVAILABLE" in r.stderr and n2.address in r.stderr, r.stderr
        compact = run_hubble("observe", "--server", server, "--last", "1")
        assert f"1 nodes are unavailable: {n2.address}" in compact.stderr, compact.stderr
        status = run_hubble("status", "--server", server)
        assert "Connected Nodes: 1/2" in status.stdout and f"Unavailable Nodes: 1\n  - {n2.address}" in status.stdout, status.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert f"Hubble Relay on {server} over {n1.address}, {n2.address}" in " ".join(err.split()), err
