"""Gateway API (GatewayClass, Gateway, HTTPRoute, ReferenceGrant) → the node Envoy's gateway
listeners, and the status every object gets. Pure.

A Gateway of a GatewayClass whose controller is ``webb.io/gateway-controller`` is served by the
node Envoy: each Gateway on one address of the node's gateway pool (``spec.addresses`` asks for
one; else the first address where none of its ports is taken by a Gateway that sorts before it).
Routes attach to listeners by sectionName/port, allowedRoutes (namespaces, kinds) and hostname
intersection. Status is computed here, in the Gateway API's words (conditions, reasons), so the
operator writes exactly what the plan serves.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from mesh.model import (
    GATEWAY_CONTROLLER,
    GATEWAY_GROUP,
    BackendRef,
    ClusterState,
    Gateway,
    GatewayClass,
    Listener,
    ParentRef,
    Route,
    RouteRule,
)
from mesh.plan.routing import PortInfo, backend_headers, condition, precedence, rule_timeout
from xds.model import GatewayChain, GatewayListener, HttpRoute, TlsSecret, VirtualHost

ROUTE_KINDS = {"HTTP": ("HTTPRoute", "GRPCRoute"), "HTTPS": ("HTTPRoute", "GRPCRoute"), "TLS": ("TLSRoute",)}


def listener_kinds(lst: Listener) -> tuple[str, ...]:
    """The route kinds a listener takes: HTTP(S) terminates TLS (HTTPS), TLS passes it through."""
    if lst.protocol == "TLS":
        return ROUTE_KINDS["TLS"] if lst.tls_mode == "Passthrough" else ()
    if lst.protocol == "HTTPS" and lst.tls_mode == "Passthrough":
        return ()
    return ROUTE_KINDS.get(lst.protocol, ())
Conditions = list[dict[str, Any]]
Ranked = list[tuple[tuple[object, ...], HttpRoute]]  # routes with their precedence key
Served = dict[tuple[str, str], dict[str, Ranked]]  # (Gateway key, listener) -> hostname -> routes
Clusters = tuple[tuple[str, int], ...]
ListenerChecks = tuple[dict[str, dict[str, Any]], dict[str, Listener], dict[str, TlsSecret]]


@dataclass
class GatewayPlan:
    listeners: list[GatewayListener] = field(default_factory=list)
    secrets: list[TlsSecret] = field(default_factory=list)
    clusters: set[str] = field(default_factory=set)  # upstreams the gateway routes reach
    grpc: set[str] = field(default_factory=set)  # ...of which GRPCRoutes reach these: HTTP/2 to the backends
    # status by object: ("GatewayClass", "", name), ("Gateway", ns, name), (route kind, ns, name)
    status: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)  # Gateway key -> address
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Attach:
    listener: Listener
    hosts: tuple[str, ...]  # effective hostnames ("*": any)


def _host_match(pattern: str, host: str) -> bool:
    """Does a listener/route hostname pattern (maybe ``*.suffix``) cover ``host`` (maybe a wildcard)?"""
    if pattern == host:
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix) and not (host.startswith("*.") and len(host[1:]) < len(suffix))
    return False


def intersect(listener_host: str, route_hosts: tuple[str, ...]) -> tuple[str, ...]:
    """The hostnames a route serves on a listener (Gateway API): () when none match."""
    if not route_hosts:
        return (listener_host or "*",)
    if not listener_host:
        return route_hosts
    out = []
    for h in route_hosts:
        if _host_match(listener_host, h):
            out.append(h)
        elif _host_match(h, listener_host):
            out.append(listener_host)
    return tuple(dict.fromkeys(out))


def _class_of(state: ClusterState) -> dict[str, GatewayClass]:
    return {c.name: c for c in state.gateway_classes if c.controller == GATEWAY_CONTROLLER}


def _granted(state: ClusterState, src: tuple[str, str, str], to_ns: str, to_group: str, to_kind: str, to_name: str) -> bool:
    return src[2] == to_ns or any(g.namespace == to_ns and g.allows(src, to_group, to_kind, to_name) for g in state.grants)


@dataclass
class _GatewayCheck:
    gw: Gateway
    address: str
    listener_status: dict[str, dict[str, Any]]
    valid: dict[str, Listener]  # listeners that serve
    certs: dict[str, TlsSecret]  # listener name -> its certificate


def _listener_checks(state: ClusterState, gw: Gateway, secrets: dict[str, TlsSecret]) -> ListenerChecks:
    g = gw.generation
    out: dict[str, dict[str, Any]] = {}
    valid: dict[str, Listener] = {}
    certs: dict[str, TlsSecret] = {}
    by_port: dict[int, list[Listener]] = defaultdict(list)
    for lst in gw.listeners:
        by_port[lst.port].append(lst)
    for lst in gw.listeners:
        conds: Conditions = []
        supported = listener_kinds(lst)
        kinds = [k for grp, k in lst.kinds if grp == GATEWAY_GROUP and k in supported] if lst.kinds else list(supported)
        bad_kinds = [k for grp, k in lst.kinds if not (grp == GATEWAY_GROUP and k in supported)]
        accepted = bool(supported)
        refs_ok, refs_reason, refs_msg = True, "ResolvedRefs", "every reference resolved"
        if bad_kinds:
            refs_ok, refs_reason, refs_msg = (False, "InvalidRouteKinds",
                                                f"route kinds {', '.join(bad_kinds)} are not supported on {lst.protocol}")
        if lst.protocol == "HTTPS" and accepted:
            cert = None
            if not lst.certificates:
                refs_ok, refs_reason, refs_msg = False, "InvalidCertificateRef", "an HTTPS listener needs tls.certificateRefs"
            for ref in lst.certificates[:1]:
                ns = ref.namespace or gw.namespace
                if ref.kind != "Secret" or ref.group not in ("", "core"):
                    refs_ok, refs_reason, refs_msg = False, "InvalidCertificateRef", f"{ref.group}/{ref.kind} is not a Secret"
                elif not _granted(state, (GATEWAY_GROUP, "Gateway", gw.namespace), ns, "", "Secret", ref.name):
                    refs_ok, refs_reason, refs_msg = (False, "RefNotPermitted",
                                                    f"Secret {ns}/{ref.name}: no ReferenceGrant in {ns} allows it")
                elif f"{ns}/{ref.name}" not in secrets:
                    refs_ok, refs_reason, refs_msg = (False, "InvalidCertificateRef",
                                                    f"Secret {ns}/{ref.name} not found or not a valid kubernetes.io/tls Secret")
                else:
                    cert = secrets[f"{ns}/{ref.name}"]
            if cert is not None and refs_ok:
                certs[lst.name] = cert
        peers = [x for x in by_port[lst.port] if x.name != lst.name]
        conflict = ""
        if any(x.protocol != lst.protocol for x in peers):
            conflict = "ProtocolConflict"
        elif any(x.hostname == lst.hostname for x in peers):
            conflict = "HostnameConflict"
        bad_mode = lst.protocol in ("TLS", "HTTPS") and not accepted
        conds.append(condition("Accepted", accepted, "Accepted" if accepted else "UnsupportedValue" if bad_mode else "UnsupportedProtocol",
                               "accepted" if accepted else f"protocol {lst.protocol} with TLS mode {lst.tls_mode} is not supported "
                               "(TLS: Passthrough; HTTPS: Terminate)" if bad_mode else f"protocol {lst.protocol} is not supported", g))
        what = "hostname" if conflict == "HostnameConflict" else "port with another protocol"
        conds.append(condition("Conflicted", bool(conflict), conflict or "NoConflicts", "no conflicts" if not conflict
                               else f"another listener on port {lst.port} has the same {what}", g))
        conds.append(condition("ResolvedRefs", refs_ok, refs_reason, refs_msg, g))
        serves = accepted and refs_ok and not conflict
        conds.append(condition("Programmed", serves, "Programmed" if serves else "Invalid",
                               "programmed" if serves else "not served: see the other conditions", g))
        out[lst.name] = {"name": lst.name, "supportedKinds": [{"group": GATEWAY_GROUP, "kind": k} for k in kinds],
                         "attachedRoutes": 0, "conditions": conds}
        if serves:
            valid[lst.name] = lst
    return out, valid, certs


def _allowed(state: ClusterState, gw: Gateway, lst: Listener, route: Route) -> bool:
    kind = "HTTPRoute" if route.kind == "MeshRoute" else route.kind
    if kind not in listener_kinds(lst):
        return False
    if lst.kinds and not any(grp == GATEWAY_GROUP and k == kind for grp, k in lst.kinds):
        return False
    if lst.namespaces == "All":
        return True
    if lst.namespaces == "Same":
        return route.namespace == gw.namespace
    labels = next((dict(n.labels) for n in state.namespaces if n.name == route.namespace), {})
    labels.setdefault("kubernetes.io/metadata.name", route.namespace)
    return lst.selector is not None and lst.selector.matches(labels)


def _backends(state: ClusterState, route: Route, rule: RouteRule, index: dict[str, PortInfo]) -> tuple[Clusters, tuple[str, str] | None]:
    """The rule's upstreams (name, weight) and the first reference problem (reason, message)."""
    out: list[tuple[str, int]] = []
    problem: tuple[str, str] | None = None
    for b in rule.backends:
        ns = b.namespace or route.namespace
        why = _backend_problem(state, route, b, ns, index)
        if why is not None:
            problem = problem or why
            continue
        name = next(n for n, i in sorted(index.items()) if i.service.namespace == ns and i.service.name == b.name
                    and i.port.port == b.port)
        out.append((name, b.weight))
    return tuple(out), problem


def _backend_problem(state: ClusterState, route: Route, b: BackendRef, ns: str, index: dict[str, PortInfo]) -> tuple[str, str] | None:
    if b.kind != "Service" or b.group not in ("", "core"):
        return "InvalidKind", f"backendRef {b.group + '/' if b.group else ''}{b.kind} {b.name}: only Services are backends"
    if not _granted(state, (GATEWAY_GROUP, route.kind, route.namespace), ns, "", "Service", b.name):
        return "RefNotPermitted", f"Service {ns}/{b.name}: no ReferenceGrant in {ns} allows {route.kind}s from {route.namespace}"
    if not any(i.service.namespace == ns and i.service.name == b.name and i.port.port == b.port for i in index.values()):
        return "BackendNotFound", f"Service {ns}/{b.name} port {b.port} not found"
    return None


def _route_parent_status(ref: ParentRef, route: Route, conds: Conditions) -> dict[str, Any]:
    pref: dict[str, Any] = {"group": GATEWAY_GROUP if ref.kind == "Gateway" else "", "kind": ref.kind, "name": ref.name}
    if ref.namespace:
        pref["namespace"] = ref.namespace
    if ref.section_name:
        pref["sectionName"] = ref.section_name
    if ref.port is not None:
        pref["port"] = ref.port
    return {"parentRef": pref, "controllerName": GATEWAY_CONTROLLER, "conditions": conds}


def _allocate(gateways: list[Gateway], pool: tuple[str, ...], reserved: dict[str, set[int]]) -> dict[str, tuple[str, str]]:
    """Gateway key -> (address, "") or ("", why not). ``reserved``: ports already served per address.

    Older Gateways (creationTimestamp, then namespace/name) choose first; each keeps the address its
    status lists while that is free, else takes the first free one starting at a place its name hashes
    to: a new or deleted Gateway moves no other one (Envoy refuses a listener on an address another
    still holds in the same update)."""
    taken: dict[str, set[int]] = defaultdict(set, {a: set(p) for a, p in reserved.items()})
    out: dict[str, tuple[str, str]] = {}
    for gw in sorted(gateways, key=lambda g: (g.created == "", g.created, g.key)):
        ports = {lst.port for lst in gw.listeners}
        asked = [a.split(":", 1)[1] for a in gw.addresses]
        bad = [a for a in gw.addresses if not a.startswith("IPAddress:")]
        if bad:
            out[gw.key] = ("", f"UnsupportedAddress:{bad[0].split(':', 1)[0]} addresses are not supported; use type IPAddress")
            continue
        unusable = [a for a in asked if a not in pool]
        if unusable:
            out[gw.key] = ("", f"AddressNotUsable:{unusable[0]} is not one of this node's gateway addresses ({', '.join(pool) or 'none'})")
            continue
        start = int(hashlib.sha256(gw.key.encode()).hexdigest()[:8], 16) % len(pool) if pool else 0
        order = asked or [*(a for a in gw.assigned if a in pool), *pool[start:], *pool[:start]]
        free = [a for a in order if not (taken[a] & ports)]
        if not free:
            out[gw.key] = ("", "AddressNotAssigned:every gateway address has these ports taken by other Gateways; "
                               "add addresses to the pool (--gateway-address) or use other ports")
            continue
        taken[free[0]] |= ports
        out[gw.key] = (free[0], "")
    return out


# What GatewayClass status.supportedFeatures claims (the conformance suite tests exactly these): the core
# features of the profiles Webb runs, and only the extended ones a full `make conformance` run passed
# (conformance/reports/). A feature is added here after a run shows it passing, never before.
CORE_FEATURES = ("Gateway", "HTTPRoute", "GRPCRoute", "TLSRoute", "ReferenceGrant", "Mesh")
# passed (and none of their tests failed) in the run of 2026-12-03 on commit 7f756c0 with every extended feature
# of the five profiles enabled; the last seven (query parameters, per-backend request headers, backend timeout,
# port redirect, response headers, and the mesh's two) in the run of 2026-12-03 19:40 with them given explicitly
EXTENDED_FEATURES: tuple[str, ...] = (
    "GRPCRouteNamedRouteRule", "HTTPRoute303RedirectStatusCode", "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode", "HTTPRouteBackendProtocolH2C", "HTTPRouteBackendProtocolWebSocket",
    "HTTPRouteDestinationPortMatching", "HTTPRouteHostRewrite", "HTTPRouteMethodMatching", "HTTPRouteNamedRouteRule",
    "HTTPRouteParentRefPort", "HTTPRoutePathRedirect", "HTTPRoutePathRewrite", "HTTPRouteRequestTimeout",
    "HTTPRouteSchemeRedirect", "MeshClusterIPMatching", "MeshHTTPRouteNamedRouteRule", "MeshHTTPRouteRedirectPath",
    "MeshHTTPRouteRedirectPort", "MeshHTTPRouteRewritePath", "MeshHTTPRouteSchemeRedirect",
    "HTTPRouteQueryParamMatching", "HTTPRouteBackendRequestHeaderModification", "HTTPRouteBackendTimeout",
    "HTTPRoutePortRedirect", "HTTPRouteResponseHeaderModification", "MeshHTTPRouteBackendRequestHeaderModification",
    "MeshHTTPRouteQueryParamMatching",
)
SUPPORTED_FEATURES = tuple(sorted({*CORE_FEATURES, *EXTENDED_FEATURES}))


def plan_gateways(state: ClusterState, index: dict[str, PortInfo], pool: tuple[str, ...],
                  reserved: dict[str, set[int]] | None = None) -> GatewayPlan:
    out = GatewayPlan()
    classes = _class_of(state)
    for c in classes.values():
        out.status[("GatewayClass", "", c.name)] = {"conditions": [
            condition("Accepted", True, "Accepted", "handled by Webb", c.generation),
            condition("SupportedVersion", True, "SupportedVersion", "Gateway API v1", c.generation)],
            "supportedFeatures": [{"name": f} for f in SUPPORTED_FEATURES]}
    gateways = sorted((g for g in state.gateways if g.class_name in classes), key=lambda g: g.key)
    secrets = {s.key: TlsSecret(s.key, s.cert_pem, s.key_pem) for s in state.secrets}
    alloc = _allocate(gateways, pool, reserved or {})
    checks: dict[str, _GatewayCheck] = {}
    for gw in gateways:
        lstatus, valid, certs = _listener_checks(state, gw, secrets)
        address, why = alloc[gw.key]
        if not address:
            valid = {}
            for st in lstatus.values():
                st["conditions"][-1] = condition("Programmed", False, "Invalid", "the Gateway has no address", gw.generation)
        checks[gw.key] = _GatewayCheck(gw, address, lstatus, valid, certs)
        out.addresses[gw.key] = address
    # routes: attach, resolve, and build per (gateway, listener) the virtual hosts
    served: Served = defaultdict(lambda: defaultdict(list))
    for route in sorted(state.routes, key=lambda r: (r.namespace, r.name)):
        parents_status = []
        for ref in route.parents:
            if ref.kind != "Gateway":
                continue
            gw_ns = ref.namespace or route.namespace
            chk = checks.get(f"{gw_ns}/{ref.name}")
            if chk is None:
                continue  # not a Gateway of ours (or none): its controller, if any, writes this parent's status
            conds = _attach(state, chk, ref, route, index, served, out)
            parents_status.append(_route_parent_status(ref, route, conds))
        if parents_status:
            out.status[(route.kind, route.namespace, route.name)] = {"parents": parents_status}
    for key, chk in checks.items():
        gw = chk.gw
        address, why = alloc[key]
        n_valid = len(chk.valid)
        if why.startswith("UnsupportedAddress"):
            accepted = condition("Accepted", False, "UnsupportedAddress", why.split(":", 1)[1], gw.generation)
        elif n_valid < len(gw.listeners):
            accepted = condition("Accepted", n_valid > 0, "ListenersNotValid", "some listeners are not valid: see status.listeners",
                                 gw.generation)
        else:
            accepted = condition("Accepted", True, "Accepted", "accepted", gw.generation)
        programmed = (condition("Programmed", True, "Programmed", f"served by the node Envoy on {address}", gw.generation) if address
                      else condition("Programmed", False, why.split(":", 1)[0], why.split(":", 1)[1], gw.generation))
        out.status[("Gateway", gw.namespace, gw.name)] = {
            "addresses": [{"type": "IPAddress", "value": address}] if address else [],
            "conditions": [accepted, programmed], "listeners": [chk.listener_status[x.name] for x in gw.listeners]}
        out.listeners += _envoy_listeners(chk, served)
        out.secrets += [c for c in chk.certs.values() if c not in out.secrets]
    return out


def _attach(state: ClusterState, chk: _GatewayCheck, ref: ParentRef, route: Route, index: dict[str, PortInfo],
            served: Served, out: GatewayPlan) -> Conditions:
    gw, g = chk.gw, route.generation
    candidates = [x for x in gw.listeners if (not ref.section_name or x.name == ref.section_name)
                  and (ref.port is None or x.port == ref.port)]
    if not candidates:
        return [condition("Accepted", False, "NoMatchingParent", f"Gateway {gw.key} has no listener "
                          f"{ref.section_name or ''}{' port ' + str(ref.port) if ref.port else ''}", g),
                condition("ResolvedRefs", True, "ResolvedRefs", "not attached", g)]
    allowed = [x for x in candidates if _allowed(state, gw, x, route)]
    if not allowed:
        return [condition("Accepted", False, "NotAllowedByListeners", f"no listener of Gateway {gw.key} allows "
                          f"{route.kind}s from namespace {route.namespace}", g),
                condition("ResolvedRefs", True, "ResolvedRefs", "not attached", g)]
    attached = [(x, intersect(x.hostname, route.hostnames)) for x in allowed]
    attached = [(x, h) for x, h in attached if h]
    if not attached:
        return [condition("Accepted", False, "NoMatchingListenerHostname", "no listener hostname matches the route's hostnames", g),
                condition("ResolvedRefs", True, "ResolvedRefs", "not attached", g)]
    problem: tuple[str, str] | None = None
    rules: list[tuple[int, RouteRule, tuple[tuple[str, int], ...]]] = []
    for i, rule in enumerate(route.rules):
        clusters, why = _backends(state, route, rule, index)
        problem = problem or why
        rules.append((i, rule, clusters))
    for lst, hosts in attached:
        if lst.name not in chk.listener_status:
            continue
        chk.listener_status[lst.name]["attachedRoutes"] += 1
        if lst.name not in chk.valid:
            continue
        if route.kind == "TLSRoute":  # one stream, one backend set: the first rule's
            clusters = rules[0][2] if rules else ()
            out.clusters |= {c for c, _ in clusters}
            for h in hosts:
                served[(gw.key, lst.name)][h].append(((route.namespace, route.name), HttpRoute((), clusters)))
            continue
        for i, rule, clusters in rules:
            out.clusters |= {c for c, _ in clusters}
            if route.kind == "GRPCRoute":
                out.grpc |= {c for c, _ in clusters}
            for k, m in enumerate(rule.matches):
                hr = HttpRoute((m,), clusters, *rule_timeout(rule), rule.filters, backend_headers(rule, route.namespace, index))
                for h in hosts:
                    served[(gw.key, lst.name)][h].append(((*precedence(m), route.namespace, route.name, i, k), hr))
    resolved = (condition("ResolvedRefs", False, problem[0], problem[1], g) if problem
                else condition("ResolvedRefs", True, "ResolvedRefs", "every backend resolved", g))
    return [condition("Accepted", True, "Accepted", f"attached to Gateway {gw.key}", g), resolved]


def _vhosts(by_host: dict[str, list[tuple[tuple[object, ...], HttpRoute]]]) -> tuple[VirtualHost, ...]:
    return tuple(VirtualHost(h, (h,), tuple(hr for _, hr in sorted(rs, key=lambda t: t[0])))
                 for h, rs in sorted(by_host.items(), key=lambda kv: (kv[0] == "*", kv[0])))


def _envoy_listeners(chk: _GatewayCheck, served: Served) -> list[GatewayListener]:
    """One Envoy listener per port: HTTP listeners merge their hosts; HTTPS ones are a chain each (SNI)."""
    gw = chk.gw
    out = []
    for port in sorted({x.port for x in chk.valid.values()}):
        lsts = [x for x in gw.listeners if x.name in chk.valid and x.port == port]
        chains = []
        if lsts[0].protocol == "TLS":
            for x in lsts:
                for h, rs in sorted(served.get((gw.key, x.name), {}).items(), key=lambda kv: (kv[0] == "*", kv[0])):
                    first = sorted(rs, key=lambda t: t[0])[0][1]  # one route per name: the oldest by namespace/name
                    chains.append(GatewayChain(f"{x.name}:{h}", (), server_names=() if h == "*" else (h,),
                                               passthrough=first.clusters))
        elif lsts[0].protocol == "HTTP":
            merged: dict[str, list[tuple[tuple[object, ...], HttpRoute]]] = defaultdict(list)
            for x in lsts:
                for h, rs in served.get((gw.key, x.name), {}).items():
                    merged[h] += rs
            chains.append(GatewayChain("http", _vhosts(merged)))
        else:
            for x in sorted(lsts, key=lambda x: (x.hostname == "", x.hostname)):
                cert = chk.certs[x.name]
                chains.append(GatewayChain(x.name, _vhosts(served.get((gw.key, x.name), {})), cert.name,
                                           (x.hostname,) if x.hostname else ()))
        if not chains:  # TLS without a route yet: Envoy takes no listener without a chain; this one closes
            chains.append(GatewayChain("no-route", (), passthrough=()))
        out.append(GatewayListener(f"gateway:{gw.key}:{port}", chk.address, port, tuple(chains)))
    return out

