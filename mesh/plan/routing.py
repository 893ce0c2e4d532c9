"""Routes whose parents are Services (GAMMA) and Ingresses → Envoy routes, upstreams and the node's
ingress listeners. Pure (Gateways: ``mesh.plan.gateway``).

The input is the index of TCP service ports (``ns/service:port`` → the port and its
backends) that reconcile builds; the output uses the xDS vocabulary of ``xds.resources``.
A reference that names nothing (a missing Service, port or Secret) becomes a warning that
names the object and field; the rest of the object, and every other object, keeps working.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from mesh.model import (
    GATEWAY_CONTROLLER,
    BackendRef,
    HeaderModifier,
    Ingress,
    IngressBackend,
    IngressPath,
    Retry,
    Route,
    RouteMatch,
    RouteRule,
    Secret,
    Service,
    ServicePort,
)
from xds.model import GatewayChain, GatewayListener, HttpRoute, RouteMatchSpec, TlsHosts, TlsSecret, Upstream, VirtualHost

INGRESS_CLASS = "webb"
_PATH_RANK = {"Exact": 0, "RegularExpression": 1, "PathPrefix": 2, "Prefix": 2}  # regex before prefix, as Envoy Gateway


@dataclass(frozen=True)
class PortInfo:
    service: Service
    port: ServicePort
    backends: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class IngressListen:
    ip: str
    http_port: int
    https_port: int


def port_name(s: Service, p: ServicePort) -> str:
    return f"{s.key}:{p.port}" if p.protocol != "UDP" else f"{s.key}:{p.port}/UDP"


def _ports_of(index: dict[str, PortInfo], namespace: str, service: str) -> list[str]:
    return sorted(n for n, i in index.items() if i.service.namespace == namespace and i.service.name == service)


def precedence(m: RouteMatchSpec) -> tuple[int, int, bool, int, int]:
    """Gateway API order: exact path (then regex), longest prefix, with a method, most header matches,
    most query parameter matches."""
    return (_PATH_RANK.get(m.path_type, 3), -len(m.path), m.method is None, -len(m.headers), -len(m.query))


def backend_headers(rule: RouteRule, namespace: str, index: dict[str, PortInfo]) -> tuple[tuple[str, HeaderModifier], ...]:
    """(upstream, RequestHeaderModifier) of the rule's backendRefs that have one."""
    out = []
    for b in rule.backends:
        if b.request_headers is not None:
            name = _backend(index, b.namespace or namespace, b.name, b.port)
            if name is not None:
                out.append((name, b.request_headers))
    return tuple(out)


def rule_timeout(rule: RouteRule) -> tuple[int | None, Retry | None]:
    """The Envoy route timeout and retry policy of a rule: timeouts.request, and timeouts.backendRequest as
    the timeout of each try (the route's when there are no retries; 0 disables either)."""
    req, backend, retry = rule.timeout_ms, rule.backend_timeout_ms, rule.retry
    if not backend:
        return req, retry
    if retry is not None:
        return req, retry if retry.per_try_timeout_ms else replace(retry, per_try_timeout_ms=backend)
    return (backend if not req else min(req, backend)), retry


def _parent_ports(r: Route, index: dict[str, PortInfo], warnings: list[str]) -> dict[int, list[str]]:
    """Per Service parentRef (by position), the service ports it names."""
    out = {}
    for i, p in enumerate(r.parents):
        if p.kind != "Service":
            continue
        ports = [n for n in _ports_of(index, p.namespace or r.namespace, p.name) if index[n].service.cluster_ip
                 ] if (p.namespace or r.namespace) == r.namespace else []  # a headless Service has no VIP to steer
        if p.port is not None:
            ports = [n for n in ports if index[n].port.port == p.port]
        if not ports:
            port = f" port {p.port}" if p.port is not None else ""
            warnings.append(f"{r.kind} {r.key}: spec.parentRefs[{i}]: no TCP Service {p.namespace or r.namespace}/{p.name}{port} "
                            "in the route's namespace; create it or fix the reference (this parent is skipped)")
        out[i] = ports
    return out


def _backend(index: dict[str, PortInfo], namespace: str, service: str, port: int | str | None) -> str | None:
    for n in _ports_of(index, namespace, service):
        if index[n].port.port == port or (isinstance(port, str) and index[n].port.name == port):
            return n
    return None


def _clusters(r: Route, i: int, rule: RouteRule, index: dict[str, PortInfo],
              warnings: list[str]) -> tuple[tuple[tuple[str, int], ...], str]:
    """The rule's upstreams, and the first reference problem as "Reason:message" ("" = none)."""
    out = []
    problem = ""
    for j, b in enumerate(rule.backends):
        where = f"{r.kind} {r.key}: spec.rules[{i}].backendRefs[{j}]"
        if b.kind != "Service" or b.group not in ("", "core"):
            problem = problem or f"InvalidKind:{b.kind} is not a Service"
            warnings.append(f"{where}: only Services are backends ({b.group or 'core'}/{b.kind} {b.name} is skipped)")
            continue
        if b.namespace and b.namespace != r.namespace:
            problem = problem or f"RefNotPermitted:Service {b.namespace}/{b.name} is in another namespace"
            warnings.append(f"{where}: Service {b.namespace}/{b.name} is in another namespace; mesh routes reach "
                            "their own namespace's Services (this backend is skipped)")
            continue
        name = _backend(index, r.namespace, b.name, b.port)
        if name is None:
            problem = problem or f"BackendNotFound:Service {r.namespace}/{b.name} port {b.port} not found"
            warnings.append(_missing_backend(where, r.namespace, b))
            continue
        out.append((name, b.weight))
    return tuple(out), problem


def _missing_backend(where: str, namespace: str, b: BackendRef | IngressBackend) -> str:
    svc = b.name if isinstance(b, BackendRef) else b.service
    return (f"{where}: Service {namespace}/{svc} has no TCP port {b.port}; requests for this backend "
            "are not routed (a rule left without backends answers 500)")


def condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    """A metav1.Condition without lastTransitionTime (the writer keeps or sets it)."""
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message,
            "observedGeneration": generation}


def mesh_routes(routes: Iterable[Route], index: dict[str, PortInfo]) -> tuple[
        dict[str, tuple[HttpRoute, ...]], list[str], dict[tuple[str, str, str], list[dict[str, Any]]]]:
    """Per parent service port, its routes in Gateway API precedence (ties: route name, rule order);
    warnings; and per route, the status of each Service parent (GAMMA)."""
    warnings: list[str] = []
    status: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    ranked: dict[str, list[tuple[tuple[object, ...], HttpRoute]]] = defaultdict(list)
    for r in sorted(routes, key=lambda r: r.key):
        if r.kind == "MeshRoute":
            warnings.append(f"MeshRoute {r.key}: MeshRoute is retired; it is read as an HTTPRoute with Service parentRefs. "
                            "Migrate: apiVersion gateway.networking.k8s.io/v1, kind HTTPRoute, and kind: Service, group: \"\" "
                            "in each parentRef (docs/gateway.md)")
        parents = _parent_ports(r, index, warnings)
        if not parents:
            continue
        problem = ""
        for i, rule in enumerate(r.rules):
            clusters, why = _clusters(r, i, rule, index, warnings)
            problem = problem or why
            for k, m in enumerate(rule.matches):
                hr = HttpRoute((m,), clusters, *rule_timeout(rule), rule.filters, backend_headers(rule, r.namespace, index))
                for ports in parents.values():
                    for p in ports:
                        ranked[p].append(((*precedence(m), r.key, i, k), hr))
        entries = []
        for i, ports in parents.items():
            ref = r.parents[i]
            pref: dict[str, Any] = {"group": "", "kind": "Service", "name": ref.name}
            if ref.namespace:
                pref["namespace"] = ref.namespace
            if ref.port is not None:
                pref["port"] = ref.port
            accepted = (condition("Accepted", True, "Accepted", "steers traffic to the Service", r.generation) if ports else
                        condition("Accepted", False, "BackendNotFound" if not ref.namespace or ref.namespace == r.namespace
                                   else "NotAllowedByParent", "no such Service port in the route's namespace", r.generation))
            resolved = (condition("ResolvedRefs", False, problem.split(":", 1)[0], problem.split(":", 1)[1], r.generation) if problem
                        else condition("ResolvedRefs", True, "ResolvedRefs", "every backend resolved", r.generation))
            entries.append({"parentRef": pref, "controllerName": GATEWAY_CONTROLLER, "conditions": [accepted, resolved]})
        status[(r.kind, r.namespace, r.name)] = entries
    return {p: tuple(hr for _, hr in sorted(v, key=lambda t: t[0])) for p, v in ranked.items()}, warnings, status


def upstreams(names: Iterable[str], index: dict[str, PortInfo], http2: set[str] | None = None) -> tuple[Upstream, ...]:
    """``http2``: more upstreams that speak HTTP/2 to their backends (a GRPCRoute's, whatever the port says)."""
    return tuple(Upstream(n, index[n].backends, index[n].port.http2 or n in (http2 or set()))
                 for n in sorted(set(names)) if n in index)


def grpc_backends(routes: Iterable[Route], index: dict[str, PortInfo]) -> set[str]:
    """The service ports GRPCRoutes send to (same namespace: GAMMA; the Gateway's are resolved there)."""
    out = set()
    for r in routes:
        if r.kind == "GRPCRoute":
            for rule in r.rules:
                for b in rule.backends:
                    name = _backend(index, b.namespace or r.namespace, b.name, b.port)
                    if name is not None:
                        out.add(name)
    return out


def route_clusters(routes: Iterable[HttpRoute]) -> set[str]:
    return {name for r in routes for name, _ in r.clusters}


# ---- Ingress ----

def _ingress_route(ing: Ingress, where: str, path: IngressPath, index: dict[str, PortInfo], warnings: list[str]) -> HttpRoute:
    name = _backend(index, ing.namespace, path.backend.service, path.backend.port)
    if name is None:
        warnings.append(_missing_backend(f"Ingress {ing.key}: {where}", ing.namespace, path.backend))
    ptype = {"Exact": "Exact", "Prefix": "PathPrefix"}.get(path.path_type, "Prefix")
    return HttpRoute((RouteMatch(ptype, path.path),), ((name, 1),) if name else ())


def _host_routes(ing: Ingress, index: dict[str, PortInfo], warnings: list[str]) -> list[tuple[str, HttpRoute]]:
    out = []
    for i, rule in enumerate(ing.rules):
        for j, p in enumerate(rule.paths):
            out.append((rule.host or "*", _ingress_route(ing, f"spec.rules[{i}].http.paths[{j}].backend", p, index, warnings)))
    if ing.default_backend is not None:
        catch_all = IngressPath("/", "ImplementationSpecific", ing.default_backend)
        out.append(("*", _ingress_route(ing, "spec.defaultBackend", catch_all, index, warnings)))
    return out


def _tls(ing: Ingress, secrets: dict[str, TlsSecret], taken: set[str], warnings: list[str]) -> list[TlsHosts]:
    out = []
    for i, t in enumerate(ing.tls):
        key = f"{ing.namespace}/{t.secret}"
        if key not in secrets:
            warnings.append(f"Ingress {ing.key}: spec.tls[{i}].secretName: Secret {key} not found or not of type "
                            f"kubernetes.io/tls; {', '.join(t.hosts)} not served over HTTPS until it exists")
            continue
        hosts = tuple(h for h in t.hosts if h not in taken)
        for h in sorted(set(t.hosts) - set(hosts)):
            warnings.append(f"Ingress {ing.key}: spec.tls[{i}].hosts: {h} already has a certificate from another "
                            "Ingress (first by namespace/name wins); remove it from one of them")
        taken.update(hosts)
        if hosts:
            out.append(TlsHosts(hosts, key))
    return out


def ingress_gateway(ingresses: Iterable[Ingress], secrets: Iterable[Secret], index: dict[str, PortInfo],
                    listen: IngressListen) -> tuple[list[GatewayListener], tuple[TlsSecret, ...], list[str]]:
    """Every ``ingressClassName: webb`` Ingress in one gateway: a virtual host per host
    (paths of all Ingresses for that host together, Exact first, then longest path), TLS
    per SNI from the referenced Secrets. Other classes are left to their controllers."""
    warnings: list[str] = []
    by_host: dict[str, list[HttpRoute]] = defaultdict(list)
    tls: list[TlsHosts] = []
    taken: set[str] = set()
    tls_secrets = {s.key: TlsSecret(s.key, s.cert_pem, s.key_pem) for s in secrets}
    for ing in sorted(ingresses, key=lambda i: i.key):
        if ing.class_name != INGRESS_CLASS:
            warnings.append(f"Ingress {ing.key}: spec.ingressClassName {ing.class_name or '(none)'!r} is not "
                            f"{INGRESS_CLASS!r}; ignored (set ingressClassName: {INGRESS_CLASS} to serve it)")
            continue
        for host, hr in _host_routes(ing, index, warnings):
            by_host[host].append(hr)
        tls += _tls(ing, tls_secrets, taken, warnings)
    if not by_host and not tls:
        return [], (), warnings
    vhosts = tuple(VirtualHost(h, (h,), tuple(sorted(rs, key=lambda r: precedence(r.matches[0]))))
                   for h, rs in sorted(by_host.items(), key=lambda kv: (kv[0] == "*", kv[0])))
    used = tuple(tls_secrets[k] for k in sorted({t.secret for t in tls}))
    out = [GatewayListener("ingress:http", listen.ip, listen.http_port, (GatewayChain("http", vhosts),))]
    if tls:
        out.append(GatewayListener("ingress:https", listen.ip, listen.https_port, tuple(
            GatewayChain(f"sni:{t.secret}", vhosts, t.secret, t.hosts) for t in tls)))
    return out, used, warnings
