"""Pure builders: plain mesh-level descriptions → Envoy v3 protos (xds-protos)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, substitution_format_string_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_cfg
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# make-before-break: clusters and their endpoints exist before listeners and routes use them
TYPE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
WILDCARD_TYPES = (CLUSTER, LISTENER)  # Envoy always subscribes to these; EDS/RDS by name

DENIED_BODY = "Access denied\n"


@dataclass(frozen=True)
class HttpRule:
    """One allowed request shape; None fields match anything. ``path`` is a full-match regex."""

    method: str | None = None
    path: str | None = None
    headers: tuple[tuple[str, str | None], ...] = ()  # (name, exact value or None = present)


@dataclass(frozen=True)
class RbacPolicy:
    name: str  # "namespace/policy#ingress[i]" — reaches the access log and `webb observe`
    source_ips: tuple[str, ...] | None  # None: any source
    rules: tuple[HttpRule, ...]  # empty: any request
    audit: bool = False  # from a MeshPolicy in audit mode


@dataclass(frozen=True)
class HttpService:
    """An L7 service port: one Envoy listener on the node's proxy port."""

    name: str  # "namespace/service:port"
    listen_ip: str
    listen_port: int
    backends: tuple[tuple[str, int], ...]
    policies: tuple[RbacPolicy, ...] | None  # None: no L7 policy (allow all)
    listen_ip6: str = ""  # the same listener on the node's IPv6 too (dual stack)


def _any(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


def _string_exact(value: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(exact=value)


def _permission(rule: HttpRule) -> rbac_cfg.Permission:
    parts: list[rbac_cfg.Permission] = []
    if rule.method:
        parts.append(rbac_cfg.Permission(header=route_components_pb2.HeaderMatcher(
            name=":method", string_match=_string_exact(rule.method))))
    if rule.path:
        parts.append(rbac_cfg.Permission(url_path=path_pb2.PathMatcher(path=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=rule.path)))))
    for name, value in rule.headers:
        hm = route_components_pb2.HeaderMatcher(name=name.lower())
        if value is None:
            hm.present_match = True
        else:
            hm.string_match.CopyFrom(_string_exact(value))
        parts.append(rbac_cfg.Permission(header=hm))
    if not parts:
        return rbac_cfg.Permission(any=True)
    return rbac_cfg.Permission(and_rules=rbac_cfg.Permission.Set(rules=parts))


def _principal(source_ips: tuple[str, ...] | None) -> rbac_cfg.Principal:
    if source_ips is None:
        return rbac_cfg.Principal(any=True)
    ids = [rbac_cfg.Principal(direct_remote_ip=address_pb2.CidrRange(
        address_prefix=ip, prefix_len=wrappers_pb2.UInt32Value(value=128 if ":" in ip else 32))) for ip in source_ips]
    return rbac_cfg.Principal(or_ids=rbac_cfg.Principal.Set(ids=ids))


def rbac(policies: tuple[RbacPolicy, ...]) -> rbac_filter.RBAC:
    """ALLOW rules; when every policy is in audit mode they are shadow rules: Envoy records
    the would-be verdict (access log field ``shadow``) and lets the request through."""
    rules = rbac_cfg.RBAC(action=rbac_cfg.RBAC.ALLOW)
    for p in policies:
        perms = [_permission(r) for r in p.rules] or [rbac_cfg.Permission(any=True)]
        rules.policies[p.name].CopyFrom(rbac_cfg.Policy(permissions=perms, principals=[_principal(p.source_ips)]))
    if policies and all(p.audit for p in policies):
        return rbac_filter.RBAC(shadow_rules=rules)
    return rbac_filter.RBAC(rules=rules)


def _access_log(path: str, svc: HttpService) -> accesslog_pb2.AccessLog:
    fmt = struct_pb2.Struct()
    fmt.update({
        "time": "%START_TIME(%s.%3f)%",
        "service": svc.name,
        "policies": ",".join(p.name for p in svc.policies or ()),
        "src": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "upstream": "%UPSTREAM_HOST%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%",
        "status": "%RESPONSE_CODE%",
        "shadow": "%DYNAMIC_METADATA(envoy.filters.http.rbac:shadow_engine_result)%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "duration_ms": "%DURATION%",
    })
    cfg = file_pb2.FileAccessLog(path=path, log_format=substitution_format_string_pb2.SubstitutionFormatString(
        json_format=fmt))
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.file", typed_config=_any(cfg))


def _local_reply() -> hcm.LocalReplyConfig:
    # Same body as Cilium's proxy for a policy denial, so ported tooling keeps working.
    deny = hcm.ResponseMapper(
        filter=accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=accesslog_pb2.ComparisonFilter.EQ,
                value=base_pb2.RuntimeUInt32(default_value=403, runtime_key="webb.deny_code")))),
        body=base_pb2.DataSource(inline_string=DENIED_BODY),
    )
    return hcm.LocalReplyConfig(mappers=[deny])


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def cluster(svc: HttpService) -> cluster_pb2.Cluster:
    """An EDS cluster: backends come apart (ClusterLoadAssignment), so a pod change is one
    small EDS update, not a cluster rebuild that would drain its connections."""
    return cluster_pb2.Cluster(
        name=svc.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=svc.name),
        connect_timeout=duration_pb2.Duration(seconds=2),
    )


def endpoints(svc: HttpService) -> endpoint_pb2.ClusterLoadAssignment:
    eps = [endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))))
        for ip, port in svc.backends]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=svc.name, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=eps)])


def route(svc: HttpService) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=svc.name, virtual_hosts=[route_components_pb2.VirtualHost(
        name=svc.name, domains=["*"], routes=[route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster=svc.name))])])


def listener(svc: HttpService, access_log_path: str) -> listener_pb2.Listener:
    filters = []
    if svc.policies is not None:
        filters.append(hcm.HttpFilter(name="envoy.filters.http.rbac", typed_config=_any(rbac(svc.policies))))
    filters.append(hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())))
    manager = hcm.HttpConnectionManager(
        stat_prefix=svc.name.replace("/", "_").replace(":", "_"),
        rds=hcm.Rds(config_source=_ads(), route_config_name=svc.name),
        http_filters=filters,
        access_log=[_access_log(access_log_path, svc)],
        local_reply_config=_local_reply(),
    )
    extra = [listener_pb2.AdditionalAddress(address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
        address=svc.listen_ip6, port_value=svc.listen_port)))] if svc.listen_ip6 else []
    return listener_pb2.Listener(
        name=svc.name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address=svc.listen_ip, port_value=svc.listen_port)),
        additional_addresses=extra,
        filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=_any(manager))])],
    )


def build(services: list[HttpService], access_log_path: str) -> dict[str, dict[str, Any]]:
    """All resources of one node, by type URL then resource name."""
    return {
        CLUSTER: {s.name: cluster(s) for s in services},
        ENDPOINT: {s.name: endpoints(s) for s in services},
        LISTENER: {s.name: listener(s, access_log_path) for s in services},
        ROUTE: {s.name: route(s) for s in services},
    }


def references(type_url: str, resource: Any) -> tuple[str, set[str]]:
    """What a resource needs from another type: (that type URL, names); for the consistency check."""
    if type_url == CLUSTER and resource.type == cluster_pb2.Cluster.EDS:
        return ENDPOINT, {resource.eds_cluster_config.service_name or resource.name}
    if type_url == LISTENER:
        names = set()
        for chain in resource.filter_chains:
            for f in chain.filters:
                if f.typed_config.Is(hcm.HttpConnectionManager.DESCRIPTOR):
                    m = hcm.HttpConnectionManager()
                    f.typed_config.Unpack(m)
                    if m.HasField("rds"):
                        names.add(m.rds.route_config_name)
        return ROUTE, names
    return "", set()


def describe(services: list[HttpService]) -> str:
    """A stable text form (for plan hashing and debugging)."""
    return json.dumps([s.__repr__() for s in sorted(services, key=lambda s: s.name)])
