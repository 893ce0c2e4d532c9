"""Pure builders: plain mesh-level descriptions → Envoy v3 protos (xds-protos).

Clusters (``Upstream``: CDS + EDS) are built apart from listeners (``HttpService``: LDS +
RDS; ``GatewayListener``: the node's Gateway and Ingress listeners with inline routes and SDS secrets),
so one service port can be a route target without having a listener, and the reverse.

Workload identity by SDS: a workload's certificate is a ``tls_certificate`` Secret named by
its SPIFFE ID, the trust bundle a ``validation_context`` Secret named ``spiffe://<trust
domain>``; an ``Upstream`` with ``UpstreamMtls`` presents the one and verifies the peer with
the other (and its SPIFFE ID), both fetched by Envoy over ADS, so a renewal is one SDS update.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, protocol_pb2, substitution_format_string_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_cfg
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as upstream_http
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2

from xds.model import (
    GatewayChain,
    GatewayListener,
    HeaderMatchSpec,
    HeaderModifierSpec,
    HttpRoute,
    HttpRule,
    HttpService,
    RbacPolicy,
    RetrySpec,
    RouteMatchSpec,
    TlsSecret,
    TrustBundle,
    Upstream,
    UpstreamMtls,
    VirtualHost,
    bundle_name,
    service_routes,
)

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105 - a type URL
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# make-before-break: clusters, their endpoints and the certificates exist before the
# listeners and routes that use them
TYPE_ORDER = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)
MESSAGES = {CLUSTER: cluster_pb2.Cluster, ENDPOINT: endpoint_pb2.ClusterLoadAssignment, SECRET: secret_pb2.Secret,
            LISTENER: listener_pb2.Listener, ROUTE: route_pb2.RouteConfiguration}  # type URL -> message class
WILDCARD_TYPES = (CLUSTER, LISTENER)  # Envoy always subscribes to these; EDS/SDS/RDS by name

DENIED_BODY = "Access denied\n"
L7_LISTENER = "l7"  # the node proxy's L7 listener: "l7:<proxy ip>:<port>"
NO_BACKEND = "webb:no-backend"  # a TLS passthrough route without a valid backend: a cluster that is not (closed)
DEFAULT_RETRY_ON = ("5xx", "reset")  # a Retry with neither codes nor conditions
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _any(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


def _string_exact(value: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(exact=value)


def _duration_ms(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _permission(rule: HttpRule) -> rbac_cfg.Permission:
    parts: list[rbac_cfg.Permission] = []
    if rule.method:
        parts.append(rbac_cfg.Permission(header=rc.HeaderMatcher(name=":method", string_match=_string_exact(rule.method))))
    if rule.path:
        parts.append(rbac_cfg.Permission(url_path=path_pb2.PathMatcher(path=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=rule.path)))))
    for name, value in rule.headers:
        hm = rc.HeaderMatcher(name=name.lower())
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


def _access_log(path: str, service: str) -> accesslog_pb2.AccessLog:
    fmt = struct_pb2.Struct()
    fmt.update({
        "time": "%START_TIME(%s.%3f)%",
        "service": service,
        "policies": "%METADATA(VIRTUAL_HOST:webb:policies)%",  # route(): the policies in force
        "src": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "upstream": "%UPSTREAM_HOST%",
        "cluster": "%UPSTREAM_CLUSTER%",
        "authority": "%REQ(:AUTHORITY)%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%",
        "status": "%RESPONSE_CODE%",
        "grpc_status": "%GRPC_STATUS_NUMBER%",
        "shadow": "%DYNAMIC_METADATA(envoy.filters.http.rbac:shadow_engine_result)%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
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


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=_ads())


def upstream_tls(m: UpstreamMtls) -> base_pb2.TransportSocket:
    """TLS 1.3 presenting ``m.identity``'s certificate, the peer verified against the trust
    domain's bundle and its SPIFFE ID (URI SAN) — both secrets by SDS over ADS."""
    sans = [common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=_string_exact(p))
            for p in m.peer_ids]
    ctx = tls_pb2.UpstreamTlsContext(sni=m.sni, common_tls_context=tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_3,
                                            tls_maximum_protocol_version=common_pb2.TlsParameters.TLSv1_3),
        tls_certificate_sds_secret_configs=[_sds(m.identity)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(match_typed_subject_alt_names=sans),
            validation_context_sds_secret_config=_sds(bundle_name(m.trust_domain)))))
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_any(ctx))


def cluster(up: Upstream) -> cluster_pb2.Cluster:
    """An EDS cluster: backends come apart (ClusterLoadAssignment), so a pod change is one
    small EDS update, not a cluster rebuild that would drain its connections."""
    c = cluster_pb2.Cluster(
        name=up.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=up.name),
        connect_timeout=duration_pb2.Duration(seconds=2),
    )
    if up.tls is not None:
        c.transport_socket.CopyFrom(upstream_tls(up.tls))
    for i, tls in enumerate(_mtls_kinds(up)):
        m = c.transport_socket_matches.add(name=f"mtls-{i}", transport_socket=upstream_tls(tls))
        m.match.fields[MTLS_MATCH_KEY].string_value = str(i)
    if up.http2:
        opts = upstream_http.HttpProtocolOptions(explicit_http_config=upstream_http.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))
        c.typed_extension_protocol_options[_HTTP_PROTOCOL_OPTIONS].CopyFrom(_any(opts))
    return c


MTLS_MATCH_KEY = "webb-mtls"


def _mtls_kinds(up: Upstream) -> list[UpstreamMtls]:
    """The distinct mTLS settings of a cluster's endpoints (usually one: the pods of a service
    share a service account), in a stable order."""
    return sorted({e.tls for e in up.mtls_backends}, key=repr)


def _lb_endpoint(ip: str, port: int) -> endpoint_components_pb2.LbEndpoint:
    return endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))))


def endpoints(up: Upstream) -> endpoint_pb2.ClusterLoadAssignment:
    eps = [_lb_endpoint(ip, port) for ip, port in up.backends]
    kinds = {tls: i for i, tls in enumerate(_mtls_kinds(up))}
    for e in up.mtls_backends:
        ep = _lb_endpoint(e.address, e.port)
        ep.metadata.filter_metadata["envoy.transport_socket_match"].fields[MTLS_MATCH_KEY].string_value = \
            str(kinds[e.tls])
        eps.append(ep)
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=up.name, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=eps)])


def _header(h: HeaderMatchSpec) -> rc.HeaderMatcher:
    if h.type == "RegularExpression":
        return rc.HeaderMatcher(name=h.name.lower(), string_match=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=h.value)))
    return rc.HeaderMatcher(name=h.name.lower(), string_match=_string_exact(h.value))


def _match(m: RouteMatchSpec) -> rc.RouteMatch:
    out = rc.RouteMatch(headers=[_header(h) for h in m.headers])
    if m.method:
        out.headers.append(rc.HeaderMatcher(name=":method", string_match=_string_exact(m.method)))
    for q in m.query:  # Gateway API queryParams: Exact (case-sensitive) or RE2
        sm = (string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=q.value)) if q.type == "RegularExpression"
              else string_pb2.StringMatcher(exact=q.value))
        out.query_parameters.append(rc.QueryParameterMatcher(name=q.name, string_match=sm))
    if m.path_type == "Exact":
        out.path = m.path
    elif m.path_type == "RegularExpression":
        out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=m.path))
    elif m.path_type == "Prefix" or m.path.rstrip("/") == "":
        out.prefix = m.path or "/"
    else:  # PathPrefix: whole path elements; a trailing "/" is ignored (Gateway API)
        out.path_separated_prefix = m.path.rstrip("/")
    return out


def _retry(r: RetrySpec) -> rc.RetryPolicy:
    conds = list(r.retry_on) or ([] if r.codes else list(DEFAULT_RETRY_ON))
    if r.codes:
        conds.append("retriable-status-codes")
    p = rc.RetryPolicy(retry_on=",".join(conds), num_retries=wrappers_pb2.UInt32Value(value=r.attempts),
                       retriable_status_codes=list(r.codes))
    if r.per_try_timeout_ms:
        p.per_try_timeout.CopyFrom(_duration_ms(r.per_try_timeout_ms))
    return p


def _action(route: HttpRoute) -> rc.RouteAction:
    targets = [(name, w) for name, w in route.clusters if w > 0]
    headers = dict(route.backend_headers)
    action = rc.RouteAction()
    if len(targets) == 1 and not headers:
        action.cluster = targets[0][0]
    else:
        action.weighted_clusters.CopyFrom(rc.WeightedCluster(clusters=[
            rc.WeightedCluster.ClusterWeight(name=n, weight=wrappers_pb2.UInt32Value(value=w)) for n, w in targets]))
        for cw in action.weighted_clusters.clusters:
            if cw.name in headers:  # backendRefs[].filters: RequestHeaderModifier of that backend only
                add, remove = _header_ops(headers[cw.name])
                cw.request_headers_to_add.extend(add)
                cw.request_headers_to_remove.extend(remove)
    if route.timeout_ms is not None:
        action.timeout.CopyFrom(_duration_ms(route.timeout_ms))
    if route.retry is not None:
        action.retry_policy.CopyFrom(_retry(route.retry))
    return action


def _header_ops(m: HeaderModifierSpec) -> tuple[list[base_pb2.HeaderValueOption], list[str]]:
    add = [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k.lower(), value=v),
                                      append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD) for k, v in m.set]
    add += [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k.lower(), value=v),
                                       append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD) for k, v in m.add]
    return add, [h.lower() for h in m.remove]


def _prefix_of(m: RouteMatchSpec | None) -> str:
    return m.path.rstrip("/") if m is not None and m.path_type in ("PathPrefix", "Prefix") else ""


def _rewrite_path(path_type: str | None, path: str | None, m: RouteMatchSpec | None) -> regex_pb2.RegexMatchAndSubstitute | None:
    """The regex rewrite of a Gateway API path modifier: ReplaceFullPath, or ReplacePrefixMatch (the
    matched prefix, whole path elements, becomes ``path``)."""
    if path_type is None or path is None:
        return None
    if path_type == "ReplaceFullPath":
        return regex_pb2.RegexMatchAndSubstitute(pattern=regex_pb2.RegexMatcher(regex="^/.*$"), substitution=path)
    keep = path.rstrip("/")
    return regex_pb2.RegexMatchAndSubstitute(pattern=regex_pb2.RegexMatcher(regex=f"^{re.escape(_prefix_of(m))}(/|$)"),
                                             substitution=keep + "\\1" if keep else "/")


_REDIRECT_CODES = {301: rc.RedirectAction.MOVED_PERMANENTLY, 302: rc.RedirectAction.FOUND, 303: rc.RedirectAction.SEE_OTHER,
                   307: rc.RedirectAction.TEMPORARY_REDIRECT, 308: rc.RedirectAction.PERMANENT_REDIRECT}


def _redirect(route: HttpRoute, m: RouteMatchSpec | None, listener_port: int | None = None) -> rc.RedirectAction:
    f = route.filters.redirect if route.filters else None
    assert f is not None
    out = rc.RedirectAction(response_code=_REDIRECT_CODES.get(f.status_code, rc.RedirectAction.FOUND))
    if f.scheme:
        out.scheme_redirect = f.scheme
        if f.port is None:  # the scheme's own port (Gateway API): none in the Location
            out.port_redirect = 443 if f.scheme == "https" else 80
    if f.hostname:
        out.host_redirect = f.hostname
    if f.port is not None:
        out.port_redirect = f.port
    elif not f.scheme and listener_port not in (None, 80, 443):  # Gateway API: no scheme, no port: the listener's
        out.port_redirect = listener_port  # port, but never the well-known ones in a Location (they are implied)
    if f.path_type == "ReplaceFullPath" and f.path is not None:
        out.path_redirect = f.path
    elif f.path_type == "ReplacePrefixMatch" and f.path is not None:
        rewrite = _rewrite_path(f.path_type, f.path, m)
        assert rewrite is not None
        out.regex_rewrite.CopyFrom(rewrite)
    return out


def _routes(route: HttpRoute, listener_port: int | None = None) -> list[rc.Route]:
    """One Envoy route per match (Envoy matches are AND; a rule's matches are OR)."""
    out = []
    specs: list[RouteMatchSpec | None] = list(route.matches) or [None]
    f = route.filters
    for spec in specs:
        r = rc.Route(match=_match(spec) if spec is not None else rc.RouteMatch(prefix="/"))  # no match: every request
        if f is not None and f.redirect is not None:
            r.redirect.CopyFrom(_redirect(route, spec, listener_port))
        elif any(w > 0 for _, w in route.clusters):
            r.route.CopyFrom(_action(route))
            if f is not None and f.rewrite is not None:
                rewrite = _rewrite_path(f.rewrite.path_type, f.rewrite.path, spec)
                if rewrite is not None:
                    r.route.regex_rewrite.CopyFrom(rewrite)
                if f.rewrite.hostname:
                    r.route.host_rewrite_literal = f.rewrite.hostname
        else:  # Gateway API: a rule without a valid backend answers 500
            r.direct_response.CopyFrom(rc.DirectResponseAction(
                status=500, body=base_pb2.DataSource(inline_string="no valid backend for this route\n")))
        if f is not None and f.request_headers is not None:
            add, remove = _header_ops(f.request_headers)
            r.request_headers_to_add.extend(add)
            r.request_headers_to_remove.extend(remove)
        if f is not None and f.response_headers is not None:
            add, remove = _header_ops(f.response_headers)
            r.response_headers_to_add.extend(add)
            r.response_headers_to_remove.extend(remove)
        out.append(r)
    return out


def _virtual_host(vh: VirtualHost, listener_port: int | None = None) -> rc.VirtualHost:
    return rc.VirtualHost(name=vh.name, domains=list(vh.domains),
                          routes=[r for hr in vh.routes for r in _routes(hr, listener_port)])


def _rbac_filter_names(also: int) -> list[str]:
    return ["envoy.filters.http.rbac", *(f"envoy.filters.http.rbac.{i}" for i in range(1, also + 1))]


def route(svc: HttpService) -> route_pb2.RouteConfiguration:
    """The service's routes, and its L7 policy: each RBAC filter's rules ride here (per virtual
    host), not in the listener, so a policy change is one RouteConfiguration (RDS), not a new
    listener of every service's chains; the policy names go with them, for the access log."""
    vh = _virtual_host(VirtualHost(svc.name, ("*",), service_routes(svc)))
    if svc.policies is not None:
        for fname, pols in zip(_rbac_filter_names(len(svc.also)), (svc.policies, *svc.also), strict=True):
            vh.typed_per_filter_config[fname].CopyFrom(_any(rbac_filter.RBACPerRoute(rbac=rbac(pols))))
        names = ",".join(p.name for p in (*svc.policies, *(p for more in svc.also for p in more)))
        vh.metadata.filter_metadata["webb"].update({"policies": names})
    return route_pb2.RouteConfiguration(name=svc.name, virtual_hosts=[vh])


def stat_prefix(name: str) -> str:
    """A stat name part of ``name``: Envoy splits stat names at dots (a Gateway may have dots in its name)."""
    return name.replace("/", "_").replace(":", "_").replace(".", "_")


# an L7 policy's RBAC filter before its rules arrived (they come with the routes): nothing is allowed
_DENY_ALL = rbac_filter.RBAC(rules=rbac_cfg.RBAC(action=rbac_cfg.RBAC.ALLOW))


def _manager(name: str, access_log_path: str, policies: tuple[RbacPolicy, ...] | None,
             also: tuple[tuple[RbacPolicy, ...], ...] = ()) -> hcm.HttpConnectionManager:
    """Downstream codec AUTO (HTTP/1.1, h2c with prior knowledge, h2 over ALPN), WebSocket
    upgrades passed through, RBAC when there is an L7 policy. The path is normalised before RBAC
    and routing, and the app gets it normalised: ``..`` and ``.`` resolved (RFC 3986), ``//``
    merged, and an escaped slash (``%2F``, ``%5C``) answered with a redirect to the unescaped path,
    so a rule on ``/v1/.*`` never lets ``/v1/../v2/secret`` or ``/v1%2F..%2Fv2`` through."""
    filters = []
    if policies is not None:  # each backend identity's rules a filter: every one must allow (rules: route())
        filters += [hcm.HttpFilter(name=n, typed_config=_any(_DENY_ALL)) for n in _rbac_filter_names(len(also))]
    filters.append(hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())))
    return hcm.HttpConnectionManager(
        stat_prefix=stat_prefix(name),
        codec_type=hcm.HttpConnectionManager.AUTO,
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm.HttpConnectionManager.UNESCAPE_AND_REDIRECT,
        http_filters=filters,
        upgrade_configs=[hcm.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")],
        access_log=[_access_log(access_log_path, name)],
        local_reply_config=_local_reply(),
    )


def _hcm_filter(manager: hcm.HttpConnectionManager) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(manager))


def _address(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def l7_chain(svc: HttpService, access_log_path: str) -> listener_components_pb2.FilterChain:
    """The service's filter chain: picked by the original destination (its VIPs and port), its
    own HTTP connection manager (RBAC of its backends, routes by RDS, access log)."""
    manager = _manager(svc.name, access_log_path, svc.policies, svc.also)
    manager.rds.CopyFrom(hcm.Rds(config_source=_ads(), route_config_name=svc.name))
    ips = svc.match_ips or tuple(ip for ip in (svc.listen_ip, svc.listen_ip6) if ip)
    match = listener_components_pb2.FilterChainMatch(
        destination_port=wrappers_pb2.UInt32Value(value=svc.match_port or svc.listen_port),
        prefix_ranges=[address_pb2.CidrRange(address_prefix=ip, prefix_len=wrappers_pb2.UInt32Value(value=128 if ":" in ip else 32))
                       for ip in ips])
    return listener_components_pb2.FilterChain(name=svc.name, filter_chain_match=match, filters=[_hcm_filter(manager)])


def l7_listener_name(listen_ip: str, listen_port: int) -> str:
    return f"{L7_LISTENER}:{listen_ip}:{listen_port}"


def l7_listeners(services: list[HttpService], access_log_path: str) -> Iterator[tuple[str, listener_pb2.Listener]]:
    """One listener per proxy address (the node has one): every L7 service port a filter chain of
    it. The original_dst listener filter asks the kernel where the client connected to (the
    datapath answers SO_ORIGINAL_DST with the VIP) and makes that the connection's local address,
    which the chains match; a connection to no service's VIP:port matches no chain and is closed."""
    for (ip, port, ip6), svcs in l7_groups(services):
        lst = l7_listener_head(ip, port, ip6)
        lst.filter_chains.extend(l7_chain(s, access_log_path) for s in svcs)
        yield lst.name, lst


def l7_groups(services: list[HttpService]) -> list[tuple[tuple[str, int, str], list[HttpService]]]:
    """The services by listener: ((ip, port, IPv6 ip or ""), services sorted by name)."""
    groups: dict[tuple[str, int], list[HttpService]] = {}
    for svc in services:
        groups.setdefault(svc.listen_key, []).append(svc)
    return [((ip, port, next((s.listen_ip6 for s in svcs if s.listen_ip6), "")), sorted(svcs, key=lambda s: s.name))
            for (ip, port), svcs in sorted(groups.items())]


def l7_listener_head(ip: str, port: int, ip6: str) -> listener_pb2.Listener:
    """The L7 listener without its filter chains."""
    extra = [listener_pb2.AdditionalAddress(address=_address(ip6, port))] if ip6 else []
    return listener_pb2.Listener(
        name=l7_listener_name(ip, port), address=_address(ip, port), additional_addresses=extra,
        listener_filters=[listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.original_dst", typed_config=_any(original_dst_pb2.OriginalDst()))])


def _downstream_tls(secret: str) -> base_pb2.TransportSocket:
    ctx = tls_pb2.DownstreamTlsContext(common_tls_context=tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[_sds(secret)],
        alpn_protocols=["h2", "http/1.1"]))
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_any(ctx))


def _passthrough_chain(listener: str, ch: GatewayChain) -> listener_components_pb2.FilterChain:
    """TLS passthrough: SNI picks the chain; the stream goes to the backends unread (no route: closed)."""
    targets = [(n, w) for n, w in ch.passthrough or () if w > 0]
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix(f"{listener}#{ch.name}"))
    if len(targets) == 1:
        proxy.cluster = targets[0][0]
    elif targets:
        proxy.weighted_clusters.CopyFrom(tcp_proxy_pb2.TcpProxy.WeightedCluster(clusters=[
            tcp_proxy_pb2.TcpProxy.WeightedCluster.ClusterWeight(name=n, weight=w) for n, w in targets]))
    else:
        proxy.cluster = NO_BACKEND
    chain = listener_components_pb2.FilterChain(name=ch.name, filters=[listener_components_pb2.Filter(
        name="envoy.filters.network.tcp_proxy", typed_config=_any(proxy))])
    chain.filter_chain_match.server_names.extend(ch.server_names)
    return chain


def gateway_listener(gl: GatewayListener, access_log_path: str) -> listener_pb2.Listener:
    """One chain per SNI set with its own routes and certificate (a ClientHello for a name no
    chain has finds none and is closed), or one plaintext chain."""
    chains = []
    for ch in gl.chains:
        if ch.passthrough is not None:
            chains.append(_passthrough_chain(gl.name, ch))
            continue
        manager = _manager(gl.name, access_log_path, None)
        manager.route_config.CopyFrom(route_pb2.RouteConfiguration(
            name=f"{gl.name}#{ch.name}", virtual_hosts=[_virtual_host(vh, gl.port) for vh in ch.virtual_hosts],
            # "shop.example.com:8443" finds the virtual host shop.example.com; the backend still gets the Host as sent
            ignore_port_in_host_matching=True))
        chain = listener_components_pb2.FilterChain(name=ch.name, filters=[_hcm_filter(manager)])
        if ch.secret:
            chain.transport_socket.CopyFrom(_downstream_tls(ch.secret))
            if ch.server_names:
                chain.filter_chain_match.server_names.extend(ch.server_names)
        chains.append(chain)
    out = listener_pb2.Listener(name=gl.name, address=_address(gl.listen_ip, gl.port), filter_chains=chains)
    if any(ch.secret or ch.server_names for ch in gl.chains):
        out.listener_filters.append(listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.tls_inspector", typed_config=_any(tls_inspector_pb2.TlsInspector())))
    return out


def secret(s: TlsSecret) -> secret_pb2.Secret:
    """A tls_certificate Secret: an Ingress certificate, or a workload's (``workload_secret``)."""
    return secret_pb2.Secret(name=s.name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=s.cert_pem),
        private_key=base_pb2.DataSource(inline_bytes=s.key_pem)))


def bundle_secret(b: TrustBundle) -> secret_pb2.Secret:
    """A validation_context Secret: the trust domain's root(s), which a peer certificate must chain to."""
    return secret_pb2.Secret(name=b.name, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_bytes=b.roots_pem)))


def build_items(services: list[HttpService], access_log_path: str, upstreams: list[Upstream] | None = None,
                gateways: tuple[GatewayListener, ...] = (), secrets: tuple[TlsSecret, ...] = (),
                bundles: tuple[TrustBundle, ...] = ()) -> Iterator[tuple[str, str, Any]]:
    """All resources of one node as (type URL, name, resource), made one at a time (a later one
    replaces an earlier of the same type and name). ``upstreams`` None: one cluster per service,
    of its own backends. ``secrets``: certificates (Ingress, workloads), ``bundles``: trust
    bundles; Envoy fetches a Secret only while a listener or cluster names it."""
    ups = upstreams if upstreams is not None else [Upstream(s.name, s.backends) for s in services]
    for u in ups:
        yield CLUSTER, u.name, cluster(u)
    for u in ups:
        yield ENDPOINT, u.name, endpoints(u)
    for sec in secrets:
        yield SECRET, sec.name, secret(sec)
    for b in bundles:
        yield SECRET, b.name, bundle_secret(b)
    for name, lst in l7_listeners(services, access_log_path):
        yield LISTENER, name, lst
    for gl in gateways:
        yield LISTENER, gl.name, gateway_listener(gl, access_log_path)
    for s in services:
        yield ROUTE, s.name, route(s)


def build(services: list[HttpService], access_log_path: str, upstreams: list[Upstream] | None = None,
          gateways: tuple[GatewayListener, ...] = (), secrets: tuple[TlsSecret, ...] = (),
          bundles: tuple[TrustBundle, ...] = ()) -> dict[str, dict[str, Any]]:
    """``build_items`` by type URL then name (all in memory at once: tests and tools; the agent
    streams ``build_items`` into ``Snapshot.stream``, so the protos never pile up)."""
    out: dict[str, dict[str, Any]] = {t: {} for t in TYPE_ORDER}
    for t, name, res in build_items(services, access_log_path, upstreams, gateways, secrets, bundles):
        out[t][name] = res
    return out


def _route_clusters(rcfg: route_pb2.RouteConfiguration) -> set[str]:
    out = set()
    for vh in rcfg.virtual_hosts:
        for r in vh.routes:
            if r.route.cluster:
                out.add(r.route.cluster)
            out.update(c.name for c in r.route.weighted_clusters.clusters)
    return out


def _sds_names(common: tls_pb2.CommonTlsContext) -> set[str]:
    names = {c.name for c in common.tls_certificate_sds_secret_configs}
    for sds in (common.validation_context_sds_secret_config,
                common.combined_validation_context.validation_context_sds_secret_config):
        if sds.name:
            names.add(sds.name)
    return names


def _transport_secrets(ts: base_pb2.TransportSocket) -> set[str]:
    """The SDS Secrets a TLS transport socket names (certificates and validation contexts)."""
    for kind in (tls_pb2.DownstreamTlsContext, tls_pb2.UpstreamTlsContext):
        if ts.typed_config.Is(kind.DESCRIPTOR):
            ctx = kind()
            ts.typed_config.Unpack(ctx)
            return _sds_names(ctx.common_tls_context)
    return set()


def _listener_dependencies(lst: listener_pb2.Listener) -> dict[str, set[str]]:
    deps: dict[str, set[str]] = {ROUTE: set(), SECRET: set(), CLUSTER: set()}
    for chain in lst.filter_chains:
        deps[SECRET].update(_transport_secrets(chain.transport_socket))
        for f in chain.filters:
            if f.typed_config.Is(hcm.HttpConnectionManager.DESCRIPTOR):
                m = hcm.HttpConnectionManager()
                f.typed_config.Unpack(m)
                if m.HasField("rds"):
                    deps[ROUTE].add(m.rds.route_config_name)
                deps[CLUSTER].update(_route_clusters(m.route_config))
            elif f.typed_config.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR):
                t = tcp_proxy_pb2.TcpProxy()
                f.typed_config.Unpack(t)
                deps[CLUSTER].update(n for n in (t.cluster, *(c.name for c in t.weighted_clusters.clusters)) if n and n != NO_BACKEND)
    return {t: names for t, names in deps.items() if names}


def dependencies(type_url: str, resource: Any) -> dict[str, set[str]]:
    """Every resource another one needs, by type URL: EDS and SDS of a cluster, RDS and SDS of
    a listener, clusters of a route configuration (and of a listener's inline routes)."""
    if type_url == CLUSTER:
        deps = {SECRET: _transport_secrets(resource.transport_socket).union(
            *(_transport_secrets(m.transport_socket) for m in resource.transport_socket_matches))}
        if resource.type == cluster_pb2.Cluster.EDS:
            deps[ENDPOINT] = {resource.eds_cluster_config.service_name or resource.name}
        return {t: names for t, names in deps.items() if names}
    if type_url == LISTENER:
        return _listener_dependencies(resource)
    if type_url == ROUTE:
        names = _route_clusters(resource)
        return {CLUSTER: names} if names else {}
    return {}


def references(type_url: str, resource: Any) -> dict[str, set[str]]:
    """The dependencies the snapshot consistency check follows, by type URL: the types served
    by name (EDS and SDS of a cluster; RDS and SDS of a listener — the ingress listeners carry
    their routes inline and name only secrets) when there are any; otherwise the clusters a
    route needs. dependencies() has everything."""
    deps = dependencies(type_url, resource)
    by_name = {t: n for t, n in deps.items() if t not in WILDCARD_TYPES}
    return by_name or deps


def describe(services: list[HttpService]) -> str:
    """A stable text form (for plan hashing and debugging)."""
    return json.dumps([s.__repr__() for s in sorted(services, key=lambda s: s.name)])
