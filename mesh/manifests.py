"""Kubernetes-style YAML → model objects, with errors that name the field and the fix."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import yaml

from mesh.model import (
    ContainerPort,
    HttpMatch,
    IngressRule,
    MeshPolicy,
    Namespace,
    Pod,
    PortRule,
    Requirement,
    Selector,
    Service,
    ServicePort,
)

API_GROUP = "webb.io"
MESH_VERSION = f"{API_GROUP}/v1alpha1"
KINDS = ("Namespace", "Pod", "Service", "MeshPolicy")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_METHOD = re.compile(r"^[A-Z]+$")
Obj = Namespace | Pod | Service | MeshPolicy


class ManifestError(ValueError):
    """``where``: "Kind ns/name"; ``field``: a JSON path into the object."""

    def __init__(self, where: str, field: str, problem: str) -> None:
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: {field}: {problem}")


class _Ctx:
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

    def labels(self, v: Any, field: str) -> tuple[tuple[str, str], ...]:
        m = self.mapping(v, field)
        for k, val in m.items():
            if not isinstance(val, str):
                raise self.fail(f"{field}.{k}", f"label values are strings; quote it: \"{val}\"")
        return tuple(sorted((str(k), str(val)) for k, val in m.items()))

    def port(self, v: Any, field: str) -> int:
        try:
            p = int(str(v))
        except ValueError:
            raise self.fail(field, f"{v!r} is not a port number; use 1-65535, e.g. \"80\"") from None
        if not 1 <= p <= 65535:
            raise self.fail(field, f"{p} is out of range; use 1-65535")
        return p

    def protocol(self, v: Any, field: str) -> str:
        p = str(v or "TCP").upper()
        if p not in ("TCP", "UDP", "ANY"):
            raise self.fail(field, f"{v!r} is not a protocol; use TCP, UDP or ANY")
        return p


def _selector(ctx: _Ctx, v: Any, field: str) -> Selector:
    m = ctx.mapping(v, field)
    unknown = set(m) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise ctx.fail(f"{field}.{sorted(unknown)[0]}", "unknown field; a selector has matchLabels and matchExpressions")
    labels = ctx.labels(m.get("matchLabels"), f"{field}.matchLabels")
    labels = tuple(sorted((k.removeprefix("k8s:"), val) for k, val in labels))
    exprs = []
    for i, e in enumerate(ctx.seq(m.get("matchExpressions"), f"{field}.matchExpressions")):
        f = f"{field}.matchExpressions[{i}]"
        e = ctx.mapping(e, f)
        op = e.get("operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ctx.fail(f"{f}.operator", f"{op!r} is not one of In, NotIn, Exists, DoesNotExist")
        if not e.get("key"):
            raise ctx.fail(f"{f}.key", "is required")
        values = tuple(str(x) for x in ctx.seq(e.get("values"), f"{f}.values"))
        if op in ("In", "NotIn") and not values:
            raise ctx.fail(f"{f}.values", f"operator {op} needs at least one value")
        exprs.append(Requirement(str(e["key"]).removeprefix("k8s:"), op, values))
    return Selector(labels, tuple(exprs))


def _http(ctx: _Ctx, v: Any, field: str) -> HttpMatch:
    m = ctx.mapping(v, field)
    unknown = set(m) - {"method", "path", "headers", "host"}
    if unknown:
        raise ctx.fail(f"{field}.{sorted(unknown)[0]}", "unknown field; an HTTP rule has method, path, headers")
    if "host" in m:
        raise ctx.fail(f"{field}.host", "host matching is not supported yet; remove it")
    method = m.get("method")
    if method is not None and not _METHOD.match(str(method)):
        raise ctx.fail(f"{field}.method", f"{method!r} is not an HTTP method; use e.g. GET or POST")
    path = m.get("path")
    if path is not None:
        try:
            re.compile(str(path))
        except re.error as e:
            raise ctx.fail(f"{field}.path", f"{path!r} is not a valid regular expression ({e})") from None
    headers = tuple(str(h) for h in ctx.seq(m.get("headers"), f"{field}.headers"))
    return HttpMatch(str(method) if method else None, str(path) if path is not None else None, headers)


def _policy(ctx: _Ctx, ns: str, name: str, spec: dict[str, Any]) -> MeshPolicy:
    if "endpointSelector" not in spec:
        raise ctx.fail("spec.endpointSelector", "is required; e.g. {matchLabels: {app: web}}")
    unknown = set(spec) - {"endpointSelector", "ingress", "description", "mode"}
    if unknown:
        raise ctx.fail(f"spec.{sorted(unknown)[0]}", "unknown field; MeshPolicy spec has endpointSelector, "
                       "ingress, description, mode")
    mode = spec.get("mode", "enforce")
    if mode not in ("enforce", "audit"):
        raise ctx.fail("spec.mode", f"{mode!r}: use enforce (deny what no rule allows) or audit (report, allow)")
    rules = []
    for i, r in enumerate(ctx.seq(spec.get("ingress"), "spec.ingress")):
        f = f"spec.ingress[{i}]"
        r = ctx.mapping(r, f)
        unknown = set(r) - {"fromEndpoints", "toPorts"}
        if unknown:
            raise ctx.fail(f"{f}.{sorted(unknown)[0]}", "unknown or unsupported field; use fromEndpoints, toPorts")
        froms = None
        if "fromEndpoints" in r:
            froms = tuple(_selector(ctx, s, f"{f}.fromEndpoints[{j}]")
                          for j, s in enumerate(ctx.seq(r["fromEndpoints"], f"{f}.fromEndpoints")))
        to_ports = []
        for j, tp in enumerate(ctx.seq(r.get("toPorts"), f"{f}.toPorts")):
            tf = f"{f}.toPorts[{j}]"
            tp = ctx.mapping(tp, tf)
            ports = []
            for k, p in enumerate(ctx.seq(tp.get("ports"), f"{tf}.ports")):
                pf = f"{tf}.ports[{k}]"
                p = ctx.mapping(p, pf)
                ports.append((ctx.port(p.get("port"), f"{pf}.port"), ctx.protocol(p.get("protocol"), f"{pf}.protocol")))
            http = None
            rules_m = ctx.mapping(tp.get("rules"), f"{tf}.rules")
            if "http" in rules_m:
                http = tuple(_http(ctx, h, f"{tf}.rules.http[{k}]")
                             for k, h in enumerate(ctx.seq(rules_m["http"], f"{tf}.rules.http")))
                if not ports:
                    raise ctx.fail(f"{tf}.ports", "HTTP rules need the ports they apply to, e.g. [{port: \"80\"}]")
            to_ports.append(PortRule(tuple(ports), http))
        rules.append(IngressRule(froms, tuple(to_ports)))
    return MeshPolicy(ns, name, _selector(ctx, spec["endpointSelector"], "spec.endpointSelector"), tuple(rules), mode)


def parse_object(doc: dict[str, Any], base_dir: Path | None = None) -> Obj:
    kind = doc.get("kind")
    meta = doc.get("metadata") or {}
    name = str(meta.get("name", ""))
    ns = str(meta.get("namespace") or "default")
    where = f"{kind} {name}" if kind == "Namespace" else f"{kind} {ns}/{name}"
    ctx = _Ctx(where)
    if kind not in KINDS:
        raise ctx.fail("kind", f"{kind!r} is not handled by the standalone source; use one of {', '.join(KINDS)}")
    if not name or not _DNS1123.match(name):
        raise ctx.fail("metadata.name", f"{name!r} must be a DNS-1123 label (lowercase letters, digits, '-')")
    if kind == "MeshPolicy" and doc.get("apiVersion") != MESH_VERSION:
        raise ctx.fail("apiVersion", f"{doc.get('apiVersion')!r}: use {MESH_VERSION}")
    labels = ctx.labels(meta.get("labels"), "metadata.labels")
    spec = ctx.mapping(doc.get("spec"), "spec")
    if kind == "Namespace":
        return Namespace(name, labels)
    if kind == "Pod":
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
        ports = tuple(
            ContainerPort(ctx.port(p.get("containerPort"), f"spec.containers[0].ports[{i}].containerPort"),
                          str(p.get("name", "")),
                          ctx.protocol(p.get("protocol"), f"spec.containers[0].ports[{i}].protocol"))
            for i, p in enumerate(ctx.seq(c.get("ports"), "spec.containers[0].ports")))
        return Pod(ns, name, labels, tuple(argv), ports, str(spec.get("serviceAccountName") or "default"))
    if kind == "Service":
        sports: list[ServicePort] = []
        for i, p in enumerate(ctx.seq(spec.get("ports"), "spec.ports")):
            f = f"spec.ports[{i}]"
            p = ctx.mapping(p, f)
            port = ctx.port(p.get("port"), f"{f}.port")
            tp = p.get("targetPort", port)
            target: int | str = tp if isinstance(tp, str) and not tp.isdigit() else ctx.port(tp, f"{f}.targetPort")
            sports.append(ServicePort(port, target, ctx.protocol(p.get("protocol"), f"{f}.protocol"), str(p.get("name", ""))))
        if not sports:
            raise ctx.fail("spec.ports", "a Service needs at least one port")
        v4, v6 = _cluster_ips(ctx, spec)
        return Service(ns, name, ctx.labels(spec.get("selector"), "spec.selector"), tuple(sports),
                       cluster_ip=v4, cluster_ip6=v6, affinity_timeout_s=_affinity(ctx, spec))
    return _policy(ctx, ns, name, spec)


def _cluster_ips(ctx: _Ctx, spec: dict[str, Any]) -> tuple[str, str]:
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


def _affinity(ctx: _Ctx, spec: dict[str, Any]) -> int:
    kind = spec.get("sessionAffinity", "None")
    if kind not in ("None", "ClientIP"):
        raise ctx.fail("spec.sessionAffinity", f"{kind!r}: use None or ClientIP")
    if kind == "None":
        return 0
    cfg = ctx.mapping(ctx.mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig").get("clientIP"),
                      "spec.sessionAffinityConfig.clientIP")
    timeout = cfg.get("timeoutSeconds", 10800)  # Kubernetes' default: 3 hours
    if not isinstance(timeout, int) or not 0 < timeout <= 86400:
        raise ctx.fail("spec.sessionAffinityConfig.clientIP.timeoutSeconds", f"{timeout!r}: use 1-86400 seconds")
    return timeout


def read_documents(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every YAML document of a file or of a directory's *.yaml / *.yml files, in name order."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    out: list[tuple[Path, dict[str, Any]]] = []
    for f in files:
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except yaml.YAMLError as e:
            raise ManifestError(str(f), "(file)", f"is not valid YAML: {e}") from None
        for d in docs:
            if d is None:
                continue
            if not isinstance(d, dict):
                raise ManifestError(str(f), "(document)", "each YAML document must be a mapping with kind")
            if d.get("kind") == "List":
                out.extend((f, item) for item in d.get("items") or [])
            else:
                out.append((f, d))
    return out
