"""`webb hubble relay`: one Observer API over every node's, as Cilium's Hubble Relay gives. Each node
runs `webb hubble serve` (its "peer" address); the relay asks every peer over gRPC and answers as one:

GetFlows       the request goes to every peer as it came (the peers evaluate the filters). Without
               follow: each peer's answer (within a per-peer deadline), merged by flow time, then
               `number` taken across the merge (the last N; the first N with first or since). With
               follow: a thread per peer feeds a bounded queue; flows go out as they arrive, until
               the client leaves (the peer streams are cancelled then). A peer that is down, goes
               away or fails is said in a node_status event (NODE_UNAVAILABLE; NODE_ERROR with its
               message), as Hubble Relay says it; the others still answer. A follower retries a
               peer that went away, from the last flow it had of it, and says NODE_CONNECTED when
               it is back.
ServerStatus   the peers' sums; connected and unavailable nodes (a peer that does not answer by its
               address).
GetNodes       every node the peers report (their address: the peer's); a peer that does not answer
               is one NODE_UNAVAILABLE node named by its address.
GetNamespaces  the union.

Peers: fixed (--peer, each node's address), or found by DNS (--peers-dns NAME:PORT, PeerWatch: every A
and AAAA record of NAME, e.g. a headless Service over the agent pods, resolved again every few seconds):
a node that appears is asked from then on (by a follower too), one that is gone is no longer asked
(a follower is told NODE_UNAVAILABLE with why).

No TLS, no authentication, on either side (as `webb hubble serve`): keep the relay and its peers on
loopback or a trusted network. Calls from another relay are refused (a relay of relays would be a loop
waiting to happen; Hubble Relay does not chain either).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from mesh.cli.common import version
from mesh.hubble.api import load
from mesh.hubble.server import health_handler, parse_request

log = logging.getLogger(__name__)
observer_pb = load("observer.observer_pb2")
observer_grpc = load("observer.observer_pb2_grpc")
relay_pb = load("relay.relay_pb2")

PEER_TIMEOUT_S = 10.0  # one peer's answer to a call (all of GetFlows without follow)
QUEUE_SIZE = 1024  # a follower's flows between the peers and its client (then the peers wait)
RETRY_S = 1.0  # a follower's pause before it asks a peer that went away again
WAKE_S = 0.5  # how often a follower checks that its client is still there
MAX_PEER_FLOWS = 1 << 20  # one peer's flows in one answer without follow (`webb hubble serve --max-flows`' bound)
MAX_UNAVAILABLE_LISTED = 10  # ServerStatus.unavailable_nodes, as Hubble Relay bounds it
HOP = "x-webb-relay"  # metadata on the relay's calls to its peers: a relay refuses calls that carry it
CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # peers are asked directly, never through the caller's http_proxy
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),  # a peer back up is seen within seconds, not gRPC's 2 minutes
]
DNS_INTERVAL_S = 5.0  # --peers-dns: how often the name is resolved again
MAX_DNS_PEERS = 1024  # --peers-dns: addresses taken from one answer (a cluster's nodes; the rest left out)
_DONE = object()  # a follower's peer stream that ended for good (until reached, or an error it cannot retry)


@dataclass
class Peer:
    """One node's Observer API (its `webb hubble serve`)."""

    address: str
    channel: grpc.Channel
    stub: Any


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class Relay(observer_grpc.ObserverServicer):  # type: ignore[misc,name-defined]
    """``peers`` fixed; with ``dynamic`` (peers found by DNS) the set may start empty and change by
    set_peers() while calls run: each call asks the peers of its start (a follower, later ones too)."""

    def __init__(self, peers: list[str], peer_timeout_s: float = PEER_TIMEOUT_S, queue_size: int = QUEUE_SIZE,
                 retry_s: float = RETRY_S, wake_s: float = WAKE_S, dynamic: bool = False) -> None:
        if not peers and not dynamic:
            raise ValueError("a relay needs at least one peer")
        self.dynamic = dynamic
        self._lock = threading.Lock()
        self._peers: dict[str, Peer] = {}
        self.peer_timeout_s, self.queue_size, self.retry_s, self.wake_s = peer_timeout_s, queue_size, retry_s, wake_s
        self.name = socket.gethostname()  # the relay's node, in its own events (Hubble Relay's node name)
        self.hop = ((HOP, self.name),)
        self.set_peers(peers)

    @property
    def peers(self) -> list[Peer]:
        """The peers now (a copy: the set may change while a call uses it)."""
        with self._lock:
            return list(self._peers.values())

    def has(self, peer: Peer) -> bool:
        with self._lock:
            return self._peers.get(peer.address) is peer

    def set_peers(self, addresses: list[str]) -> tuple[list[str], list[str]]:
        """The peer set becomes ``addresses`` (host:port each): (added, removed). A removed peer's channel
        is closed: calls on it end (CANCELLED), and the relay no longer asks it."""
        wanted = list(dict.fromkeys(addresses))
        with self._lock:
            removed = [self._peers.pop(a) for a in list(self._peers) if a not in wanted]
            added = [a for a in wanted if a not in self._peers]
            for address in added:
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._peers[address] = Peer(address, channel, observer_grpc.ObserverStub(channel))
        for p in removed:
            p.channel.close()
        return added, [p.address for p in removed]

    def close(self) -> None:
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for p in peers:
            p.channel.close()

    # ---- helpers ----
    def _timeout(self, context: grpc.ServicerContext, cap: float | None) -> float | None:
        """The peers' deadline: ``cap``, and never past the client's own."""
        left = context.time_remaining()
        if left is None:
            return cap
        return max(0.0, left) if cap is None else max(0.0, min(cap, left))

    def _refuse_relays(self, context: grpc.ServicerContext) -> None:
        if any(k == HOP for k, _ in context.invocation_metadata() or ()):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this is a Webb relay, asked by another relay: give a relay the nodes' `webb hubble serve` as peers")

    def _status(self, state: int, names: list[str], message: str = "") -> Any:
        return observer_pb.GetFlowsResponse(
            node_status=relay_pb.NodeStatusEvent(state_change=state, node_names=names, message=message),
            node_name=self.name, time=_now())

    @staticmethod
    def _failure(e: grpc.RpcError) -> tuple[int, str]:
        """A peer's error as Hubble Relay says it: not reachable -> NODE_UNAVAILABLE; else NODE_ERROR and why."""
        code = e.code() if hasattr(e, "code") else None
        if code == grpc.StatusCode.UNAVAILABLE:
            return relay_pb.NODE_UNAVAILABLE, ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return relay_pb.NODE_UNAVAILABLE, "DEADLINE_EXCEEDED: no full answer within the peer timeout"
        details = e.details() if hasattr(e, "details") else str(e)
        return relay_pb.NODE_ERROR, f"{code.name if code else 'error'}: {details}"

    # ---- GetFlows ----
    def GetFlows(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802 - gRPC's name
        self._refuse_relays(context)
        parse_request(request, context)  # refused here as a node would refuse it, not once per peer
        if request.follow:
            yield from self._follow(request, context)
        else:
            yield from self._collect(request, context)

    def _collect(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        timeout = self._timeout(context, self.peer_timeout_s)
        calls = [(p, p.stub.GetFlows(request, timeout=timeout, metadata=self.hop)) for p in self.peers]
        context.add_callback(lambda: [c.cancel() for _, c in calls])  # the client left: so do the peers
        flows: list[Any] = []
        events: list[Any] = []
        connected: list[str] = []
        unavailable: list[str] = []
        errors: dict[str, list[str]] = {}
        for p, call in calls:
            n = 0
            try:
                for r in call:
                    if not r.HasField("flow"):
                        events.append(r)  # lost events, or a peer's own node status
                        continue
                    flows.append(r)
                    n += 1
                    if n >= MAX_PEER_FLOWS:
                        call.cancel()
                        errors.setdefault(f"more than {MAX_PEER_FLOWS} flows: the rest left out", []).append(p.address)
                        break
                connected.append(p.address)
            except grpc.RpcError as e:
                if not context.is_active():
                    return
                state, message = self._failure(e)
                log.warning("peer %s: GetFlows failed: %s", p.address, message or "unavailable")
                if state == relay_pb.NODE_UNAVAILABLE and n == 0:
                    unavailable.append(p.address)
                else:
                    errors.setdefault(f"{message or 'UNAVAILABLE'} after {n} flows (the rest left out)", []).append(p.address)
        flows.sort(key=lambda r: r.flow.time.ToNanoseconds())  # stable: a peer's own order within a tie
        if request.number:
            flows = flows[:request.number] if request.first or request.HasField("since") else flows[-request.number:]
        if connected:
            yield self._status(relay_pb.NODE_CONNECTED, connected)
        if unavailable:
            yield self._status(relay_pb.NODE_UNAVAILABLE, unavailable)
        for message, names in errors.items():
            yield self._status(relay_pb.NODE_ERROR, names, message)
        yield from events
        yield from flows

    def _follow(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        out: queue.Queue[Any] = queue.Queue(maxsize=self.queue_size)
        stop = threading.Event()
        calls: dict[str, Any] = {}
        lock = threading.Lock()
        context.add_callback(stop.set)
        threads: list[threading.Thread] = []
        started: dict[int, Peer] = {}  # the Peers pumped, by id() (held: an id is not reused; back after removal: a new Peer)

        def start_new() -> None:
            for p in self.peers:
                if id(p) not in started:
                    started[id(p)] = p
                    t = threading.Thread(target=self._pump, args=(p, request, context, out, stop, calls, lock),
                                         name=f"relay-peer-{p.address}", daemon=True)
                    threads.append(t)
                    t.start()
        start_new()
        done = 0
        try:
            while context.is_active() and not stop.is_set():
                if self.dynamic:
                    start_new()  # peers found since (DNS)
                try:
                    r = out.get(timeout=self.wake_s)
                except queue.Empty:
                    continue
                if r is _DONE:
                    done += 1
                    if done == len(threads) and (not self.dynamic or request.HasField("until")):
                        return
                    continue
                yield r
        finally:
            stop.set()
            with lock:
                for c in calls.values():
                    c.cancel()
            for t in threads:
                t.join(timeout=self.retry_s + 2 * self.wake_s + 1)

    def _pump(self, peer: Peer, request: Any, context: grpc.ServicerContext, out: queue.Queue[Any],
              stop: threading.Event, calls: dict[str, Any], lock: threading.Lock) -> None:
        """One peer's stream into ``out``; when the peer goes away, its NODE_UNAVAILABLE, then again
        from after the last flow it sent once it can be reached (NODE_CONNECTED)."""

        def put(r: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(r, timeout=self.wake_s)
                    return True
                except queue.Full:
                    continue
            return False

        req, down, last_ns = request, False, 0
        while not stop.is_set():
            if not self.has(peer):  # gone from the peer set (DNS): no longer asked
                put(self._status(relay_pb.NODE_UNAVAILABLE, [peer.address], "no longer a peer (gone from --peers-dns)"))
                put(_DONE)
                return
            if down:
                ready = grpc.channel_ready_future(peer.channel)
                try:
                    ready.result(timeout=self.retry_s)
                except grpc.FutureTimeoutError:
                    ready.cancel()
                    continue
                down = False
                put(self._status(relay_pb.NODE_CONNECTED, [peer.address]))
            with lock:
                if stop.is_set():
                    return
                try:
                    call = calls[peer.address] = peer.stub.GetFlows(req, timeout=self._timeout(context, None),
                                                                    metadata=self.hop)
                except ValueError:  # its channel was closed: removed from the peer set meanwhile
                    continue
            try:
                for r in call:
                    if r.HasField("flow") and r.flow.time.ToNanoseconds():
                        last_ns = max(last_ns, r.flow.time.ToNanoseconds())
                    if not put(r):
                        return
                if request.HasField("until"):
                    put(_DONE)  # past until: this peer has said all
                    return
                state, message = relay_pb.NODE_UNAVAILABLE, ""  # a follow stream ended by the peer: it stopped
            except grpc.RpcError as e:
                if stop.is_set():
                    return
                if not self.has(peer):
                    continue  # said at the top of the loop
                state, message = self._failure(e)
            log.warning("peer %s: follow stream lost: %s", peer.address, message or "unavailable")
            put(self._status(state, [peer.address], message))
            if state != relay_pb.NODE_UNAVAILABLE:
                put(_DONE)  # the peer refused the request: asking again would not help
                return
            down = True
            req = observer_pb.GetFlowsRequest()
            req.CopyFrom(request)
            req.number = 0  # again from where it was left, not its last N again
            if last_ns:
                req.since.FromNanoseconds(last_ns + 1)
            elif not request.HasField("since"):
                req.since.CopyFrom(_now())
            stop.wait(self.retry_s)

    # ---- the rest ----
    def _ask(self, method: str, request: Any, context: grpc.ServicerContext) -> list[tuple[Peer, Any]]:
        """Each peer's answer to a unary call, or None where it did not answer in time."""
        timeout = self._timeout(context, self.peer_timeout_s)
        pending = [(p, getattr(p.stub, method).future(request, timeout=timeout, metadata=self.hop)) for p in self.peers]
        answers: list[tuple[Peer, Any]] = []
        for p, f in pending:
            try:
                answers.append((p, f.result()))
            except (grpc.RpcError, grpc.FutureCancelledError) as e:
                log.warning("peer %s: %s failed: %s", p.address, method, e)
                answers.append((p, None))
        return answers

    def ServerStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._refuse_relays(context)
        resp = observer_pb.ServerStatusResponse(version=f"webb {version()} (relay)")
        connected, unavailable, names = 0, 0, []
        for p, st in self._ask("ServerStatus", observer_pb.ServerStatusRequest(), context):
            if st is None:
                unavailable += 1
                names.append(p.address)
                continue
            resp.num_flows += st.num_flows
            resp.max_flows += st.max_flows
            resp.seen_flows += st.seen_flows
            resp.flows_rate += st.flows_rate
            resp.uptime_ns = max(resp.uptime_ns, st.uptime_ns)  # the longest-running, as Hubble Relay says it
            if st.HasField("num_connected_nodes"):  # a peer over several nodes (webb hubble serve of a wire root)
                connected += st.num_connected_nodes.value
                unavailable += st.num_unavailable_nodes.value
                names += st.unavailable_nodes
            else:
                connected += 1
        resp.num_connected_nodes.value = connected
        resp.num_unavailable_nodes.value = unavailable
        resp.unavailable_nodes.extend(names[:MAX_UNAVAILABLE_LISTED])
        return resp

    def GetNodes(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._refuse_relays(context)
        resp = observer_pb.GetNodesResponse()
        for p, answer in self._ask("GetNodes", observer_pb.GetNodesRequest(), context):
            if answer is None:
                resp.nodes.add(name=p.address, address=p.address, state=relay_pb.NODE_UNAVAILABLE)
                continue
            for n in answer.nodes:
                node = resp.nodes.add()
                node.CopyFrom(n)
                node.address = p.address  # where the relay reaches it (the node's own is its state dir)
        return resp

    def GetNamespaces(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._refuse_relays(context)
        seen: set[tuple[str, str]] = set()
        for _, answer in self._ask("GetNamespaces", observer_pb.GetNamespacesRequest(), context):
            if answer is not None:
                seen.update((ns.cluster, ns.namespace) for ns in answer.namespaces)
        return observer_pb.GetNamespacesResponse(
            namespaces=[observer_pb.Namespace(cluster=c, namespace=ns) for c, ns in sorted(seen)])


def serve_relay(peers: list[str], listen: str, max_workers: int = 16, peer_timeout_s: float = PEER_TIMEOUT_S,
                queue_size: int = QUEUE_SIZE, dynamic: bool = False) -> tuple[grpc.Server, Relay]:
    """A started relay on ``listen`` over ``peers`` (host:port each), and the relay (close() it after
    the server's stop). As mesh.hubble.server.serve: OSError when it cannot bind; past ``max_workers``
    calls at once (a follower holds one, and a thread per peer), a call is refused at once."""
    relay = Relay(peers, peer_timeout_s=peer_timeout_s, queue_size=queue_size, dynamic=dynamic)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hubble-relay"),
                         options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=max_workers)
    observer_grpc.add_ObserverServicer_to_server(relay, server)
    server.add_generic_rpc_handlers((health_handler(),))
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        relay.close()
        raise OSError(f"cannot listen on {listen}: {e}") from None
    if port == 0:
        relay.close()
        raise OSError(f"cannot listen on {listen} (in use, or not an address of this host)")
    server.start()
    log.info("Hubble Relay API on %s over %s", listen, ", ".join(p.address for p in relay.peers) or "no peer yet")
    return server, relay


def resolve_dns(name: str, port: int) -> list[str]:
    """Every address of ``name`` (A and AAAA), as "host:port" ("[v6]:port"), in the resolver's order.
    A name that does not exist (NXDOMAIN, no records: a headless Service without endpoints) -> [];
    a failure to ask (EAI_AGAIN ...) raises OSError."""
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        raise
    out = []
    for family, _, _, _, addr in infos:
        host = str(addr[0]).split("%", 1)[0]  # a link-local's zone: not a peer's
        out.append(f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}")
    return list(dict.fromkeys(out))[:MAX_DNS_PEERS]


class PeerWatch:
    """``relay``'s peers: ``name``'s addresses at ``port``, resolved now and again every ``interval_s``
    (a thread; stop() ends it). A failure to resolve keeps the peers as they were (a DNS server
    restarting is not every node leaving); a name that does not exist is no peer at all.
    ``resolve``: (name, port) -> ["host:port", ...] (resolve_dns; a test gives its own)."""

    def __init__(self, relay: Relay, name: str, port: int, interval_s: float = DNS_INTERVAL_S,
                 resolve: Callable[[str, int], list[str]] = resolve_dns) -> None:
        self.relay, self.name, self.port, self.interval_s, self.resolve = relay, name, port, interval_s, resolve
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-peers-dns", daemon=True)

    def refresh(self) -> bool:
        """Resolve once and set the relay's peers; False when the name could not be resolved."""
        try:
            found = self.resolve(self.name, self.port)[:MAX_DNS_PEERS]
        except OSError as e:
            log.warning("peers: cannot resolve %s: %s (peers kept: %d)", self.name, e, len(self.relay.peers))
            return False
        added, removed = self.relay.set_peers(found)
        if added or removed:
            log.info("peers of %s: +%s -%s (now %d)", self.name, added, removed, len(found))
        return True

    def start(self) -> PeerWatch:
        self.refresh()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + PEER_TIMEOUT_S)
