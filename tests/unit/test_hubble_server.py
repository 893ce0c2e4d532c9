"""`webb hubble serve`'s server (mesh.hubble.server, mesh.hubble.store) on 127.0.0.1, over flow files this
test writes as the agent does (mesh.agent.flows.FlowLog): asked by a gRPC client made from the same
generated stubs, and by the real `hubble` CLI built from github.com/cilium/cilium (make hubble-cli).
No root needed; the Star Wars run with a real agent is tests/e2e/test_hubble.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.agent.flows import FlowLog
from mesh.hubble.api import load
from mesh.hubble.server import HealthCheckRequest, HealthCheckResponse, serve
from mesh.hubble.store import Store
from tests.conftest import ROOT
from tests.hubble_cli import run_hubble

flow_pb = load("flow.flow_pb2")
observer_pb = load("observer.observer_pb2")
observer_grpc = load("observer.observer_pb2_grpc")
T0 = 1796312850.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def record(i: int, verdict: str = "forwarded", src: str = "default/tiefighter", **kw: Any) -> dict[str, Any]:
    return {"time": T0 + i, "layer": "L4", "protocol": "TCP", "src": src, "dst": "10.96.63.4:80",
            "service": "default/deathstar", "dst_pod": "default/deathstar-1", "verdict": verdict,
            "reason": "policy-denied" if verdict == "denied" else "service", "seq": i, **kw}


class Served:
    def __init__(self, state: Path, store: Store, server: grpc.Server, port: int) -> None:
        self.state, self.store, self.server, self.port = state, store, server, port
        self.log = FlowLog(state / "flows.jsonl")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.observer = observer_grpc.ObserverStub(self.channel)

    def flows(self, timeout_s: float = 10, **req: Any) -> list[Any]:
        return [r for r in self.observer.GetFlows(observer_pb.GetFlowsRequest(**req), timeout=timeout_s)]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    state = tmp_path / "state"
    state.mkdir()
    FlowLog(state / "flows.jsonl").write([record(i, "denied" if i % 3 == 0 else "forwarded") for i in range(10)])
    (state / "status.json").write_text(json.dumps({"node": "node1", "running": True, "pid": os.getpid(), "updated": time.time()}))
    store = Store([state], max_flows=50, poll_s=0.05)
    store.start()
    port = free_port()
    server = serve(store, f"127.0.0.1:{port}")
    s = Served(state, store, server, port)
    yield s
    s.channel.close()
    server.stop(grace=0).wait(5)
    store.stop()


def seqs(responses: list[Any]) -> list[int]:
    return [int(r.flow.time.seconds - T0) for r in responses if r.HasField("flow")]


def test_last_first_all_and_filters(served: Served) -> None:
    assert seqs(served.flows(number=3)) == [7, 8, 9]  # hubble observe --last 3
    assert seqs(served.flows(number=2, first=True)) == [0, 1]  # --first 2
    assert seqs(served.flows()) == list(range(10))  # --all
    dropped = served.flows(number=20, whitelist=[flow_pb.FlowFilter(verdict=[flow_pb.DROPPED])])
    assert seqs(dropped) == [0, 3, 6, 9]
    r = dropped[0]
    assert r.node_name == "node1" and r.flow.node_name == "node1" and r.time == r.flow.time
    assert r.flow.drop_reason_desc == flow_pb.POLICY_DENIED and r.flow.source.pod_name == "tiefighter"
    not_dropped = served.flows(blacklist=[flow_pb.FlowFilter(verdict=[flow_pb.DROPPED])])
    assert seqs(not_dropped) == [1, 2, 4, 5, 7, 8]


def test_since_until_and_the_field_mask(served: Served) -> None:
    since = flow_pb.Flow().time.__class__(seconds=int(T0) + 4)
    until = flow_pb.Flow().time.__class__(seconds=int(T0) + 6)
    assert seqs(served.flows(since=since, until=until)) == [4, 5, 6]
    assert seqs(served.flows(since=since, number=2)) == [4, 5]  # since takes precedence: the first 2 after it
    masked = served.flows(number=1, field_mask={"paths": ["time", "verdict", "source.pod_name"]})
    f = masked[0].flow
    assert f.verdict == flow_pb.DROPPED and f.source.pod_name == "tiefighter" and f.time.seconds
    assert not f.source.namespace and not f.HasField("destination") and not f.Summary


@pytest.mark.parametrize(("req", "message"), [
    ({"whitelist": [flow_pb.FlowFilter(source_label=["app=x"])]}, "source_label: not supported"),
    ({"blacklist": [flow_pb.FlowFilter(http_path=["("])]}, "http_path"),
    ({"first": True, "follow": True}, "first cannot be combined with follow"),
    ({"field_mask": {"paths": ["no_such_field"]}}, "not fields of flow.Flow"),
], ids=["unsupported", "bad-regex", "first-follow", "mask"])
def test_a_request_webb_cannot_answer_is_refused_as_invalid_argument(served: Served, req: dict[str, Any], message: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        served.flows(**req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in str(e.value.details())


def test_follow_streams_what_the_agent_appends_reading_only_the_new_bytes(served: Served) -> None:
    stream = served.observer.GetFlows(observer_pb.GetFlowsRequest(number=2, follow=True), timeout=20)
    got = [next(stream), next(stream)]
    assert seqs(got) == [8, 9]
    before = served.store.nodes[0].tail.bytes_read
    served.log.write([record(10, "denied", src="default/xwing")])
    got.append(next(stream))
    assert seqs(got) == [8, 9, 10] and got[-1].flow.source.pod_name == "xwing"
    added = served.store.nodes[0].tail.bytes_read - before
    assert 0 < added < 600, added  # the one new line, not the file again
    # rotated away by the agent (FlowLog at its size limit): the rest of the old file, then the new one
    os.replace(served.state / "flows.jsonl", served.state / "flows.jsonl.1")
    served.log.write([record(11), record(12)])
    got += [next(stream), next(stream)]
    assert seqs(got) == [8, 9, 10, 11, 12]
    stream.cancel()


def test_a_follower_that_fell_behind_the_ring_is_told_how_many_it_lost(served: Served) -> None:
    stream = served.observer.GetFlows(observer_pb.GetFlowsRequest(follow=True), timeout=20)
    time.sleep(0.3)  # the server has taken its place at the ring's end
    # 120 flows in one go into a ring of 50 (as a burst from the agent would come): more than it holds
    served.store._add([("node1", served.store._convert(served.store.nodes[0], [record(100 + i)])[0][1]) for i in range(120)])
    first = next(stream)
    if first.HasField("flow"):  # it read some before the ring wrapped: then the loss comes later
        while not (first := next(stream)).HasField("lost_events"):
            pass
    assert first.lost_events.source == flow_pb.HUBBLE_RING_BUFFER and 0 < first.lost_events.num_events_lost <= 120 - 50
    stream.cancel()


def test_server_status_nodes_namespaces_and_health(served: Served) -> None:
    st = served.observer.ServerStatus(observer_pb.ServerStatusRequest(), timeout=5)
    assert (st.num_flows, st.max_flows, st.seen_flows) == (10, 50, 10)
    assert st.uptime_ns > 0 and st.version.startswith("webb ") and not st.HasField("num_connected_nodes")
    [node] = served.observer.GetNodes(observer_pb.GetNodesRequest(), timeout=5).nodes
    assert node.name == "node1" and node.state == load("relay.relay_pb2").NODE_CONNECTED and node.num_flows == 10
    ns = served.observer.GetNamespaces(observer_pb.GetNamespacesRequest(), timeout=5)
    assert [n.namespace for n in ns.namespaces] == ["default"]
    check = served.channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=HealthCheckRequest.SerializeToString,
                                       response_deserializer=HealthCheckResponse.FromString)
    assert check(HealthCheckRequest(service="hubble.server.Observer"), timeout=5).status == 1  # SERVING, as `hubble status` asks
    assert check(HealthCheckRequest(service="nope"), timeout=5).status == 3  # SERVICE_UNKNOWN
    with pytest.raises(grpc.RpcError) as e:
        served.observer.GetAgentEvents(observer_pb.GetAgentEventsRequest(), timeout=5).next()
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_several_nodes_are_one_view_with_each_flow_named_by_its_node(tmp_path: Path) -> None:
    dirs = []
    for n, at in (("node1", 0), ("node2", 1)):
        d = tmp_path / n
        d.mkdir()
        FlowLog(d / "flows.jsonl").write([record(at + 2 * i, "denied") for i in range(3)])
        (d / "status.json").write_text(json.dumps({"node": n, "running": n == "node1", "pid": os.getpid(), "updated": time.time()}))
        dirs.append(d)
    store = Store(dirs, poll_s=0.05)
    store.start()
    port = free_port()
    server = serve(store, f"127.0.0.1:{port}")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            obs = observer_grpc.ObserverStub(ch)
            got = list(obs.GetFlows(observer_pb.GetFlowsRequest(), timeout=5))
            assert seqs(got) == [0, 1, 2, 3, 4, 5]  # merged by time
            assert [r.node_name for r in got] == ["node1", "node2"] * 3
            only2 = list(obs.GetFlows(observer_pb.GetFlowsRequest(whitelist=[flow_pb.FlowFilter(node_name=["node2"])]), timeout=5))
            assert seqs(only2) == [1, 3, 5]
            st = obs.ServerStatus(observer_pb.ServerStatusRequest(), timeout=5)
            assert (st.num_connected_nodes.value, st.num_unavailable_nodes.value, list(st.unavailable_nodes)) == (1, 1, ["node2"])
            assert [n.name for n in obs.GetNodes(observer_pb.GetNodesRequest(), timeout=5).nodes] == ["node1", "node2"]
    finally:
        server.stop(grace=0).wait(5)
        store.stop()


# ---- the real hubble CLI ----
def test_the_hubble_cli_reads_webbs_flows(served: Served) -> None:
    server = f"127.0.0.1:{served.port}"
    r = run_hubble("observe", "--server", server, "--verdict", "DROPPED", "-o", "json")
    assert r.returncode == 0, r.stderr
    flows = [json.loads(line)["flow"] for line in r.stdout.splitlines()]
    assert [f["source"]["pod_name"] for f in flows] == ["tiefighter"] * 4
    assert {f["drop_reason_desc"] for f in flows} == {"POLICY_DENIED"} and {f["verdict"] for f in flows} == {"DROPPED"}
    compact = run_hubble("observe", "--server", server, "--last", "2", "--verdict", "DROPPED")
    assert compact.returncode == 0, compact.stderr
    lines = compact.stdout.strip().splitlines()
    # Webb's flows carry no security identity: the CLI prints (unknown) for it
    assert len(lines) == 2 and all(ln.endswith(": default/tiefighter (unknown) -> default/deathstar-1:80 (unknown) "
                                               "Policy denied DROPPED (policy-denied; TCP)") for ln in lines), lines
    status = run_hubble("status", "--server", server)
    assert status.returncode == 0, status.stderr
    assert f"Healthcheck (via {server}): Ok" in status.stdout and "10/50" in status.stdout, status.stdout
    refused = run_hubble("observe", "--server", server, "--label", "app=x")
    assert refused.returncode != 0 and "not supported by Webb" in refused.stderr, refused.stderr


def test_past_its_workers_a_call_is_refused_at_once_not_left_waiting(tmp_path: Path) -> None:
    (tmp_path / "flows.jsonl").write_text(json.dumps(record(0)) + "\n")
    store = Store([tmp_path], poll_s=0.05)
    store.start()
    port = free_port()
    server = serve(store, f"127.0.0.1:{port}", max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            obs = observer_grpc.ObserverStub(ch)
            followers = [obs.GetFlows(observer_pb.GetFlowsRequest(number=1, follow=True), timeout=20) for _ in range(2)]
            assert [seqs([next(f)]) for f in followers] == [[0], [0]]
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                obs.ServerStatus(observer_pb.ServerStatusRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - started < 5
            for f in followers:
                f.cancel()
            deadline = time.monotonic() + 10  # the followers' threads notice within FOLLOW_WAKE_S
            while True:
                try:
                    assert obs.ServerStatus(observer_pb.ServerStatusRequest(), timeout=5).num_flows == 1
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
    finally:
        server.stop(grace=0).wait(5)
        store.stop()


def test_webb_hubble_serve_over_a_wire_root_serves_every_node_under_it(tmp_path: Path) -> None:
    """`webb hubble serve --state-dir <root>` (the directory `webb wire up` puts the nodes in), asked by
    the real CLI; stopped by SIGTERM; a bad address or directory refused before anything starts."""
    for n, at in (("n1", 0), ("n2", 1)):
        (tmp_path / n).mkdir()
        FlowLog(tmp_path / n / "flows.jsonl").write([record(at + 2 * i, "denied") for i in range(2)])
        (tmp_path / n / "status.json").write_text(json.dumps({"node": n, "running": True, "pid": os.getpid(),
                                                              "updated": time.time()}))
    (tmp_path / "manifests").mkdir()
    port = free_port()
    webb = [sys.executable, "-m", "mesh.cli", "hubble", "serve"]
    proc = subprocess.Popen([*webb, "--state-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}", "--lifetime", "60"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while run_hubble("status", "--server", f"127.0.0.1:{port}", timeout_s=10).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
            time.sleep(0.2)
        r = run_hubble("observe", "--server", f"127.0.0.1:{port}", "--all", "-o", "json")
        assert [json.loads(x)["node_name"] for x in r.stdout.splitlines()] == ["n1", "n2", "n1", "n2"], r.stdout + r.stderr
        nodes = run_hubble("list", "nodes", "--server", f"127.0.0.1:{port}")
        assert [ln.split()[:2] for ln in nodes.stdout.splitlines()[1:]] == [["n1", "Connected"], ["n2", "Connected"]], nodes.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert f"Hubble API on 127.0.0.1:{port}: 4 flows of n1" in " ".join(err.split()), err
    bad = subprocess.run([*webb, "--state-dir", str(tmp_path), "--listen", "localhost:4245"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "use ADDRESS:PORT" in bad.stderr
    missing = subprocess.run([*webb, "--state-dir", str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "not a directory" in " ".join(missing.stderr.split())
