"""Kubernetes-style YAML → model objects, with errors that name the field and the fix."""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import ipaddress
import re
from pathlib import Path
from typing import Any

import re2
import yaml
from re2 import _re2

from mesh.model import (
    CLUSTER_SCOPED,
    GATEWAY_CONTROLLER,
    GATEWAY_GROUP,
    MTLS_LABEL,
    MTLS_MODES,
    NAMESPACE_LABEL,
    BackendRef,
    CertRef,
    ContainerPort,
    EndpointSlice,
    Gateway,
    GatewayClass,
    HeaderMatch,
    HeaderModifier,
    HttpMatch,
    Ingress,
    IngressBackend,
    IngressHostRule,
    IngressPath,
    IngressRule,
    IngressTlsEntry,
    Listener,
    MeshPolicy,
    MeshTLS,
    Namespace,
    ParentRef,
    Pod,
    PortRule,
    Redirect,
    ReferenceGrant,
    Requirement,
    Retry,
    Rewrite,
    Route,
    RouteFilters,
    RouteMatch,
    RouteRule,
    Secret,
    Selector,
    Service,
    ServicePort,
)

API_GROUP = "webb.io"
MESH_VERSION = f"{API_GROUP}/v1alpha1"
INGRESS_VERSION = "networking.k8s.io/v1"
GATEWAY_VERSION = f"{GATEWAY_GROUP}/v1"
KINDS = ("Namespace", "Pod", "Service", "Secret", "MeshPolicy", "MeshRoute", "MeshTLS", "Ingress", "EndpointSlice",
         "GatewayClass", "Gateway", "HTTPRoute", "GRPCRoute", "TLSRoute", "ReferenceGrant")
API_VERSIONS: dict[str, str | tuple[str, ...]] = {
    "MeshPolicy": MESH_VERSION, "MeshRoute": MESH_VERSION, "MeshTLS": MESH_VERSION, "Ingress": INGRESS_VERSION,
    "EndpointSlice": "discovery.k8s.io/v1", "GatewayClass": GATEWAY_VERSION, "Gateway": GATEWAY_VERSION,
    "HTTPRoute": GATEWAY_VERSION, "GRPCRoute": GATEWAY_VERSION, "TLSRoute": (GATEWAY_VERSION, f"{GATEWAY_GROUP}/v1alpha2"),
    "ReferenceGrant": (f"{GATEWAY_GROUP}/v1beta1", GATEWAY_VERSION)}
REDIRECT_CODES = (301, 302, 303, 307, 308)
SUBDOMAIN_NAMED = ("Secret", "EndpointSlice", "Ingress", "GatewayClass", "Gateway", "HTTPRoute", "GRPCRoute", "TLSRoute",
                   "ReferenceGrant")
FILTER_TYPES = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")  # a label key's name part, a label value
_METHOD = re.compile(r"^[A-Z]+$")
_DURATION = re.compile(r"^(?:[0-9]{1,5}(?:h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]+)(h|ms|m|s)")
_MS = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error is raised, with the field; RE2 need not print it too
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
Obj = (Namespace | Pod | Service | MeshPolicy | Route | MeshTLS | Ingress | Secret | EndpointSlice | GatewayClass | Gateway
       | ReferenceGrant)


@functools.lru_cache(maxsize=4096)
def _re2_error(pattern: str) -> str | None:
    """RE2's error for ``pattern``, None if it compiles. RE2's own object, without the ``re2``
    module's per-call copy of the options (a 1 MB policy holds ~14,000 regexes)."""
    compiled = _re2.RE2(pattern.encode(), _RE2_OPTIONS)
    if compiled.ok():
        return None
    why = compiled.error()
    return why.decode(errors="replace") if isinstance(why, bytes) else str(why)


class ManifestError(ValueError):
    """``where``: "Kind ns/name"; ``field``: a JSON path into the object."""

    def __init__(self, where: str, field: str, problem: str) -> None:
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: {field}: {problem}")


class Ctx:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, problem: str) -> ManifestError:
        return ManifestError(self.where, field, problem)

    def mapping(self, v: Any, field: str) -> dict[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.fail(field, f"must be a mapping, got {type(v).__name__}")
        return v

    def seq(self, v: Any, field: str) -> list[Any]:
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.fail(field, f"must be a list, got {type(v).__name__}")
        return v

    def labels(self, v: Any, field: str, selector: bool = False) -> tuple[tuple[str, str], ...]:
        """Labels as Kubernetes allows them: keys ``[prefix/]name`` (prefix a DNS-1123 subdomain, name at
        most 63 of [A-Za-z0-9-_.]), values at most 63 of the same (or empty). A selector may write
        Cilium's ``k8s:`` source prefix."""
        m = self.mapping(v, field)
        for k, val in m.items():
            self.label_key(k, f"{field}.{k}", selector)
            if not isinstance(val, str):
                raise self.fail(f"{field}.{k}", f"label values are strings; quote it: \"{val}\"")
            self.label_value(val, f"{field}.{k}")
        return tuple(sorted((str(k), str(val)) for k, val in m.items()))

    def label_key(self, k: Any, field: str, selector: bool = False) -> str:
        key = str(k).removeprefix("k8s:") if selector else str(k)
        prefix, _, name = key.rpartition("/")
        if not isinstance(k, str) or not name or len(name) > 63 or not _LABEL_NAME.match(name) or (
                prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix))):
            raise self.fail(field, f"{k!r} is not a label key; use [prefix/]name: name at most 63 letters, digits, "
                            "'-', '_', '.' (starting and ending alphanumeric), prefix a DNS subdomain, e.g. 'app' or "
                            "'example.com/tier'")
        return key

    def label_value(self, v: str, field: str) -> str:
        if v and (len(v) > 63 or not _LABEL_NAME.match(v)):
            raise self.fail(field, f"{v!r} is not a label value; use at most 63 letters, digits, '-', '_', '.' "
                            "(starting and ending alphanumeric), or empty")
        return v

    def port(self, v: Any, field: str) -> int:
        try:
            p = int(str(v))
        except ValueError:
            raise self.fail(field, f"{v!r} is not a port number; use 1-65535, e.g. \"80\"") from None
        if not 1 <= p <= 65535:
            raise self.fail(field, f"{p} is out of range; use 1-65535")
        return p

    def only(self, m: dict[str, Any], field: str, allowed: tuple[str, ...], what: str,
             unsupported: dict[str, str] | None = None) -> None:
        """Refuse any key not in ``allowed`` (fail closed: a typo must never drop a rule), naming the
        field, what is allowed and the nearest allowed key; ``unsupported``: known keys Webb does not
        implement -> why/what to do."""
        for key in sorted(m, key=str):
            if key in allowed:
                continue
            f = f"{field}.{key}" if field else str(key)
            if unsupported and key in unsupported:
                raise self.fail(f, f"is not supported: {unsupported[key]}")
            near = difflib.get_close_matches(str(key).lower(), [a.lower() for a in allowed], n=1, cutoff=0.6)
            hint = f"; did you mean {next(a for a in allowed if a.lower() == near[0])!r}?" if near else ""
            raise self.fail(f, f"unknown field; {what} has {', '.join(allowed)}{hint}")

    def name(self, v: Any, field: str, example: str, what: str = "a Service name") -> str:
        if not isinstance(v, str) or not _DNS1123.match(v):
            raise self.fail(field, f"{v!r} is not {what}; use a DNS-1123 label, e.g. {example!r}")
        return v

    def subdomain(self, v: Any, field: str, example: str, what: str) -> str:
        if not isinstance(v, str) or len(v) > 253 or not _DNS1123_SUBDOMAIN.match(v):
            raise self.fail(field, f"{v!r} is not {what}; use a DNS-1123 subdomain, e.g. {example!r}")
        return v

    def regex(self, v: Any, field: str) -> str:
        """A regex as Envoy reads it (RE2, Google's engine: no lookaround, no backreferences), so a pattern
        Python would take is never sent to Envoy to be refused there (a NACK)."""
        why = _re2_error(str(v))
        if why is not None:
            raise self.fail(field, f"{v!r} is not a valid regular expression (Envoy uses RE2: {why}); "
                            "RE2 has no lookaround ((?!...), (?=...)) or backreferences")
        return str(v)

    def duration_ms(self, v: Any, field: str) -> int:
        """Gateway API Duration: 1-4 parts of a number and h, m, s or ms, e.g. "2s", "1m30s", "500ms"."""
        if not isinstance(v, str) or not _DURATION.match(v):
            raise self.fail(field, f"{v!r} is not a duration; use e.g. \"2s\", \"500ms\" or \"1m30s\"")
        return sum(int(n) * _MS[unit] for n, unit in _DURATION_PART.findall(v))

    def count(self, v: Any, field: str, lo: int, hi: int) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self.fail(field, f"{v!r}: use a whole number {lo}-{hi}")
        return v

    def protocol(self, v: Any, field: str) -> str:
        p = str(v or "TCP").upper()
        if p not in ("TCP", "UDP", "ANY"):
            raise self.fail(field, f"{v!r} is not a protocol; use TCP, UDP or ANY")
        return p


def parse_selector(ctx: Ctx, v: Any, field: str) -> Selector:
    m = ctx.mapping(v, field)
    ctx.only(m, field, ("matchLabels", "matchExpressions"), "a selector")
    labels = ctx.labels(m.get("matchLabels"), f"{field}.matchLabels", selector=True)
    labels = tuple(sorted((k.removeprefix("k8s:"), val) for k, val in labels))
    exprs = []
    for i, e in enumerate(ctx.seq(m.get("matchExpressions"), f"{field}.matchExpressions")):
        f = f"{field}.matchExpressions[{i}]"
        e = ctx.mapping(e, f)
        ctx.only(e, f, ("key", "operator", "values"), "a match expression")
        op = e.get("operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ctx.fail(f"{f}.operator", f"{op!r} is not one of In, NotIn, Exists, DoesNotExist")
        if not e.get("key"):
            raise ctx.fail(f"{f}.key", "is required")
        ctx.label_key(e["key"], f"{f}.key", selector=True)
        values = tuple(ctx.label_value(str(x), f"{f}.values[{j}]") for j, x in enumerate(ctx.seq(e.get("values"), f"{f}.values")))
        if op in ("In", "NotIn") and not values:
            raise ctx.fail(f"{f}.values", f"operator {op} needs at least one value")
        exprs.append(Requirement(str(e["key"]).removeprefix("k8s:"), op, values))
    return Selector(labels, tuple(exprs))


def _http(ctx: Ctx, v: Any, field: str) -> HttpMatch:
    m = ctx.mapping(v, field)
    ctx.only(m, field, ("method", "path", "headers"), "an HTTP rule",
             {"host": "host matching is not implemented; remove it (the rule would match every host)",
              "headerMatches": "use headers: [\"Name: value\"]"})
    method = m.get("method")
    if method is not None and not _METHOD.match(str(method)):
        raise ctx.fail(f"{field}.method", f"{method!r} is not an HTTP method; use e.g. GET or POST")
    path = m.get("path")
    if path is not None:
        ctx.regex(path, f"{field}.path")
    headers = tuple(str(h) for h in ctx.seq(m.get("headers"), f"{field}.headers"))
    return HttpMatch(str(method) if method else None, str(path) if path is not None else None, headers)


def _own_namespace(ctx: Ctx, sel: dict[str, Any], ns: str) -> None:
    """An endpointSelector selects pods of the policy's namespace only: one naming another is refused."""
    for key in (NAMESPACE_LABEL, f"k8s:{NAMESPACE_LABEL}"):
        other = ctx.mapping(sel.get("matchLabels"), "spec.endpointSelector.matchLabels").get(key)
        if other is not None and other != ns:
            raise ctx.fail(f"spec.endpointSelector.matchLabels.{key}", f"{other!r}: a MeshPolicy in namespace {ns!r} selects "
                           f"pods of {ns!r} only; create it in namespace {other!r}")
    for i, e in enumerate(ctx.seq(sel.get("matchExpressions"), "spec.endpointSelector.matchExpressions")):
        if isinstance(e, dict) and str(e.get("key", "")).removeprefix("k8s:") == NAMESPACE_LABEL:
            raise ctx.fail(f"spec.endpointSelector.matchExpressions[{i}].key", "the namespace of the selected pods is the "
                           "policy's own; remove this expression")


def _policy(ctx: Ctx, ns: str, name: str, spec: dict[str, Any]) -> MeshPolicy:
    ctx.only(spec, "spec", ("endpointSelector", "ingress", "description", "mode"), "MeshPolicy spec",
             {"egress": "Webb enforces ingress only; write the rule on the destination's policy",
              "ingressDeny": "deny rules are not implemented; a policy denies what no ingress rule allows",
              "egressDeny": "deny rules are not implemented; a policy denies what no ingress rule allows",
              "specs": "one spec per MeshPolicy; split the specs into several MeshPolicy objects",
              "nodeSelector": "host policies are not implemented"})
    if "endpointSelector" not in spec:
        raise ctx.fail("spec.endpointSelector", "is required; e.g. {matchLabels: {app: web}}")
    _own_namespace(ctx, ctx.mapping(spec["endpointSelector"], "spec.endpointSelector"), ns)
    mode = spec.get("mode", "enforce")
    if mode not in ("enforce", "audit"):
        raise ctx.fail("spec.mode", f"{mode!r}: use enforce (deny what no rule allows) or audit (report, allow)")
    rules = []
    for i, r in enumerate(ctx.seq(spec.get("ingress"), "spec.ingress")):
        f = f"spec.ingress[{i}]"
        r = ctx.mapping(r, f)
        ctx.only(r, f, ("fromEndpoints", "toPorts"), "an ingress rule",
                 {k: "only fromEndpoints selects sources; remove it (dropping it would widen the rule)"
                  for k in ("fromCIDR", "fromCIDRSet", "fromEntities", "fromRequires", "fromGroups", "fromNodes", "icmps",
                            "authentication")})
        froms = None
        if "fromEndpoints" in r:
            froms = tuple(parse_selector(ctx, s, f"{f}.fromEndpoints[{j}]")
                          for j, s in enumerate(ctx.seq(r["fromEndpoints"], f"{f}.fromEndpoints")))
        to_ports = []
        for j, tp in enumerate(ctx.seq(r.get("toPorts"), f"{f}.toPorts")):
            tf = f"{f}.toPorts[{j}]"
            tp = ctx.mapping(tp, tf)
            ctx.only(tp, tf, ("ports", "rules"), "a toPorts entry",
                     {k: "TLS inspection is not implemented; remove it" for k in
                      ("terminatingTLS", "originatingTLS", "serverNames", "listener")})
            ports = []
            for k, p in enumerate(ctx.seq(tp.get("ports"), f"{tf}.ports")):
                pf = f"{tf}.ports[{k}]"
                p = ctx.mapping(p, pf)
                ctx.only(p, pf, ("port", "protocol"), "a port", {"endPort": "port ranges are not implemented; list the ports"})
                ports.append((ctx.port(p.get("port"), f"{pf}.port"), ctx.protocol(p.get("protocol"), f"{pf}.protocol")))
            http = None
            rules_m = ctx.mapping(tp.get("rules"), f"{tf}.rules")
            ctx.only(rules_m, f"{tf}.rules", ("http",), "rules",
                     {k: "Webb enforces HTTP rules only; remove it or write http rules (dropping it would allow all)"
                      for k in ("kafka", "dns", "l7proto", "l7")})
            if "rules" in tp and not rules_m.get("http"):
                raise ctx.fail(f"{tf}.rules.http", "is required when rules is given, with at least one rule: an empty "
                               "rules would allow every request; remove rules for an L4-only allow")
            if "http" in rules_m:
                http = tuple(_http(ctx, h, f"{tf}.rules.http[{k}]")
                             for k, h in enumerate(ctx.seq(rules_m["http"], f"{tf}.rules.http")))
                if not ports:
                    raise ctx.fail(f"{tf}.ports", "HTTP rules need the ports they apply to, e.g. [{port: \"80\"}]")
            to_ports.append(PortRule(tuple(ports), http))
        rules.append(IngressRule(froms, tuple(to_ports)))
    return MeshPolicy(ns, name, parse_selector(ctx, spec["endpointSelector"], "spec.endpointSelector"), tuple(rules), mode)


_PATH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
RETRY_ON = ("5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream", "retriable-status-codes",
            "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")


def _name_value_matches(ctx: Ctx, v: Any, field: str, what: str, example: str) -> tuple[HeaderMatch, ...]:
    """A Gateway API list of header (or query parameter) matches: name, value, type Exact | RegularExpression."""
    out = []
    for i, h in enumerate(ctx.seq(v, field)):
        hf = f"{field}[{i}]"
        h = ctx.mapping(h, hf)
        ctx.only(h, hf, ("name", "value", "type"), what)
        htype = h.get("type", "Exact")
        if htype not in ("Exact", "RegularExpression"):
            raise ctx.fail(f"{hf}.type", f"{htype!r}: use Exact or RegularExpression")
        if not h.get("name") or "value" not in h:
            raise ctx.fail(hf, f"needs name and value, e.g. {example}")
        if htype == "RegularExpression":
            ctx.regex(h["value"], f"{hf}.value")
        out.append(HeaderMatch(str(h["name"]), str(h["value"]), htype))
    return tuple(out)


def _route_match(ctx: Ctx, v: Any, field: str) -> RouteMatch:
    m = ctx.mapping(v, field)
    ctx.only(m, field, ("path", "method", "headers", "queryParams"), "a match")
    path = ctx.mapping(m.get("path"), f"{field}.path")
    ctx.only(path, f"{field}.path", ("type", "value"), "a path match")
    ptype, value = path.get("type", "PathPrefix"), str(path.get("value", "/"))
    if ptype not in _PATH_TYPES:
        raise ctx.fail(f"{field}.path.type", f"{ptype!r}: use {', '.join(_PATH_TYPES)}")
    if ptype == "RegularExpression":
        ctx.regex(value, f"{field}.path.value")
    elif not value.startswith("/"):
        raise ctx.fail(f"{field}.path.value", f"{value!r} must start with '/'")
    method = m.get("method")
    if method is not None and not _METHOD.match(str(method)):
        raise ctx.fail(f"{field}.method", f"{method!r} is not an HTTP method; use e.g. GET or POST")
    headers = _name_value_matches(ctx, m.get("headers"), f"{field}.headers", "a header match", "{name: x-canary, value: \"1\"}")
    query = _name_value_matches(ctx, m.get("queryParams"), f"{field}.queryParams", "a query parameter match",
                                "{name: animal, value: whale}")
    return RouteMatch(ptype, value, str(method) if method else None, headers, query)


def _backend_ref(ctx: Ctx, v: Any, field: str, legacy: bool) -> BackendRef:
    b = ctx.mapping(v, field)
    ctx.only(b, field, ("name", "port", "weight", "kind", "group", *(() if legacy else ("namespace", "filters"))), "a backendRef")
    req_headers = None
    for i, f in enumerate(ctx.seq(b.get("filters"), f"{field}.filters")):
        ff = f"{field}.filters[{i}]"
        f = ctx.mapping(f, ff)
        if f.get("type") != "RequestHeaderModifier":
            raise ctx.fail(f"{ff}.type", f"{f.get('type')!r} is not supported on a backendRef; use RequestHeaderModifier")
        ctx.only(f, ff, ("type", "requestHeaderModifier"), "a filter")
        req_headers = _header_modifier(ctx, f.get("requestHeaderModifier"), f"{ff}.requestHeaderModifier")
    kind, group = str(b.get("kind", "Service")), str(b.get("group", ""))
    if legacy and (kind != "Service" or group not in ("", "core")):
        raise ctx.fail(f"{field}.kind", "only Services are backends; remove kind/group or use kind: Service")
    port = ctx.port(b["port"], f"{field}.port") if "port" in b else None
    if port is None and kind == "Service":
        raise ctx.fail(f"{field}.port", "is required: the Service port, e.g. 80")
    ns = ctx.name(b["namespace"], f"{field}.namespace", "team-a", "a namespace") if "namespace" in b else ""
    return BackendRef(ctx.name(b.get("name"), f"{field}.name", "reviews-v2"), port,
                      ctx.count(b.get("weight", 1), f"{field}.weight", 0, 1_000_000), ns, kind, "" if group == "core" else group,
                      req_headers)


def _retry(ctx: Ctx, v: Any, field: str) -> Retry:
    r = ctx.mapping(v, field)
    ctx.only(r, field, ("attempts", "perTryTimeout", "codes", "retryOn"), "retry",
             {"backoff": "Envoy's default backoff (25 ms base) is used; remove backoff"})
    codes = tuple(ctx.count(c, f"{field}.codes[{i}]", 400, 599) for i, c in enumerate(ctx.seq(r.get("codes"), f"{field}.codes")))
    on = tuple(str(x) for x in ctx.seq(r.get("retryOn"), f"{field}.retryOn"))
    for i, cond in enumerate(on):
        if cond not in RETRY_ON:
            raise ctx.fail(f"{field}.retryOn[{i}]", f"{cond!r} is not an Envoy retry condition; use one of {', '.join(RETRY_ON)}")
    per_try = ctx.duration_ms(r["perTryTimeout"], f"{field}.perTryTimeout") if "perTryTimeout" in r else 0
    return Retry(ctx.count(r.get("attempts", 1), f"{field}.attempts", 0, 10), per_try, codes, on)


def _headers_list(ctx: Ctx, v: Any, field: str) -> tuple[tuple[str, str], ...]:
    out = []
    for i, h in enumerate(ctx.seq(v, field)):
        hf = f"{field}[{i}]"
        h = ctx.mapping(h, hf)
        ctx.only(h, hf, ("name", "value"), "a header")
        if not _HEADER_NAME.match(str(h.get("name", ""))) or not isinstance(h.get("value", ""), str):
            raise ctx.fail(hf, "needs a header name (letters, digits, '-') and a string value, e.g. {name: x-env, value: prod}")
        out.append((str(h["name"]), str(h.get("value", ""))))
    return tuple(out)


def _header_modifier(ctx: Ctx, v: Any, field: str) -> HeaderModifier:
    m = ctx.mapping(v, field)
    ctx.only(m, field, ("set", "add", "remove"), "a header modifier")
    remove = tuple(str(x) for x in ctx.seq(m.get("remove"), f"{field}.remove"))
    for i, x in enumerate(remove):
        if not _HEADER_NAME.match(x):
            raise ctx.fail(f"{field}.remove[{i}]", f"{x!r} is not a header name")
    return HeaderModifier(_headers_list(ctx, m.get("set"), f"{field}.set"), _headers_list(ctx, m.get("add"), f"{field}.add"), remove)


def _path_modifier(ctx: Ctx, v: Any, field: str, matches: tuple[RouteMatch, ...]) -> tuple[str, str]:
    p = ctx.mapping(v, field)
    ctx.only(p, field, ("type", "replaceFullPath", "replacePrefixMatch"), "a path modifier")
    ptype = p.get("type")
    if ptype == "ReplaceFullPath":
        value = str(p.get("replaceFullPath", ""))
    elif ptype == "ReplacePrefixMatch":
        value = str(p.get("replacePrefixMatch", ""))
        if any(m.path_type != "PathPrefix" for m in matches):
            raise ctx.fail(f"{field}.type", "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
    else:
        raise ctx.fail(f"{field}.type", f"{ptype!r}: use ReplaceFullPath or ReplacePrefixMatch")
    if not value.startswith("/"):
        raise ctx.fail(field, f"{value!r}: the path must start with '/'")
    return str(ptype), value


def _hostname(ctx: Ctx, v: Any, field: str, wildcard: bool = True) -> str:
    host = str(v)
    if not _HOST.match(host) or len(host) > 253 or (not wildcard and host.startswith("*")):
        raise ctx.fail(field, f"{host!r} is not a hostname; use e.g. shop.example.com" + (" or *.example.com" if wildcard else ""))
    return host


def _filters(ctx: Ctx, v: Any, field: str, matches: tuple[RouteMatch, ...]) -> RouteFilters:
    req = resp = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    for i, f in enumerate(ctx.seq(v, field)):
        ff = f"{field}[{i}]"
        f = ctx.mapping(f, ff)
        ftype = str(f.get("type"))
        key = ftype[:1].lower() + ftype[1:]
        if ftype == "URLRewrite":
            key = "urlRewrite"
        if ftype not in FILTER_TYPES:
            raise ctx.fail(f"{ff}.type", f"{ftype!r} is not supported; use {', '.join(FILTER_TYPES)}")
        ctx.only(f, ff, ("type", key), "a filter")
        body = ctx.mapping(f.get(key), f"{ff}.{key}")
        if ftype == "RequestHeaderModifier":
            req = _header_modifier(ctx, body, f"{ff}.{key}")
        elif ftype == "ResponseHeaderModifier":
            resp = _header_modifier(ctx, body, f"{ff}.{key}")
        elif ftype == "RequestRedirect":
            ctx.only(body, f"{ff}.{key}", ("scheme", "hostname", "path", "port", "statusCode"), "a redirect")
            scheme = body.get("scheme")
            if scheme is not None and scheme not in ("http", "https"):
                raise ctx.fail(f"{ff}.{key}.scheme", f"{scheme!r}: use http or https")
            ptype, path = _path_modifier(ctx, body["path"], f"{ff}.{key}.path", matches) if "path" in body else (None, None)
            redirect = Redirect(scheme, _hostname(ctx, body["hostname"], f"{ff}.{key}.hostname", False) if "hostname" in body else None,
                                ctx.port(body["port"], f"{ff}.{key}.port") if "port" in body else None, ptype, path,
                                int(body.get("statusCode", 302)) if body.get("statusCode", 302) in REDIRECT_CODES else
                                _bad(ctx, f"{ff}.{key}.statusCode", "use 301, 302, 303, 307 or 308"))
        else:
            ctx.only(body, f"{ff}.{key}", ("hostname", "path"), "a rewrite")
            ptype, path = _path_modifier(ctx, body["path"], f"{ff}.{key}.path", matches) if "path" in body else (None, None)
            rewrite = Rewrite(_hostname(ctx, body["hostname"], f"{ff}.{key}.hostname", False) if "hostname" in body else None,
                              ptype, path)
    if redirect is not None and rewrite is not None:
        raise ctx.fail(field, "RequestRedirect and URLRewrite cannot be used together in one rule")
    return RouteFilters(req, resp, redirect, rewrite)


def _bad(ctx: Ctx, field: str, fix: str) -> int:
    raise ctx.fail(field, f"invalid value; {fix}")


def _route_rule(ctx: Ctx, v: Any, field: str, legacy: bool) -> RouteRule:
    r = ctx.mapping(v, field)
    ctx.only(r, field, ("matches", "backendRefs", "timeouts", "retry", *(() if legacy else ("filters", "name"))), "a rule",
             {"sessionPersistence": "Webb does not pin sessions yet; use a Service's sessionAffinity: ClientIP"})
    matches = tuple(_route_match(ctx, m, f"{field}.matches[{i}]")
                    for i, m in enumerate(ctx.seq(r.get("matches"), f"{field}.matches"))) or (RouteMatch(),)
    refs = tuple(_backend_ref(ctx, b, f"{field}.backendRefs[{i}]", legacy)
                 for i, b in enumerate(ctx.seq(r.get("backendRefs"), f"{field}.backendRefs")))
    filters = _filters(ctx, r.get("filters"), f"{field}.filters", matches)
    if not refs and legacy:  # Gateway API: a rule without backends answers 500 (or redirects)
        raise ctx.fail(f"{field}.backendRefs", "needs at least one backend, e.g. [{name: web, port: 80}]")
    timeouts = ctx.mapping(r.get("timeouts"), f"{field}.timeouts")
    ctx.only(timeouts, f"{field}.timeouts", ("request", "backendRequest"), "timeouts")
    timeout = ctx.duration_ms(timeouts["request"], f"{field}.timeouts.request") if "request" in timeouts else None
    backend = ctx.duration_ms(timeouts["backendRequest"], f"{field}.timeouts.backendRequest") if "backendRequest" in timeouts else None
    retry = _retry(ctx, r["retry"], f"{field}.retry") if "retry" in r else None
    return RouteRule(matches, refs, timeout, retry, filters, backend)


def _parent_ref(ctx: Ctx, v: Any, f: str, legacy: bool) -> ParentRef:
    p = ctx.mapping(v, f)
    ctx.only(p, f, ("name", "port", "kind", "group", *(() if legacy else ("namespace", "sectionName"))), "a parentRef")
    kind = str(p.get("kind", "Service" if legacy else "Gateway"))
    group = str(p.get("group", "" if kind == "Service" else GATEWAY_GROUP))
    if legacy and kind != "Service":
        raise ctx.fail(f"{f}.kind", "a MeshRoute attaches to a Service; use kind: Service (or leave it out)")
    if (kind, group) not in (("Service", ""), ("Service", "core"), ("Gateway", GATEWAY_GROUP)):
        raise ctx.fail(f"{f}.kind", f"{group + '/' if group else ''}{kind}: a route attaches to a Gateway "
                       f"({GATEWAY_GROUP}) or a Service (group \"\")")
    port = ctx.port(p["port"], f"{f}.port") if "port" in p else None
    ns = ctx.name(p["namespace"], f"{f}.namespace", "infra", "a namespace") if "namespace" in p else ""
    section = ctx.name(p["sectionName"], f"{f}.sectionName", "http", "a listener name") if "sectionName" in p else ""
    return ParentRef(ctx.name(p.get("name"), f"{f}.name", "reviews", "a name"), port, kind, ns, section)


def _route_head(ctx: Ctx, spec: dict[str, Any], legacy: bool, what: str) -> tuple[tuple[ParentRef, ...], tuple[str, ...]]:
    """parentRefs (at least one) and hostnames: the part every route kind shares."""
    parents = tuple(_parent_ref(ctx, p, f"spec.parentRefs[{i}]", legacy)
                    for i, p in enumerate(ctx.seq(spec.get("parentRefs"), "spec.parentRefs")))
    if not parents:
        raise ctx.fail("spec.parentRefs", f"needs the {what} this route is for, e.g. [{{name: shop}}]")
    hostnames = tuple(_hostname(ctx, h, f"spec.hostnames[{i}]") for i, h in enumerate(ctx.seq(spec.get("hostnames"), "spec.hostnames")))
    return parents, hostnames


def _route(ctx: Ctx, kind: str, ns: str, name: str, spec: dict[str, Any], generation: int) -> Route:
    legacy = kind == "MeshRoute"
    ctx.only(spec, "spec", ("parentRefs", "rules", *(() if legacy else ("hostnames",))), f"{kind} spec")
    parents, hostnames = _route_head(ctx, spec, legacy, "Service or Gateway")
    rules = tuple(_route_rule(ctx, r, f"spec.rules[{i}]", legacy) for i, r in enumerate(ctx.seq(spec.get("rules"), "spec.rules")))
    if legacy and not rules:
        raise ctx.fail("spec.rules", "needs at least one rule with backendRefs")
    if not rules:  # Gateway API: no rule is one rule matching every request, without backends (404)
        rules = (RouteRule((RouteMatch(),), ()),)
    return Route(ns, name, parents, rules, hostnames, kind, generation)


_GRPC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _grpc_match(ctx: Ctx, v: Any, field: str) -> RouteMatch:
    """A GRPCRouteMatch as the path match it is: /<service>/<method>."""
    m = ctx.mapping(v, field)
    ctx.only(m, field, ("method", "headers"), "a match")
    method = ctx.mapping(m.get("method"), f"{field}.method")
    ctx.only(method, f"{field}.method", ("type", "service", "method"), "a method match")
    mtype = str(method.get("type", "Exact"))
    svc, meth = method.get("service"), method.get("method")
    if mtype not in ("Exact", "RegularExpression"):
        raise ctx.fail(f"{field}.method.type", f"{mtype!r}: use Exact or RegularExpression")
    for k, val in (("service", svc), ("method", meth)):
        if val is None:
            continue
        if mtype == "Exact" and not _GRPC_NAME.match(str(val)):
            raise ctx.fail(f"{field}.method.{k}", f"{val!r} is not a gRPC {k} name, e.g. 'grpc.health.v1.Health' / 'Check'")
        if mtype == "RegularExpression":
            ctx.regex(val, f"{field}.method.{k}")
    if method and svc is None and meth is None:
        raise ctx.fail(f"{field}.method", "needs service or method (or leave method out to match every call)")
    headers = _route_match(ctx, {"headers": m.get("headers")}, field).headers
    if not method:
        return RouteMatch("PathPrefix", "/", None, headers)
    if mtype == "Exact" and svc is not None and meth is not None:
        return RouteMatch("Exact", f"/{svc}/{meth}", None, headers)
    if mtype == "Exact" and meth is None:
        return RouteMatch("Prefix", f"/{svc}/", None, headers)
    s_re = (re.escape(str(svc)) if mtype == "Exact" else str(svc)) if svc is not None else "[^/]+"
    m_re = (re.escape(str(meth)) if mtype == "Exact" else str(meth)) if meth is not None else "[^/]+"
    return RouteMatch("RegularExpression", f"/{s_re}/{m_re}", None, headers)


def _grpc_route(ctx: Ctx, ns: str, name: str, spec: dict[str, Any], generation: int) -> Route:
    ctx.only(spec, "spec", ("parentRefs", "rules", "hostnames"), "GRPCRoute spec")
    parents, hostnames = _route_head(ctx, spec, False, "Gateway or Service")
    rules = []
    for i, r in enumerate(ctx.seq(spec.get("rules"), "spec.rules")):
        f = f"spec.rules[{i}]"
        r = ctx.mapping(r, f)
        ctx.only(r, f, ("matches", "backendRefs", "filters", "name"), "a rule",
                 {"sessionPersistence": "Webb does not pin sessions yet"})
        matches = tuple(_grpc_match(ctx, m, f"{f}.matches[{j}]") for j, m in enumerate(ctx.seq(r.get("matches"), f"{f}.matches")))
        for j, flt in enumerate(ctx.seq(r.get("filters"), f"{f}.filters")):
            if not isinstance(flt, dict) or flt.get("type") not in ("RequestHeaderModifier", "ResponseHeaderModifier"):
                raise ctx.fail(f"{f}.filters[{j}].type", "use RequestHeaderModifier or ResponseHeaderModifier (gRPC routes)")
        filters = _filters(ctx, r.get("filters"), f"{f}.filters", matches)
        refs = tuple(_backend_ref(ctx, b, f"{f}.backendRefs[{j}]", False)
                     for j, b in enumerate(ctx.seq(r.get("backendRefs"), f"{f}.backendRefs")))
        rules.append(RouteRule(matches or (RouteMatch(),), refs, None, None, filters))
    return Route(ns, name, parents, tuple(rules) or (RouteRule((RouteMatch(),), ()),), hostnames, "GRPCRoute", generation)


def _tls_route(ctx: Ctx, ns: str, name: str, spec: dict[str, Any], generation: int) -> Route:
    """TLS passthrough: the ClientHello's SNI picks the route (``hostnames``), the stream goes to the backends as is."""
    ctx.only(spec, "spec", ("parentRefs", "rules", "hostnames"), "TLSRoute spec")
    parents, hostnames = _route_head(ctx, spec, False, "Gateway")
    rules = []
    for i, r in enumerate(ctx.seq(spec.get("rules"), "spec.rules")):
        f = f"spec.rules[{i}]"
        r = ctx.mapping(r, f)
        ctx.only(r, f, ("backendRefs", "name"), "a rule")
        refs = tuple(_backend_ref(ctx, b, f"{f}.backendRefs[{j}]", False)
                     for j, b in enumerate(ctx.seq(r.get("backendRefs"), f"{f}.backendRefs")))
        rules.append(RouteRule((RouteMatch(),), refs))
    return Route(ns, name, parents, tuple(rules) or (RouteRule((RouteMatch(),), ()),), hostnames, "TLSRoute", generation)


def _gateway_class(ctx: Ctx, name: str, spec: dict[str, Any], generation: int) -> GatewayClass:
    ctx.only(spec, "spec", ("controllerName", "description", "parametersRef"), "GatewayClass spec")
    if "parametersRef" in spec:
        raise ctx.fail("spec.parametersRef", "is not supported: Webb's GatewayClass takes no parameters; remove it")
    controller = spec.get("controllerName")
    if not isinstance(controller, str) or "/" not in controller:
        raise ctx.fail("spec.controllerName", f"{controller!r}: use a domain-prefixed path, e.g. {GATEWAY_CONTROLLER}")
    return GatewayClass(name, controller, generation)


def _cert_ref(ctx: Ctx, v: Any, f: str) -> CertRef:
    c = ctx.mapping(v, f)
    ctx.only(c, f, ("name", "namespace", "kind", "group"), "a certificateRef")
    ns = ctx.name(c["namespace"], f"{f}.namespace", "infra", "a namespace") if "namespace" in c else ""
    return CertRef(ctx.subdomain(c.get("name"), f"{f}.name", "shop-tls", "a Secret name"), ns,
                   str(c.get("kind", "Secret")), str(c.get("group", "")))


def _listener(ctx: Ctx, v: Any, f: str) -> Listener:
    m = ctx.mapping(v, f)
    ctx.only(m, f, ("name", "hostname", "port", "protocol", "tls", "allowedRoutes"), "a listener")
    name = ctx.name(m.get("name"), f"{f}.name", "http", "a listener name")
    protocol = str(m.get("protocol", ""))
    if not protocol:
        raise ctx.fail(f"{f}.protocol", "is required: HTTP, HTTPS or TLS")
    host = _hostname(ctx, m["hostname"], f"{f}.hostname") if m.get("hostname") else ""
    tls = ctx.mapping(m.get("tls"), f"{f}.tls")
    ctx.only(tls, f"{f}.tls", ("mode", "certificateRefs", "options"), "tls")
    mode = str(tls.get("mode", "Terminate")) if tls or protocol in ("HTTPS", "TLS") else ""
    if mode and mode not in ("Terminate", "Passthrough"):
        raise ctx.fail(f"{f}.tls.mode", f"{mode!r}: use Terminate or Passthrough")
    certs = tuple(_cert_ref(ctx, c, f"{f}.tls.certificateRefs[{i}]")
                  for i, c in enumerate(ctx.seq(tls.get("certificateRefs"), f"{f}.tls.certificateRefs")))
    allowed = ctx.mapping(m.get("allowedRoutes"), f"{f}.allowedRoutes")
    ctx.only(allowed, f"{f}.allowedRoutes", ("namespaces", "kinds"), "allowedRoutes")
    nss = ctx.mapping(allowed.get("namespaces"), f"{f}.allowedRoutes.namespaces")
    ctx.only(nss, f"{f}.allowedRoutes.namespaces", ("from", "selector"), "allowedRoutes.namespaces")
    frm = str(nss.get("from", "Same"))
    if frm not in ("Same", "All", "Selector"):
        raise ctx.fail(f"{f}.allowedRoutes.namespaces.from", f"{frm!r}: use Same, All or Selector")
    selector = parse_selector(ctx, nss.get("selector"), f"{f}.allowedRoutes.namespaces.selector") if frm == "Selector" else None
    kinds = []
    for i, k in enumerate(ctx.seq(allowed.get("kinds"), f"{f}.allowedRoutes.kinds")):
        kf = f"{f}.allowedRoutes.kinds[{i}]"
        k = ctx.mapping(k, kf)
        ctx.only(k, kf, ("group", "kind"), "a route kind")
        kinds.append((str(k.get("group", GATEWAY_GROUP)), str(k.get("kind", ""))))
    return Listener(name, ctx.port(m.get("port"), f"{f}.port"), protocol, host, mode, certs, frm, selector, tuple(kinds))


def _assigned(status: Any) -> tuple[str, ...]:
    """The addresses a Gateway's status already lists (kept when still free: a Gateway does not move)."""
    if not isinstance(status, dict) or not isinstance(status.get("addresses"), list):
        return ()
    return tuple(str(a["value"]) for a in status["addresses"] if isinstance(a, dict) and isinstance(a.get("value"), str))


def _gateway(ctx: Ctx, ns: str, name: str, spec: dict[str, Any], generation: int, created: str = "",
             status: Any = None) -> Gateway:
    ctx.only(spec, "spec", ("gatewayClassName", "listeners", "addresses", "infrastructure"), "Gateway spec")
    listeners = tuple(_listener(ctx, v, f"spec.listeners[{i}]") for i, v in enumerate(ctx.seq(spec.get("listeners"), "spec.listeners")))
    if not listeners:
        raise ctx.fail("spec.listeners", "needs at least one listener, e.g. [{name: http, port: 80, protocol: HTTP}]")
    names = [x.name for x in listeners]
    if len(set(names)) != len(names):
        raise ctx.fail("spec.listeners", "listener names must be unique within the Gateway")
    addresses = []
    for i, a in enumerate(ctx.seq(spec.get("addresses"), "spec.addresses")):
        af = f"spec.addresses[{i}]"
        a = ctx.mapping(a, af)
        ctx.only(a, af, ("type", "value"), "an address")
        addresses.append(f"{a.get('type', 'IPAddress')}:{a.get('value', '')}")
    return Gateway(ns, name, ctx.subdomain(spec.get("gatewayClassName"), "spec.gatewayClassName", "webb", "a GatewayClass name"),
                   listeners, tuple(addresses), generation, created, _assigned(status))


def _grant(ctx: Ctx, ns: str, name: str, spec: dict[str, Any]) -> ReferenceGrant:
    ctx.only(spec, "spec", ("from", "to"), "ReferenceGrant spec")
    froms, tos = [], []
    for i, x in enumerate(ctx.seq(spec.get("from"), "spec.from")):
        x = ctx.mapping(x, f"spec.from[{i}]")
        ctx.only(x, f"spec.from[{i}]", ("group", "kind", "namespace"), "a from")
        froms.append((str(x.get("group", "")), str(x.get("kind", "")), str(x.get("namespace", ""))))
    for i, x in enumerate(ctx.seq(spec.get("to"), "spec.to")):
        x = ctx.mapping(x, f"spec.to[{i}]")
        ctx.only(x, f"spec.to[{i}]", ("group", "kind", "name"), "a to")
        tos.append((str(x.get("group", "")), str(x.get("kind", "")), str(x.get("name", ""))))
    if not froms or not tos:
        raise ctx.fail("spec", "a ReferenceGrant needs from and to")
    return ReferenceGrant(ns, name, tuple(froms), tuple(tos))


def _mtls_mode(ctx: Ctx, v: Any, field: str) -> str:
    if v not in MTLS_MODES:
        raise ctx.fail(field, f"{v!r} is not a mode; use {', '.join(MTLS_MODES[:-1])} or {MTLS_MODES[-1]}")
    return str(v)


def _mesh_tls(ctx: Ctx, ns: str, name: str, spec: dict[str, Any]) -> MeshTLS:
    ctx.only(spec, "spec", ("mode",), "MeshTLS spec")
    if "mode" not in spec:
        raise ctx.fail("spec.mode", f"is required; use {', '.join(MTLS_MODES[:-1])} or {MTLS_MODES[-1]}")
    return MeshTLS(ns, name, _mtls_mode(ctx, spec["mode"], "spec.mode"))


def _namespace(ctx: Ctx, name: str, labels: tuple[tuple[str, str], ...]) -> Namespace:
    mode = dict(labels).get(MTLS_LABEL)
    if mode is not None:  # the label shortcut of a MeshTLS: checked like spec.mode
        _mtls_mode(ctx, mode, f"metadata.labels.{MTLS_LABEL}")
    return Namespace(name, labels)


def _ingress_backend(ctx: Ctx, v: Any, field: str) -> IngressBackend:
    svc = ctx.mapping(ctx.mapping(v, field).get("service"), f"{field}.service")
    if not svc:
        raise ctx.fail(f"{field}.service", "is required (resource backends are not supported)")
    port = ctx.mapping(svc.get("port"), f"{field}.service.port")
    if "number" in port:
        return IngressBackend(ctx.name(svc.get("name"), f"{field}.service.name", "web"),
                              ctx.port(port["number"], f"{field}.service.port.number"))
    if not port.get("name"):
        raise ctx.fail(f"{field}.service.port", "needs number or name, e.g. {number: 80}")
    return IngressBackend(ctx.name(svc.get("name"), f"{field}.service.name", "web"), str(port["name"]))


def _ingress_host(ctx: Ctx, v: Any, field: str) -> str:
    host = str(v or "")
    if host and not _HOST.match(host):
        raise ctx.fail(field, f"{host!r} is not a DNS name; use e.g. shop.example.com or *.example.com")
    return host


def _ingress_rule(ctx: Ctx, v: Any, field: str) -> IngressHostRule:
    r = ctx.mapping(v, field)
    paths = []
    http = ctx.mapping(r.get("http"), f"{field}.http")
    for i, p in enumerate(ctx.seq(http.get("paths"), f"{field}.http.paths")):
        pf = f"{field}.http.paths[{i}]"
        p = ctx.mapping(p, pf)
        ptype = p.get("pathType")
        if ptype not in ("Exact", "Prefix", "ImplementationSpecific"):
            raise ctx.fail(f"{pf}.pathType", f"{ptype!r}: use Exact, Prefix or ImplementationSpecific")
        path = str(p.get("path", "/"))
        if not path.startswith("/"):
            raise ctx.fail(f"{pf}.path", f"{path!r} must start with '/'")
        paths.append(IngressPath(path, ptype, _ingress_backend(ctx, p.get("backend"), f"{pf}.backend")))
    return IngressHostRule(_ingress_host(ctx, r.get("host"), f"{field}.host"), tuple(paths))


def _ingress(ctx: Ctx, ns: str, name: str, spec: dict[str, Any]) -> Ingress:
    ctx.only(spec, "spec", ("ingressClassName", "rules", "tls", "defaultBackend"), "Ingress spec")
    rules = tuple(_ingress_rule(ctx, r, f"spec.rules[{i}]") for i, r in enumerate(ctx.seq(spec.get("rules"), "spec.rules")))
    tls = []
    for i, t in enumerate(ctx.seq(spec.get("tls"), "spec.tls")):
        t = ctx.mapping(t, f"spec.tls[{i}]")
        if not t.get("secretName"):
            raise ctx.fail(f"spec.tls[{i}].secretName", "is required: a kubernetes.io/tls Secret in this namespace")
        hosts = tuple(_ingress_host(ctx, h, f"spec.tls[{i}].hosts[{j}]")
                      for j, h in enumerate(ctx.seq(t.get("hosts"), f"spec.tls[{i}].hosts")))
        if not hosts:
            raise ctx.fail(f"spec.tls[{i}].hosts", "name the hosts this certificate serves (SNI), e.g. [shop.example.com]")
        tls.append(IngressTlsEntry(hosts, str(t["secretName"])))
    default = _ingress_backend(ctx, spec["defaultBackend"], "spec.defaultBackend") if spec.get("defaultBackend") else None
    return Ingress(ns, name, str(spec.get("ingressClassName") or ""), rules, tuple(tls), default)


def _secret_bytes(ctx: Ctx, doc: dict[str, Any], key: str) -> bytes:
    """data (base64) or stringData; the error never shows the value (it may be a key)."""
    string_data = ctx.mapping(doc.get("stringData"), "stringData")
    if key in string_data:
        return str(string_data[key]).encode()
    data = ctx.mapping(doc.get("data"), "data")
    if key not in data:
        raise ctx.fail(f"data.{key}", "is required for type kubernetes.io/tls (base64 of the PEM)")
    try:
        return base64.b64decode(str(data[key]), validate=True)
    except (binascii.Error, ValueError):
        raise ctx.fail(f"data.{key}", "is not valid base64 (value not shown); encode the PEM with base64 -w0") from None


def _secret(ctx: Ctx, ns: str, name: str, doc: dict[str, Any]) -> Secret | None:
    """kubernetes.io/tls Secrets are kept (for Ingress TLS); other types are accepted and ignored."""
    if doc.get("type") != "kubernetes.io/tls":
        return None
    cert, key = _secret_bytes(ctx, doc, "tls.crt"), _secret_bytes(ctx, doc, "tls.key")
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise ctx.fail("data.tls.crt", "is not a PEM certificate (no BEGIN CERTIFICATE line)")
    if b"PRIVATE KEY-----" not in key:
        raise ctx.fail("data.tls.key", "is not a PEM private key (value not shown)")
    return Secret(ns, name, cert, key)


def parse_object(doc: dict[str, Any], base_dir: Path | None = None) -> Obj | None:
    kind = doc.get("kind")
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}  # not a mapping: refused below, by the helper
    name = str(meta.get("name", ""))
    ns = "" if kind in CLUSTER_SCOPED else str(meta.get("namespace") or "default")
    where = f"{kind} {name}" if kind in CLUSTER_SCOPED else f"{kind} {ns}/{name}"
    ctx = Ctx(where)
    if kind not in KINDS:
        raise ctx.fail("kind", f"{kind!r} is not handled by the standalone source; use one of {', '.join(KINDS)}")
    ctx.mapping(doc.get("metadata"), "metadata")
    if kind in SUBDOMAIN_NAMED:  # names Kubernetes allows to have dots (Helm's release Secrets do)
        ctx.subdomain(name, "metadata.name", "web-1", f"a {kind} name")
    elif not name or len(name) > 63 or not _DNS1123.match(name):
        raise ctx.fail("metadata.name", f"{name!r} must be a DNS-1123 label: at most 63 lowercase letters, digits "
                       "and '-', starting and ending alphanumeric, e.g. 'web-1'")
    if kind not in CLUSTER_SCOPED and (len(ns) > 63 or not _DNS1123.match(ns)):
        raise ctx.fail("metadata.namespace", f"{ns!r} must be a DNS-1123 label: at most 63 lowercase letters, digits "
                       "and '-', starting and ending alphanumeric, e.g. 'team-a'")
    want = API_VERSIONS.get(str(kind))
    if want and doc.get("apiVersion") not in ((want,) if isinstance(want, str) else want):
        raise ctx.fail("apiVersion", f"{doc.get('apiVersion')!r}: use {want if isinstance(want, str) else ' or '.join(want)}")
    gen = meta.get("generation")
    generation = gen if isinstance(gen, int) and not isinstance(gen, bool) else 0
    labels = ctx.labels(meta.get("labels"), "metadata.labels")
    if kind == "Secret":
        return _secret(ctx, ns, name, doc)
    if kind == "EndpointSlice":
        return _endpoint_slice(ctx, ns, name, dict(labels), doc)
    spec = ctx.mapping(doc.get("spec"), "spec")
    if kind in ("MeshRoute", "HTTPRoute"):
        return _route(ctx, kind, ns, name, spec, generation)
    if kind == "GRPCRoute":
        return _grpc_route(ctx, ns, name, spec, generation)
    if kind == "TLSRoute":
        return _tls_route(ctx, ns, name, spec, generation)
    if kind == "GatewayClass":
        return _gateway_class(ctx, name, spec, generation)
    if kind == "Gateway":
        return _gateway(ctx, ns, name, spec, generation, str(meta.get("creationTimestamp") or ""), doc.get("status"))
    if kind == "ReferenceGrant":
        return _grant(ctx, ns, name, spec)
    if kind == "MeshTLS":
        return _mesh_tls(ctx, ns, name, spec)
    if kind == "Ingress":
        return _ingress(ctx, ns, name, spec)
    if kind == "Namespace":
        return _namespace(ctx, name, labels)
    if kind == "Pod":
        return _pod(ctx, ns, name, labels, spec, base_dir)
    if kind == "Service":
        return _service(ctx, ns, name, spec)
    return _policy(ctx, ns, name, spec)


def _pod(ctx: Ctx, ns: str, name: str, labels: tuple[tuple[str, str], ...], spec: dict[str, Any],
         base_dir: Path | None) -> Pod:
    containers = ctx.seq(spec.get("containers"), "spec.containers")
    if len(containers) != 1:
        raise ctx.fail("spec.containers", "the local runtime runs exactly one container per pod")
    c = ctx.mapping(containers[0], "spec.containers[0]")
    argv = [str(x) for x in ctx.seq(c.get("command"), "spec.containers[0].command")]
    argv += [str(x) for x in ctx.seq(c.get("args"), "spec.containers[0].args")]
    if not argv:
        raise ctx.fail("spec.containers[0].command", "the local runtime needs a command to run")
    if base_dir is not None:  # paths relative to the manifest, like a build context
        argv = [str(base_dir / a) if a.startswith("./") else a for a in argv]
    ports = []
    for i, raw in enumerate(ctx.seq(c.get("ports"), "spec.containers[0].ports")):
        f = f"spec.containers[0].ports[{i}]"
        cp = ctx.mapping(raw, f)
        ports.append(ContainerPort(ctx.port(cp.get("containerPort"), f"{f}.containerPort"), str(cp.get("name", "")),
                                   ctx.protocol(cp.get("protocol"), f"{f}.protocol")))
    node = spec.get("nodeName") or ""
    if node:
        ctx.subdomain(node, "spec.nodeName", "node1", "a node name")
    sa = spec.get("serviceAccountName") or "default"
    ctx.subdomain(sa, "spec.serviceAccountName", "web", "a ServiceAccount name")
    return Pod(ns, name, labels, tuple(argv), tuple(ports), str(sa), node=node)


def _service(ctx: Ctx, ns: str, name: str, spec: dict[str, Any]) -> Service:
    sports: list[ServicePort] = []
    for i, p in enumerate(ctx.seq(spec.get("ports"), "spec.ports")):
        f = f"spec.ports[{i}]"
        p = ctx.mapping(p, f)
        port = ctx.port(p.get("port"), f"{f}.port")
        tp = p.get("targetPort", port)
        target: int | str = tp if isinstance(tp, str) and not tp.isdigit() else ctx.port(tp, f"{f}.targetPort")
        sports.append(ServicePort(port, target, ctx.protocol(p.get("protocol"), f"{f}.protocol"), str(p.get("name", "")),
                                  str(p.get("appProtocol", ""))))
    if not sports:
        raise ctx.fail("spec.ports", "a Service needs at least one port")
    headless = spec.get("clusterIP") == "None"  # no VIP: only routes reach its endpoints (through Envoy)
    v4, v6 = ("", "") if headless else _cluster_ips(ctx, spec)
    return Service(ns, name, ctx.labels(spec.get("selector"), "spec.selector"), tuple(sports),
                   cluster_ip=v4, cluster_ip6=v6, affinity_timeout_s=_affinity(ctx, spec), headless=headless)


def _endpoint_slice(ctx: Ctx, ns: str, name: str, labels: dict[str, str], doc: dict[str, Any]) -> EndpointSlice | None:
    """The ready addresses and ports of an EndpointSlice; None when it belongs to no Service
    (no kubernetes.io/service-name label) or its addresses are FQDNs (not balanced here)."""
    service = labels.get(SERVICE_NAME_LABEL, "")
    atype = doc.get("addressType")
    if atype not in ("IPv4", "IPv6", "FQDN"):
        raise ctx.fail("addressType", f"{atype!r}: use IPv4, IPv6 or FQDN")
    if not service or atype == "FQDN":
        return None
    addresses: list[str] = []
    for i, raw in enumerate(ctx.seq(doc.get("endpoints"), "endpoints")):
        ep = ctx.mapping(raw, f"endpoints[{i}]")
        ready = ctx.mapping(ep.get("conditions"), f"endpoints[{i}].conditions").get("ready")
        if ready is False:  # unset means ready (EndpointSlice API)
            continue
        for j, a in enumerate(ctx.seq(ep.get("addresses"), f"endpoints[{i}].addresses")):
            try:
                ip = ipaddress.ip_address(str(a))
            except ValueError:
                raise ctx.fail(f"endpoints[{i}].addresses[{j}]", f"{a!r} is not an IP address") from None
            if (ip.version == 4) != (atype == "IPv4"):
                raise ctx.fail(f"endpoints[{i}].addresses[{j}]", f"{a} is not an {atype} address (addressType)")
            addresses.append(str(ip))
    ports = []
    for i, raw in enumerate(ctx.seq(doc.get("ports"), "ports")):
        p = ctx.mapping(raw, f"ports[{i}]")
        ports.append((str(p.get("name") or ""), ctx.port(p.get("port"), f"ports[{i}].port"),
                      ctx.protocol(p.get("protocol"), f"ports[{i}].protocol")))
    return EndpointSlice(ns, name, service, str(atype), tuple(sorted(set(addresses))), tuple(ports))


def _cluster_ips(ctx: Ctx, spec: dict[str, Any]) -> tuple[str, str]:
    """(IPv4, IPv6) VIPs from spec.clusterIP / spec.clusterIPs; "" where not given."""
    ips = [str(x) for x in ctx.seq(spec.get("clusterIPs"), "spec.clusterIPs")]
    if spec.get("clusterIP"):
        ips.insert(0, str(spec["clusterIP"]))
    v4 = v6 = ""
    for i, ip in enumerate(ips):
        if ip == "None":
            raise ctx.fail("spec.clusterIP", "headless services are not load-balanced; they are not supported yet")
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise ctx.fail(f"spec.clusterIPs[{i}]" if i else "spec.clusterIP", f"{ip!r} is not an IP address") from None
        if addr.version == 4:
            v4 = v4 or ip
        else:
            v6 = v6 or ip
    return v4, v6


def _affinity(ctx: Ctx, spec: dict[str, Any]) -> int:
    kind = spec.get("sessionAffinity", "None")
    if kind not in ("None", "ClientIP"):
        raise ctx.fail("spec.sessionAffinity", f"{kind!r}: use None or ClientIP")
    if kind == "None":
        return 0
    cfg = ctx.mapping(ctx.mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig").get("clientIP"),
                      "spec.sessionAffinityConfig.clientIP")
    # Kubernetes' default: 3 hours
    return ctx.count(cfg.get("timeoutSeconds", 10800), "spec.sessionAffinityConfig.clientIP.timeoutSeconds", 1, 86400)


MAX_FILE_BYTES = 4 << 20  # a manifest file; Kubernetes stores objects up to 1.5 MiB
MAX_DEPTH = 64  # nesting of mappings and lists in one document
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when there (fast), else PyYAML's


def load_yaml(text: str, where: str) -> list[Any]:
    """The documents of a YAML text, failing closed: no aliases (``*name``: an alias bomb expands a few
    hundred bytes into gigabytes), no duplicate keys (YAML keeps the last one silently), at most
    ``MAX_DEPTH`` levels, at most ``MAX_FILE_BYTES``. Errors name ``where`` and the line."""
    if len(text) > MAX_FILE_BYTES:
        raise ManifestError(where, "(file)", f"is {len(text)} bytes; the limit is {MAX_FILE_BYTES} (split it into several files)")
    loader = _Loader(text)
    docs: list[Any] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            _check_node(node, where)
            docs.append(loader.construct_document(node))
    except yaml.YAMLError as e:
        raise ManifestError(where, "(file)", f"is not valid YAML: {e}") from None
    finally:
        loader.dispose()
    return docs


def _check_node(root: yaml.Node, where: str) -> None:
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        line = node.start_mark.line + 1
        if id(node) in seen:
            raise ManifestError(where, f"(line {line})", "YAML aliases (*name) are not accepted: write the value out")
        seen.add(id(node))
        if depth > MAX_DEPTH:
            raise ManifestError(where, f"(line {line})", f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in keys:
                        raise ManifestError(where, f"(line {k.start_mark.line + 1})",
                                            f"duplicate key {k.value!r} in one mapping: YAML would keep only the last; remove one")
                    keys.add(k.value)
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, depth + 1) for v in node.value)


def read_documents(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every YAML document of a file or of a directory's *.yaml / *.yml files, in name order."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    out: list[tuple[Path, dict[str, Any]]] = []
    for f in files:
        with f.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)  # never more than the limit in memory
        try:
            text = raw.decode()
        except UnicodeDecodeError as e:
            raise ManifestError(str(f), "(file)", f"is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        docs = load_yaml(text, str(f))
        for d in docs:
            if d is None:
                continue
            items = d.get("items") if isinstance(d, dict) and d.get("kind") == "List" else [d]
            for i, item in enumerate(items if isinstance(items, list) else [items]):
                if not isinstance(item, dict):
                    where = f"items[{i}]" if isinstance(d, dict) else "(document)"
                    raise ManifestError(str(f), where, "each YAML document (and each item of a List) must be a "
                                        "mapping with kind")
                out.append((f, item))
    return out
