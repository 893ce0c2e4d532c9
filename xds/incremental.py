"""Envoy resources made incrementally: a changed service costs its own resources, not the mesh's.

The builders (``xds.resources``) are pure functions of frozen inputs (``HttpService``, ``Upstream``,
``GatewayListener``, secrets). ``Translator`` remembers, per input value, the serialized entry it
made last time: a sync of an unchanged 10,000-service mesh builds and serializes nothing, and a sync
with one service changed builds that service's cluster, endpoints, route and filter chain only.

The one L7 listener holds every service's filter chain; its bytes are the listener's own fields
followed by each chain's cached bytes as field 3 (``filter_chains``): protobuf's wire format is a
sequence of fields, so that is the message with those chains, without building it. Only what
changed is hashed again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from functools import partial
from typing import Any

from xds.cache import Entry, Snapshot, make_entry, wire_of
from xds.model import GatewayListener, HttpService, TlsSecret, TrustBundle, Upstream
from xds.resources import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SECRET,
    TYPE_ORDER,
    bundle_secret,
    cluster,
    endpoints,
    gateway_listener,
    l7_chain,
    l7_groups,
    l7_listener_head,
    route,
    secret,
)

_FILTER_CHAINS_TAG = b"\x1a"  # field 3 (Listener.filter_chains), wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _chain_key(s: HttpService) -> Hashable:
    """What ``l7_chain`` reads of a service (its RBAC rules ride with the routes: not here)."""
    return s.name, s.listen_ip, s.listen_port, s.listen_ip6, s.match_ips, s.match_port, s.policies is None, len(s.also)


def _route_key(s: HttpService) -> Hashable:
    """What ``route`` reads of a service."""
    return s.name, s.routes, s.policies, s.also


class Translator:
    """One node's Envoy resources across syncs (the agent keeps one). Pure: no I/O."""

    def __init__(self, access_log_path: str) -> None:
        self.access_log_path = access_log_path
        self._memo: dict[tuple[str, Hashable], tuple[str, Entry]] = {}
        self._chains: dict[Hashable, bytes] = {}
        self.built = 0  # resources built and serialized by the last snapshot() (the rest came from the memo)

    def snapshot(self, services: Iterable[HttpService], upstreams: Iterable[Upstream],
                 gateways: Iterable[GatewayListener] = (), secrets: Iterable[TlsSecret] = (),
                 bundles: Iterable[TrustBundle] = ()) -> Snapshot:
        """What ``resources.build_items`` makes, as a ``Snapshot``; inputs equal to the last call's are not built again."""
        memo: dict[tuple[str, Hashable], tuple[str, Entry]] = {}
        entries: dict[str, dict[str, Entry]] = {t: {} for t in TYPE_ORDER}
        self.built = 0
        log = self.access_log_path

        def put(type_url: str, key: Hashable, name: str, make: Callable[[], Any]) -> None:
            hit = self._memo.get((type_url, key))
            if hit is None:
                self.built += 1
                res = make()
                hit = (name, make_entry(type_url, name, res, wire_of(res)))
            memo[(type_url, key)] = hit
            entries[type_url][hit[0]] = hit[1]

        ups = list(upstreams)
        for u in ups:
            put(CLUSTER, u, u.name, partial(cluster, u))
        for u in ups:
            put(ENDPOINT, u, u.name, partial(endpoints, u))
        for sec in secrets:
            put(SECRET, sec, sec.name, partial(secret, sec))
        for b in bundles:
            put(SECRET, b, b.name, partial(bundle_secret, b))
        svcs = list(services)
        chains: dict[Hashable, bytes] = {}
        for head, group in l7_groups(svcs):
            keys = [_chain_key(s) for s in group]
            for k, s in zip(keys, group, strict=True):
                if k not in chains:
                    wire = self._chains.get(k)
                    if wire is None:
                        wire = wire_of(l7_chain(s, log))
                    chains[k] = wire
            lkey = (head, tuple(keys))
            hit = self._memo.get((LISTENER, lkey))
            if hit is None:
                self.built += 1
                lst = l7_listener_head(*head)
                wire = wire_of(lst) + b"".join(_FILTER_CHAINS_TAG + _varint(len(chains[k])) + chains[k] for k in keys)
                hit = (lst.name, make_entry(LISTENER, lst.name, None, wire, {ROUTE: {s.name for s in group}}))
            memo[(LISTENER, lkey)] = hit
            entries[LISTENER][hit[0]] = hit[1]
        for gl in gateways:
            put(LISTENER, gl, gl.name, partial(gateway_listener, gl, log))
        for s in svcs:
            put(ROUTE, _route_key(s), s.name, partial(route, s))
        self._memo, self._chains = memo, chains
        return Snapshot.of_entries(entries)
