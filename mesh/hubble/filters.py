"""flow.FlowFilter -> a predicate over flow.Flow, as Hubble's server reads them
(github.com/cilium/cilium pkg/hubble/filters): within one FlowFilter every field set must match (each
field: any of its values); a flow passes when it matches one whitelist filter (or there is none) and
no blacklist filter. Pure: no grpc.

A field Webb cannot judge (labels, identities, FQDNs, workloads, TCP flags, DNS, CEL ...: Webb's
flows do not carry them) is refused with FilterError naming it, rather than silently matching
nothing or everything. Regexes (HTTP path, URL) are RE2, the engine Hubble's Go server uses, so a
hostile pattern cannot make the server backtrack for ever.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import re2

from mesh.hubble.convert import ACCESS_LOG

Pred = Callable[[Any], bool]


class FilterError(ValueError):
    """A filter Webb refuses (unsupported or malformed): the client is told why."""


def _namespaced(values: Sequence[str], get: Callable[[Any], tuple[str, str]], field: str) -> Pred:
    """Hubble's pod/service filter: "ns/prefix", "ns/" (a namespace), "prefix" (namespace default)."""
    wanted = []
    for v in values:
        if not v:
            raise FilterError(f"{field}: a name must not be empty")
        ns, sep, prefix = v.partition("/")
        wanted.append((ns, prefix) if sep else ("default", ns))

    def pred(fl: Any) -> bool:
        ns, name = get(fl)
        if not ns and not name:
            return False
        return any((not p or name.startswith(p)) and (not n or n == ns) for n, p in wanted)
    return pred


def _ips(values: Sequence[str], get: Callable[[Any], str], field: str) -> Pred:
    nets = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise FilterError(f"{field}: {v!r} is neither an IP address nor a CIDR") from None

    def pred(fl: Any) -> bool:
        try:
            ip = ipaddress.ip_address(get(fl))
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in nets)
    return pred


def _ports(values: Sequence[str], get: Callable[[Any], int], field: str) -> Pred:
    ports = set()
    for v in values:
        if not v.isdigit() or int(v) > 65535:
            raise FilterError(f"{field}: {v!r} is not a port (0-65535)")
        ports.add(int(v))
    return lambda fl: get(fl) in ports and get(fl) != 0


def _dst_port(fl: Any) -> int:
    l4 = fl.l4
    return int(l4.TCP.destination_port if l4.HasField("TCP") else l4.UDP.destination_port if l4.HasField("UDP") else 0)


def _src_port(fl: Any) -> int:
    l4 = fl.l4
    return int(l4.TCP.source_port if l4.HasField("TCP") else l4.UDP.source_port if l4.HasField("UDP") else 0)


_L4 = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP", "vrrp": "VRRP", "igmp": "IGMP", "icmpv4": "ICMPv4", "icmpv6": "ICMPv6"}


def _protocols(values: Sequence[str]) -> Pred:
    wanted = [v.lower() for v in values]
    for w in wanted:
        if w not in _L4 and w not in ("icmp", "http", "dns"):
            raise FilterError(f"protocol: unknown protocol {w!r}")

    def pred(fl: Any) -> bool:
        for w in wanted:
            if w == "icmp" and (fl.l4.HasField("ICMPv4") or fl.l4.HasField("ICMPv6")):
                return True
            if w in _L4 and fl.l4.HasField(_L4[w]):
                return True
            if w == "http" and fl.l7.HasField("http"):
                return True
            if w == "dns" and fl.l7.HasField("dns"):
                return True
        return False
    return pred


_STATUS_FULL = re.compile(r"^[1-5][0-9]{2}$")
_STATUS_PREFIX = re.compile(r"^[1-5][0-9]?\+$")


def _status_codes(values: Sequence[str]) -> Pred:
    full, prefix = set(), []
    for v in values:
        if _STATUS_FULL.match(v):
            full.add(v)
        elif _STATUS_PREFIX.match(v):
            prefix.append(v[:-1])
        else:
            raise FilterError(f"http_status_code: invalid status code prefix {v!r} (e.g. 403, 4+, 40+)")

    def pred(fl: Any) -> bool:
        code = fl.l7.http.code if fl.l7.HasField("http") else 0
        if not code:
            return False
        s = f"{code:03d}"
        return s in full or any(s.startswith(p) for p in prefix)
    return pred


def _regexes(values: Sequence[str], field: str) -> list[Any]:
    out = []
    for v in values:
        try:
            out.append(re2.compile(v))
        except re2.error as e:
            raise FilterError(f"{field}: {v!r}: {e}") from None
    return out


def _http_paths(values: Sequence[str]) -> Pred:
    rx = _regexes(values, "http_path")

    def pred(fl: Any) -> bool:
        url = fl.l7.http.url if fl.l7.HasField("http") else ""
        if not url:
            return False
        path = urlsplit(url).path
        return any(r.search(path) for r in rx)
    return pred


def _http_urls(values: Sequence[str]) -> Pred:
    rx = _regexes(values, "http_url")
    return lambda fl: bool(fl.l7.HasField("http") and fl.l7.http.url and any(r.search(fl.l7.http.url) for r in rx))


def _event_types(values: Iterable[Any]) -> Pred:
    wanted = [(int(v.type), bool(v.match_sub_type), int(v.sub_type)) for v in values]
    return lambda fl: any(fl.event_type.type == t and (not m or fl.event_type.sub_type == s) for t, m, s in wanted)


_FQDN = r"(?:[-0-9_a-z]+(?:\.[-0-9_a-z]+)*)"


def _fqdn_pattern(pattern: str) -> str:
    """Hubble's FQDN pattern (pkg/hubble/filters/patterns.go) as a regex: lower case, "*" within a name."""
    p = pattern.strip().removesuffix(".").lower()
    if not p:
        raise FilterError("node_name: empty pattern")
    if p.endswith("."):
        raise FilterError(f"node_name: {pattern!r}: multiple trailing dots in pattern")
    out = []
    for c in p:
        if c == ".":
            out.append(r"\.")
        elif c == "*":
            out.append(r"[-.0-9a-z]*")
        elif c in "-_" or c.isascii() and c.isalnum():
            out.append(c)
        else:
            raise FilterError(f"node_name: {pattern!r}: invalid character {c!r} in pattern")
    return "".join(out)


def _node_names(values: Sequence[str]) -> Pred:
    """Hubble's node-name patterns: "node", "cluster/node", globs ("node*", "*/n1"); a node name without a
    cluster is in cluster "default", as Cilium's."""
    parts = []
    for v in values:
        if not v:
            raise FilterError("node_name: empty pattern")
        elems = v.split("/")
        if len(elems) > 2:
            raise FilterError(f"node_name: {v!r}: too many slashes in pattern")
        cluster, node = elems if len(elems) == 2 else ("", elems[0])
        parts.append((_fqdn_pattern(cluster) if cluster else _FQDN) + "/" + (_fqdn_pattern(node) if node else _FQDN))
    rx = re2.compile(r"\A(?:" + "|".join(parts) + r")\z")  # RE2: linear, whatever the client's globs

    def pred(fl: Any) -> bool:
        if not fl.node_name:
            return False
        return rx.match(fl.node_name if "/" in fl.node_name else f"default/{fl.node_name}") is not None
    return pred


def _http_methods(values: Sequence[str]) -> Pred:
    wanted = {v.upper() for v in values}
    return lambda fl: bool(fl.l7.HasField("http") and fl.l7.http.method and fl.l7.http.method.upper() in wanted)


def _in(get: Callable[[Any], Any], values: Iterable[Any]) -> Pred:
    wanted = set(values)
    return lambda fl: get(fl) in wanted


def _reply(values: Iterable[bool]) -> Pred:
    wanted = set(values)
    return lambda fl: fl.HasField("is_reply") and fl.is_reply.value in wanted


# FlowFilter field -> its predicate's builder
_BUILDERS: dict[str, Callable[[Any], Pred]] = {
    "uuid": lambda v: _in(lambda fl: fl.uuid, v),
    "source_ip": lambda v: _ips(v, lambda fl: fl.IP.source, "source_ip"),
    "destination_ip": lambda v: _ips(v, lambda fl: fl.IP.destination, "destination_ip"),
    "source_pod": lambda v: _namespaced(v, lambda fl: (fl.source.namespace, fl.source.pod_name), "source_pod"),
    "destination_pod": lambda v: _namespaced(v, lambda fl: (fl.destination.namespace, fl.destination.pod_name),
                                             "destination_pod"),
    "source_service": lambda v: _namespaced(v, lambda fl: (fl.source_service.namespace, fl.source_service.name),
                                            "source_service"),
    "destination_service": lambda v: _namespaced(
        v, lambda fl: (fl.destination_service.namespace, fl.destination_service.name), "destination_service"),
    "traffic_direction": lambda v: _in(lambda fl: fl.traffic_direction, v),
    "verdict": lambda v: _in(lambda fl: fl.verdict, v),
    "drop_reason_desc": lambda v: _in(lambda fl: fl.drop_reason_desc, v),
    "event_type": _event_types,
    "http_status_code": _status_codes,
    "protocol": _protocols,
    "source_port": lambda v: _ports(v, _src_port, "source_port"),
    "destination_port": lambda v: _ports(v, _dst_port, "destination_port"),
    "reply": _reply,
    "http_method": _http_methods,
    "http_path": _http_paths,
    "http_url": _http_urls,
    "node_name": _node_names,
    "ip_version": lambda v: _in(lambda fl: fl.IP.ipVersion, v),
    "encrypted": lambda v: _in(lambda fl: fl.IP.encrypted, v),
}
_HTTP_FIELDS = ("http_status_code", "http_method", "http_path", "http_url")


def build(ff: Any) -> Pred:
    """One FlowFilter: every field it sets must match."""
    preds = []
    fields = {fd.name: value for fd, value in ff.ListFields()}
    for name, value in fields.items():
        builder = _BUILDERS.get(name)
        if builder is None:
            raise FilterError(f"{name}: not supported by Webb's Hubble API (Webb's flows do not carry it); "
                              f"supported: {', '.join(sorted(_BUILDERS))}")
        if name in _HTTP_FIELDS and "event_type" in fields and not any(
                e.type == ACCESS_LOG for e in fields["event_type"]):
            raise FilterError(f"filtering by {name} requires the event type filter to only match 'l7' events")
        preds.append(builder(value))
    return lambda fl: all(p(fl) for p in preds)


def build_all(whitelist: Iterable[Any], blacklist: Iterable[Any]) -> Pred:
    """Hubble's rule: matched by one whitelist filter (or there are none) and by no blacklist filter."""
    white = [build(ff) for ff in whitelist]
    black = [build(ff) for ff in blacklist]
    return lambda fl: (not white or any(p(fl) for p in white)) and not any(p(fl) for p in black)

