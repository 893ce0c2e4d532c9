"""Hubble's Observer gRPC API over Webb's flows (mesh.hubble.store), for the real `hubble` CLI:
GetFlows (number/first/follow, since/until, whitelist/blacklist, field mask), ServerStatus, GetNodes,
GetNamespaces; and the standard grpc.health.v1 Health service, which `hubble status` asks first.
GetAgentEvents and GetDebugEvents answer UNIMPLEMENTED (Webb has no such events), as does an unknown
method.

With mesh.hubble.relay, the only modules besides xds.server that import grpc (pyproject's
import-linter contract). Listen on loopback by default: flows name pods, policies and request
paths, and the API has no authentication (as Hubble's own port, 4245, has none without TLS).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from mesh.cli.common import version
from mesh.hubble.api import load
from mesh.hubble.convert import flow_pb
from mesh.hubble.filters import FilterError, build_all
from mesh.hubble.store import Store

log = logging.getLogger(__name__)
observer_pb = load("observer.observer_pb2")
observer_grpc = load("observer.observer_pb2_grpc")
relay_pb = load("relay.relay_pb2")
FOLLOW_WAKE_S = 0.5  # how often a follower checks that its client is still there


def _health_messages() -> tuple[Any, Any]:
    """grpc.health.v1's two messages, built from their descriptor in a pool of our own (the
    grpcio-health-checking package is not needed for two one-field messages; its wire format is this)."""
    fd = descriptor_pb2.FileDescriptorProto(name="webb/grpc/health/v1/health.proto", package="grpc.health.v1", syntax="proto3")
    req = fd.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    resp = fd.message_type.add(name="HealthCheckResponse")
    status = resp.enum_type.add(name="ServingStatus")
    for i, n in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=n, number=i)
    resp.field.add(name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
                   type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
                   label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")))


HealthCheckRequest, HealthCheckResponse = _health_messages()
SERVING, SERVICE_UNKNOWN = 1, 3
HEALTHY_SERVICES = ("", "hubble.server.Observer", "observer.Observer")  # the server, the name `hubble status` asks, the service


def health_handler() -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health/Check, SERVING for the Observer (this server's, and mesh.hubble.relay's)."""

    def check(req: Any, _ctx: grpc.ServicerContext) -> Any:
        return HealthCheckResponse(status=SERVING if req.service in HEALTHY_SERVICES else SERVICE_UNKNOWN)

    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(check, request_deserializer=HealthCheckRequest.FromString,
                                                     response_serializer=HealthCheckResponse.SerializeToString)})


def _ns(ts: Any, what: str, context: grpc.ServicerContext) -> int | None:
    if ts is None:
        return None
    if not (0 <= ts.seconds <= 253402300799 and 0 <= ts.nanos < 10**9):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: not a valid timestamp")
    return int(ts.ToNanoseconds())


def parse_request(request: Any, context: grpc.ServicerContext) -> tuple[Callable[[Any], bool], Any, int | None, int | None]:
    """A GetFlowsRequest's filter, field mask (None: the whole flow), since and until (ns); what Webb
    cannot answer aborts the call with INVALID_ARGUMENT (the relay checks it so too, before its peers)."""
    try:
        match = build_all(request.whitelist, request.blacklist)
    except FilterError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid filter: {e}")
    if request.first and request.follow:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first cannot be combined with follow")
    mask = None
    if request.HasField("field_mask") and request.field_mask.paths:
        if not request.field_mask.IsValidForDescriptor(flow_pb.Flow.DESCRIPTOR):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"field_mask: not fields of flow.Flow: {', '.join(request.field_mask.paths)}")
        mask = request.field_mask
    since = _ns(request.since if request.HasField("since") else None, "since", context)
    until = _ns(request.until if request.HasField("until") else None, "until", context)
    return match, mask, since, until


class Observer(observer_grpc.ObserverServicer):  # type: ignore[misc,name-defined]
    def __init__(self, store: Store, follow_wake_s: float = FOLLOW_WAKE_S) -> None:
        self.store = store
        self.follow_wake_s = follow_wake_s

    def _response(self, node: str, fl: Any, mask: Any) -> Any:
        if mask is not None:
            masked = flow_pb.Flow()
            mask.MergeMessage(fl, masked)
            fl = masked
        return observer_pb.GetFlowsResponse(flow=fl, node_name=node, time=fl.time)

    def GetFlows(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802 - gRPC's name
        match, mask, since, until = parse_request(request, context)

        def wanted(fl: Any) -> bool:
            t = fl.time.ToNanoseconds()
            return (since is None or t >= since) and (until is None or t <= until) and match(fl)

        ring, last_seq = self.store.snapshot_at()
        start_now = request.follow and request.number == 0 and since is None
        history = [] if start_now else [(n, fl) for _, n, fl in ring if wanted(fl)]
        if request.number and history:
            history = history[:request.number] if request.first or since is not None else history[-request.number:]
        for node, fl in history:
            yield self._response(node, fl, mask)
        if not request.follow:
            return
        while context.is_active() and not self.store.stopped:
            newer, lost = self.store.after(last_seq, self.follow_wake_s, context.is_active)
            if lost:
                yield observer_pb.GetFlowsResponse(
                    lost_events=flow_pb.LostEvent(source=flow_pb.HUBBLE_RING_BUFFER, num_events_lost=lost),
                    node_name=self.store.nodes[0].name if len(self.store.nodes) == 1 else "")
            for seq, node, fl in newer:
                last_seq = seq
                if until is not None and fl.time.ToNanoseconds() > until:
                    return
                if wanted(fl):
                    yield self._response(node, fl, mask)

    def ServerStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        num, seen = self.store.counts()
        resp = observer_pb.ServerStatusResponse(num_flows=num, max_flows=self.store.max_flows, seen_flows=seen,
                                                uptime_ns=self.store.uptime_ns(), version=f"webb {version()}",
                                                flows_rate=self._rate())
        if len(self.store.nodes) > 1:  # one view over several nodes: say which are there, as Relay does
            down = [n.name for n in self.store.nodes if not n.available()]
            resp.num_connected_nodes.value = len(self.store.nodes) - len(down)
            resp.num_unavailable_nodes.value = len(down)
            resp.unavailable_nodes.extend(down)
        return resp

    def _rate(self) -> float:
        """Flows a second over the last minute (what `hubble status` prints as Flows/s)."""
        ring = self.store.snapshot()
        now = time.time()
        recent = sum(1 for _, _, fl in ring if fl.time.seconds >= now - 60)
        return recent / 60.0

    def GetNodes(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Each node: CONNECTED while its agent runs (status.json, its pid), else UNAVAILABLE (its flows are
        still served from its files); the address is its state dir, where the flows come from."""
        resp = observer_pb.GetNodesResponse()
        ring = self.store.snapshot()
        for n in self.store.nodes:
            resp.nodes.add(name=n.name, version=f"webb {version()}", address=str(n.state_dir),
                           state=relay_pb.NODE_CONNECTED if n.available() else relay_pb.NODE_UNAVAILABLE,
                           uptime_ns=self.store.uptime_ns(), num_flows=sum(1 for _, name, _ in ring if name == n.name),
                           max_flows=self.store.max_flows, seen_flows=n.seen)
        return resp

    def GetNamespaces(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        seen: set[str] = set()
        for _, _, fl in self.store.snapshot():
            seen.update(ns for ns in (fl.source.namespace, fl.destination.namespace) if ns)
        return observer_pb.GetNamespacesResponse(namespaces=[observer_pb.Namespace(namespace=ns) for ns in sorted(seen)])


def serve(store: Store, listen: str, max_workers: int = 16) -> grpc.Server:
    """A started server on ``listen`` (host:port); raises OSError when it cannot bind (or the port is
    taken: no SO_REUSEPORT, so a second server cannot share it silently). Each RPC holds a thread (a
    follower for as long as it follows): past ``max_workers`` at once a call is refused at once
    (RESOURCE_EXHAUSTED) rather than left waiting."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hubble"),
                         options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=max_workers)
    observer_grpc.add_ObserverServicer_to_server(Observer(store), server)
    server.add_generic_rpc_handlers((health_handler(),))
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {listen}: {e}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen} (in use, or not an address of this host)")
    server.start()
    log.info("Hubble Observer API on %s", listen)
    return server
