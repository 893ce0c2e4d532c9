"""ADS server over gRPC, state of the world and incremental (delta): the only module of Webb
that imports grpc.

Both protocols share the NACK rule go-control-plane lacks: on NACK Envoy keeps its last good
config, we record Envoy's message (``SnapshotCache.status``) and do not send the rejected
version again; the next different snapshot is sent as usual.

State of the world, per type: a request whose nonce matches the last response is an ACK (Envoy
now runs that version) or, with ``error_detail``, a NACK; an older nonce is stale and ignored.

Delta, per type: the server tracks which version of each resource Envoy holds and sends only
what changed (``resources``) or went away (``removed_resources``). Every response is answered by
an ACK or NACK carrying its nonce. CDS and LDS are wildcard subscriptions; EDS, RDS and SDS
resources are sent by name as Envoy subscribes to them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import stat
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from xds.cache import Snapshot, SnapshotCache
from xds.resources import TYPE_ORDER, WILDCARD_TYPES

log = logging.getLogger("webb.xds")
_STOP = object()
OUT_QUEUE = 64  # responses queued per stream; Envoy reads each at once, so a full queue means a stuck stream


class _Stream:
    """What both protocols share: the node, the outgoing queue, nonces, NACK recording."""

    def __init__(self, cache: SnapshotCache, counts: Counter[str]) -> None:
        self.cache = cache
        self.counts = counts  # server-wide: responses and resources sent, by protocol
        self.node_id = ""
        self.out: queue.Queue[Any] = queue.Queue(maxsize=OUT_QUEUE)
        self.overflowed = False
        self.nonce = 0
        self.lock = threading.Lock()

    def _emit(self, response: Any, kind: str, n_resources: int) -> None:
        if self.overflowed:  # the stream is closing: Envoy gets the current config when it reconnects
            return
        self.counts[f"{kind}_responses"] += 1
        self.counts[f"{kind}_resources"] += n_resources
        try:
            self.out.put_nowait(response)
        except queue.Full:
            self._overflow()

    def _overflow(self) -> None:
        """Envoy does not read what it is sent: end the stream (bounded memory); Envoy reconnects and
        gets the current config on its new stream."""
        if not self.overflowed:
            log.warning("Envoy %s does not read its xDS stream (%d responses queued): closing it", self.node_id, OUT_QUEUE)
        self.overflowed = True
        self.close()

    def close(self) -> None:
        """End the stream: what is queued is dropped, the sender stops."""
        while True:
            with contextlib.suppress(queue.Empty):
                while True:
                    self.out.get_nowait()
            try:
                self.out.put_nowait(_STOP)
                return
            except queue.Full:
                continue

    def _next_nonce(self) -> str:
        self.nonce += 1
        return str(self.nonce)

    def _nack(self, type_url: str, version: str, message: str) -> None:
        log.warning("Envoy %s rejected %s version %s: %s", self.node_id, type_url, version, message)
        self.cache.record(self.node_id, type_url, nacked=version, error=message)

    def on_snapshot(self, node_id: str) -> None:
        if node_id != self.node_id:
            return
        with self.lock:
            snap = self.cache.snapshot(self.node_id)
            if snap is not None:
                for t in TYPE_ORDER:  # make-before-break: clusters, endpoints, secrets, listeners, routes
                    self._push(snap, t)

    def _push(self, snap: Snapshot, type_url: str) -> None:
        raise NotImplementedError


class _SotwStream(_Stream):
    def __init__(self, cache: SnapshotCache, counts: Counter[str]) -> None:
        super().__init__(cache, counts)
        self.subscribed: set[str] = set()
        self.names: dict[str, frozenset[str]] = {}  # type -> names Envoy asked for (empty: all)
        self.last_nonce: dict[str, str] = {}
        self.last_sent: dict[str, str] = {}

    def _push(self, snap: Snapshot, type_url: str, force: bool = False) -> None:
        if type_url not in self.subscribed:
            return
        version = snap.versions[type_url]
        st = self.cache.status(self.node_id).get(type_url)
        if not force and (version == self.last_sent.get(type_url) or (st is not None and st.nacked == version)):
            return
        nonce = self._next_nonce()
        wanted = self.names.get(type_url) or frozenset(snap.entries[type_url])
        resources = [any_pb2.Any(type_url=type_url, value=snap.wire(type_url, name))
                     for name in sorted(wanted) if name in snap.entries[type_url]]
        self.last_nonce[type_url] = nonce
        self.last_sent[type_url] = version
        self.cache.record(self.node_id, type_url, sent=version)
        self._emit(discovery_pb2.DiscoveryResponse(
            version_info=version, resources=resources, type_url=type_url, nonce=nonce), "sotw", len(resources))

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> None:
        with self.lock:
            self.node_id = self.node_id or req.node.id
            t = req.type_url
            if req.response_nonce and req.response_nonce != self.last_nonce.get(t):
                return  # stale: answers a response that was superseded
            names = frozenset(req.resource_names)
            names_changed = t in self.names and names != self.names[t]
            self.names[t] = names
            snap = self.cache.snapshot(self.node_id)
            if req.response_nonce:
                if req.HasField("error_detail"):
                    self._nack(t, self.last_sent.get(t, ""), req.error_detail.message)
                    return
                self.cache.record(self.node_id, t, acked=req.version_info)
                if names_changed and snap is not None:  # e.g. a new cluster now wants its endpoints
                    self._push(snap, t, force=True)
                return
            self.subscribed.add(t)
            self.last_sent.pop(t, None)  # a fresh subscription gets the current version
            if snap is not None:
                self._push(snap, t)


@dataclass
class _Sent:
    """One delta response awaiting its ACK/NACK."""

    type_url: str
    version: str  # the snapshot's version of the type this response brings Envoy to
    resources: dict[str, str]  # name -> version sent
    removed: tuple[str, ...]
    before: dict[str, str]  # what Envoy held of those names before (restored on NACK)
    refused: bool  # the snapshot also holds a resource Envoy refused (not resent)


class DeltaStream(_Stream):
    def __init__(self, cache: SnapshotCache, counts: Counter[str]) -> None:
        super().__init__(cache, counts)
        self.wildcard: set[str] = set()
        self.names: dict[str, set[str]] = {}  # type -> names subscribed explicitly
        self.held: dict[str, dict[str, str]] = {}  # type -> name -> version Envoy holds
        self.rejected: dict[str, dict[str, str]] = {}  # type -> name -> version Envoy refused
        self.pending: dict[str, _Sent] = {}  # nonce -> response
        self.at: dict[str, str] = {}  # type -> snapshot version whose resources Envoy holds or was sent

    def _wanted(self, snap: Snapshot, t: str) -> dict[str, str]:
        entries = snap.entries[t]
        if t in self.wildcard:
            return {n: e.version for n, e in entries.items()}
        return {n: entries[n].version for n in self.names.get(t, ()) if n in entries}

    def _diff(self, snap: Snapshot, t: str, incremental: bool) -> tuple[dict[str, str], tuple[str, ...]]:
        """(name -> version Envoy lacks, names Envoy holds that are gone). ``incremental``: Envoy
        is at the snapshot ``snap`` was derived from, so only its changed names need a look
        (a one-service change in a 10k mesh is O(1), not O(10k))."""
        held, rejected, entries = self.held.get(t, {}), self.rejected.get(t, {}), snap.entries[t]
        if incremental:
            candidates = [n for n in snap.changed.get(t, ()) if t in self.wildcard or n in self.names.get(t, ())]
            wanted = {n: entries[n].version for n in candidates if n in entries}
            gone = [n for n in candidates if n not in entries]
        else:
            wanted = self._wanted(snap, t)
            gone = [n for n in held if n not in entries and (t in self.wildcard or n in self.names.get(t, ()))]
        changed = {n: v for n, v in wanted.items() if held.get(n) != v and rejected.get(n) != v}
        return changed, tuple(sorted(n for n in gone if n in held))

    def _push(self, snap: Snapshot, type_url: str, first: bool = False) -> None:
        """Send what Envoy lacks of ``type_url``; ``first``: answer a new subscription even when
        empty (Envoy waits for a first response before it is ready)."""
        if type_url not in self.wildcard and type_url not in self.names:
            return  # not subscribed
        if not first and self.at.get(type_url) == snap.versions[type_url]:
            return  # this type did not change: O(1) for the untouched types of a 10k mesh
        # incremental only when Envoy is at this snapshot's parent (not when nothing is known:
        # a new name subscribed to a snapshot without parent must still be sent)
        at = self.at.get(type_url)
        changed, removed = self._diff(snap, type_url, incremental=not first and at is not None and
                                      at == snap.parent_versions.get(type_url))
        self.at[type_url] = snap.versions[type_url]
        held = self.held.setdefault(type_url, {})
        # a resource Envoy refused at this very version is not resent: this snapshot stays NACKed
        entries = snap.entries[type_url]
        refused = any(n in entries and entries[n].version == v for n, v in self.rejected.get(type_url, {}).items())
        if not changed and not removed and not first:
            # Envoy holds (or, once it ACKs what is in flight, will hold) all it asked for
            in_flight = [s for s in self.pending.values() if s.type_url == type_url]
            if in_flight:
                in_flight[-1].version, in_flight[-1].refused = snap.versions[type_url], refused
            else:
                self._settle(type_url, snap.versions[type_url], refused)
            return
        nonce = self._next_nonce()
        before = {n: held[n] for n in (*changed, *removed) if n in held}
        self.pending[nonce] = _Sent(type_url, snap.versions[type_url], changed, removed, before, refused)
        for n in removed:
            del held[n]
        held.update(changed)
        self.cache.record(self.node_id, type_url, sent=snap.versions[type_url])
        self._emit(discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=snap.versions[type_url], type_url=type_url, nonce=nonce,
            removed_resources=removed,
            resources=[discovery_pb2.Resource(
                name=n, version=v, resource=any_pb2.Any(type_url=type_url, value=snap.wire(type_url, n)))
                for n, v in sorted(changed.items())]), "delta", len(changed) + len(removed))

    def _answer(self, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        sent = self.pending.pop(req.response_nonce, None)
        if sent is None:
            return  # unknown nonce (a response from before a reconnect): nothing to record
        t = sent.type_url
        if req.HasField("error_detail"):
            held = self.held.setdefault(t, {})
            for n in (*sent.resources, *sent.removed):  # Envoy kept what it had
                if n in sent.before:
                    held[n] = sent.before[n]
                else:
                    held.pop(n, None)
            self.rejected.setdefault(t, {}).update(sent.resources)
            self.at.pop(t, None)
            self._nack(t, sent.version, req.error_detail.message)
            return
        for n in sent.resources:
            self.rejected.get(t, {}).pop(n, None)
        self._settle(t, sent.version, sent.refused)

    def _settle(self, type_url: str, version: str, refused: bool) -> None:
        if refused:
            st = self.cache.status(self.node_id).get(type_url)
            self.cache.record(self.node_id, type_url, sent=version, nacked=version, error=st.error if st else "")
        else:
            self.cache.record(self.node_id, type_url, sent=version, acked=version)

    def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        with self.lock:
            self.node_id = self.node_id or req.node.id
            t = req.type_url
            if req.response_nonce:
                self._answer(req)
            first = t not in self.wildcard and t not in self.names
            subscribe, unsubscribe = set(req.resource_names_subscribe), set(req.resource_names_unsubscribe)
            if first:
                self.held[t] = dict(req.initial_resource_versions)  # what Envoy kept across a reconnect
                if t in WILDCARD_TYPES and not subscribe or "*" in subscribe:
                    self.wildcard.add(t)
                self.names[t] = set()
            if subscribe or unsubscribe:
                self.at.pop(t, None)
            if "*" in unsubscribe:
                self.wildcard.discard(t)
            names = self.names[t]
            names |= subscribe - {"*"}
            names -= unsubscribe
            for n in unsubscribe:
                self.held.get(t, {}).pop(n, None)
            snap = self.cache.snapshot(self.node_id)
            if snap is not None and (first or subscribe or unsubscribe or not req.response_nonce):
                self._push(snap, t, first=first)


def _serve(stream: _Stream, cache: SnapshotCache, request_iterator: Iterator[Any]) -> Iterator[Any]:
    """Read requests on a thread, yield responses from the stream's queue until Envoy hangs up."""
    cancel = cache.watch(stream.on_snapshot)

    def read() -> None:
        try:
            for req in request_iterator:
                stream.on_request(req)  # type: ignore[attr-defined]
        except grpc.RpcError:
            pass
        finally:
            stream.close()

    threading.Thread(target=read, name="xds-read", daemon=True).start()
    try:
        while True:
            item = stream.out.get()
            if item is _STOP:
                return
            yield item
    finally:
        cancel()


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache, counts: Counter[str]) -> None:
        self.cache = cache
        self.counts = counts

    def StreamAggregatedResources(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:  # noqa: N802
        return _serve(_SotwStream(self.cache, self.counts), self.cache, request_iterator)

    def DeltaAggregatedResources(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:  # noqa: N802
        return _serve(DeltaStream(self.cache, self.counts), self.cache, request_iterator)


class XdsServer:
    """A gRPC server serving ADS (both protocols) from ``cache`` on a unix socket that only this
    process's user can open: the socket (0600) in a directory (0700) of this user's. There is no
    TCP port: on 127.0.0.1 any local user could take the SDS private keys or fake ACKs.
    ``directory``: that directory (made if missing; refused unless 0700 and this user's); default:
    a new one under /run (else the temp directory), removed on stop."""

    def __init__(self, cache: SnapshotCache, directory: Path | None = None) -> None:
        self._made_dir = directory is None
        if directory is None:
            base = Path("/run") if os.access("/run", os.W_OK) else None
            directory = Path(tempfile.mkdtemp(prefix="webb-xds-", dir=base))  # 0700
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = directory.stat()
        if stat.S_IMODE(st.st_mode) != 0o700 or st.st_uid != os.geteuid():
            raise OSError(f"xDS socket directory {directory}: mode {stat.S_IMODE(st.st_mode):o}, uid {st.st_uid}; it must be "
                          f"0700 and owned by uid {os.geteuid()} (chmod 700 / chown it, or remove it)")
        self.dir = directory
        self.path = directory / "xds.sock"
        self.path.unlink(missing_ok=True)  # a previous run's
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="xds"),
                                   options=[("grpc.max_send_message_length", 512 << 20)])
        self.counts: Counter[str] = Counter()  # {sotw,delta}_{responses,resources} sent
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AdsServicer(cache, self.counts), self._server)
        old = os.umask(0o177)  # the socket is made 0600
        try:
            bound = self._server.add_insecure_port(f"unix:{self.path}")
        finally:
            os.umask(old)
        if bound == 0 or not self.path.exists():
            self._remove()
            raise OSError(f"bind xDS server to unix:{self.path}: failed")
        os.chmod(self.path, 0o600)

    def start(self) -> None:
        self._server.start()

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s).wait(grace_s + 1)
        self._remove()

    def _remove(self) -> None:
        self.path.unlink(missing_ok=True)
        if self._made_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
