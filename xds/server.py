"""ADS server (state of the world) over gRPC: the only module of Webb that imports grpc.

Per stream and type: a request whose nonce matches the last response is an ACK (Envoy now
runs that version) or, with ``error_detail``, a NACK. On NACK we keep the last good config
in Envoy, record Envoy's message, and do not resend the rejected version (go-control-plane
resends it forever); the next different snapshot is sent as usual.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from xds.cache import SnapshotCache
from xds.resources import TYPE_ORDER

log = logging.getLogger("webb.xds")
_STOP = object()


class _Stream:
    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self.node_id = ""
        self.out: queue.Queue[Any] = queue.Queue()
        self.subscribed: set[str] = set()
        self.names: dict[str, frozenset[str]] = {}  # type -> names Envoy asked for (empty: all)
        self.last_nonce: dict[str, str] = {}
        self.last_sent: dict[str, str] = {}
        self.nonce = 0
        self.lock = threading.Lock()

    def _send(self, type_url: str, force: bool = False) -> None:
        snap = self.cache.snapshot(self.node_id)
        if snap is None or type_url not in snap.versions:
            return
        version = snap.versions[type_url]
        st = self.cache.status(self.node_id).get(type_url)
        if not force and (version == self.last_sent.get(type_url) or (st is not None and st.nacked == version)):
            return
        self.nonce += 1
        nonce = str(self.nonce)
        wanted = self.names.get(type_url) or frozenset(snap.resources[type_url])
        resources = [any_pb2.Any(type_url=type_url, value=snap.serialized[type_url][name])
                     for name in sorted(wanted) if name in snap.serialized[type_url]]
        self.last_nonce[type_url] = nonce
        self.last_sent[type_url] = version
        self.cache.record(self.node_id, type_url, sent=version)
        self.out.put(discovery_pb2.DiscoveryResponse(
            version_info=version, resources=resources, type_url=type_url, nonce=nonce))

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> None:
        with self.lock:
            if not self.node_id:
                self.node_id = req.node.id
            t = req.type_url
            if req.response_nonce and req.response_nonce != self.last_nonce.get(t):
                return  # stale: answers a response that was superseded
            names = frozenset(req.resource_names)
            names_changed = t in self.names and names != self.names[t]
            self.names[t] = names
            if req.response_nonce:
                if req.HasField("error_detail"):
                    rejected = self.last_sent.get(t, "")
                    log.warning("Envoy %s rejected %s version %s: %s", self.node_id, t, rejected,
                                req.error_detail.message)
                    self.cache.record(self.node_id, t, nacked=rejected, error=req.error_detail.message)
                    return
                self.cache.record(self.node_id, t, acked=req.version_info)
                if names_changed:  # e.g. a new cluster now wants its endpoints
                    self._send(t, force=True)
                return
            self.subscribed.add(t)
            self.last_sent.pop(t, None)  # a fresh subscription gets the current version
            self._send(t)

    def on_snapshot(self, node_id: str) -> None:
        if node_id != self.node_id:
            return
        with self.lock:
            for t in TYPE_ORDER:
                if t in self.subscribed:
                    self._send(t)


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache

    def StreamAggregatedResources(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:  # noqa: N802
        stream = _Stream(self.cache)
        cancel = self.cache.watch(stream.on_snapshot)

        def read() -> None:
            try:
                for req in request_iterator:
                    stream.on_request(req)
            except grpc.RpcError:
                pass
            finally:
                stream.out.put(_STOP)

        threading.Thread(target=read, name="xds-read", daemon=True).start()
        try:
            while True:
                item = stream.out.get()
                if item is _STOP:
                    return
                yield item
        finally:
            cancel()


class XdsServer:
    """A gRPC server on 127.0.0.1 serving ADS from ``cache``."""

    def __init__(self, cache: SnapshotCache, port: int = 0, address: str = "127.0.0.1") -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="xds"))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AdsServicer(cache), self._server)
        self.port = self._server.add_insecure_port(f"{address}:{port}")
        if self.port == 0:
            raise OSError(f"bind xDS server to {address}:{port}: address in use")
        self.address = address

    def start(self) -> None:
        self._server.start()

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s).wait(grace_s + 1)
