"""Flow filters, shared by ``webb observe`` (its options) and ``webb ui`` (its endpoints' query
string): parsed, checked, and matched against the flows the agent writes (mesh.agent.flows).

Hubble's filters: verdict, pod (from or to), from-pod, to-pod, namespace, protocol (tcp, udp, http,
grpc, HTTP/1.1 ...), layer, HTTP method and status (403, or a class: 4xx), since (5m ago, a Unix
time or an ISO 8601 time). A value is user input: one that is not of its kind is refused with a
message naming it and what is accepted (the CLI exits 2, the UI answers 400), never ignored.
A URL's parameter unknown or given twice is refused too. Pure: no I/O.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl


class Verdict(StrEnum):
    """What the agent writes (mesh.agent.flows, mesh.agent.tunnels)."""

    forwarded = "forwarded"
    denied = "denied"
    dropped = "dropped"
    audit = "audit"
    failed = "failed"


class Layer(StrEnum):
    L4 = "L4"
    L7 = "L7"


MAX_LIMIT = 5000
DEFAULT_LIMIT = 200
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")  # a Kubernetes name (DNS subdomain)
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9/._-]{0,31}")
_STATUS = re.compile(r"[1-5](\d\d|xx)")
# what a flow's "protocol" holds (L4: the kernel's; L7: Envoy's %PROTOCOL%), and two families
PROTOCOLS = ("TCP", "UDP", "HTTP", "GRPC", "HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/3")
FILTERS = ("verdict", "pod", "from_pod", "to_pod", "namespace", "protocol", "layer", "method", "status", "since")
PARAMS = (*FILTERS, "after", "limit")


class QueryError(ValueError):
    """A filter value refused; the message names the filter and says what is accepted."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key  # the filter refused ("" when it is not one: an unknown parameter)


@dataclass(frozen=True)
class FlowQuery:
    verdict: str = ""
    pod: str = ""  # namespace/name: from or to it
    from_pod: str = ""
    to_pod: str = ""
    namespace: str = ""
    protocol: str = ""  # one of PROTOCOLS: "HTTP" is any HTTP version, "GRPC" any gRPC call
    layer: str = ""
    method: str = ""
    status: str = ""  # "403", or a class: "4xx"
    since: float = 0.0  # Unix time; 0: all
    after: int = 0  # the flows read after this one (the id the last answer gave as "next")
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, query: str, now: float | None = None) -> FlowQuery:
        """From a URL's query string (webb ui)."""
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, max_num_fields=len(PARAMS))
        except ValueError as e:
            raise QueryError(f"query: {e}") from None
        seen: dict[str, str] = {}
        for k, v in pairs:
            if k not in PARAMS:
                raise QueryError(f"unknown parameter {k!r}: use {', '.join(PARAMS)}")
            if k in seen:
                raise QueryError(f"parameter {k!r} given twice", k)
            seen[k] = v
        return cls.of(seen, now)

    @classmethod
    def of(cls, values: Mapping[str, str | None], now: float | None = None) -> FlowQuery:
        """From named values (webb observe's options); None or blank: that filter is off."""
        at = time.time() if now is None else now
        return cls(**{k: _check(k, v.strip(), at) for k, v in values.items() if v is not None and v.strip() != ""})

    def matches(self, f: dict[str, Any]) -> bool:
        if self.verdict and str(f.get("verdict", "")).lower() != self.verdict:
            return False
        if self.pod and self.pod not in (f.get("src"), f.get("dst_pod")):
            return False
        if self.from_pod and self.from_pod != f.get("src"):
            return False
        if self.to_pod and self.to_pod != f.get("dst_pod"):
            return False
        if self.namespace and self.namespace not in {_ns(f.get(k)) for k in ("src", "dst_pod", "service")}:
            return False
        if self.layer and str(f.get("layer", "")).upper() != self.layer:
            return False
        if self.protocol and not _protocol_is(f, self.protocol):
            return False
        if self.method and str(f.get("method") or "").upper() != self.method:
            return False
        if self.status and not _status_is(f.get("status"), self.status):
            return False
        return not (self.since and _time(f) < self.since)

    def filters(self) -> dict[str, str]:
        """The filters in force, as they would be written in a URL (not the cursor nor the limit)."""
        return {k: str(getattr(self, k)) for k in FILTERS if getattr(self, k)}


def _check(key: str, v: str, now: float) -> Any:
    if key not in PARAMS:
        raise QueryError(f"unknown filter {key!r}: use {', '.join(PARAMS)}")
    if len(v) > 253:
        raise QueryError(f"{key}: longer than 253 characters", key)
    if key == "verdict":
        if v.lower() not in {x.value for x in Verdict}:
            raise QueryError(f"verdict {v!r}: use one of {', '.join(x.value for x in Verdict)}", key)
        return v.lower()
    if key == "layer":
        if v.upper() not in {x.value for x in Layer}:
            raise QueryError(f"layer {v!r}: use L4 or L7", key)
        return v.upper()
    if key in ("pod", "from_pod", "to_pod"):
        ns, _, name = v.rpartition("/")
        if not _NAME.fullmatch(name) or (ns and not _NAME.fullmatch(ns)):
            raise QueryError(f"{key} {v!r}: not a pod name; use namespace/name or name (namespace default)", key)
        return f"{ns or 'default'}/{name}"
    if key == "namespace":
        if not _NAME.fullmatch(v):
            raise QueryError(f"namespace {v!r}: not a namespace name (lower case letters, digits, '-', '.')", key)
        return v
    if key == "protocol":
        if v.upper() not in PROTOCOLS:
            raise QueryError(f"protocol {v!r}: use one of {', '.join(p.lower() for p in PROTOCOLS)}", key)
        return v.upper()
    if key == "method":
        if not _TOKEN.fullmatch(v):
            raise QueryError(f"method {v!r}: letters, digits, '/', '.', '-' only (e.g. GET, POST)", key)
        return v.upper()
    if key == "status":
        if not _STATUS.fullmatch(v.lower()):
            raise QueryError(f"status {v!r}: an HTTP status (100-599) or a class (e.g. 4xx)", key)
        return v.lower()
    if key == "since":
        return _since(v, now)
    return _count(key, v)


def _since(v: str, now: float) -> float:
    """"5m" (ago; s, m, h, d), a Unix time, or an ISO 8601 time (without a zone: local time)."""
    m = _DURATION.fullmatch(v)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        t = float(v)
    except ValueError:
        try:
            t = datetime.fromisoformat(v).timestamp() if "-" in v else -1.0
        except (ValueError, OverflowError, OSError):
            t = -1.0
    if not 0 <= t < 1e11:
        raise QueryError(f"since {v!r}: a duration (30s, 5m, 2h, 1d), a Unix time (seconds) or an ISO time "
                         "(2024-05-01T12:00:00Z)", "since")
    return t


def _count(key: str, v: str) -> int:
    if not (v.isascii() and v.isdigit()) or len(v) > 18:
        raise QueryError(f"{key} {v!r}: a whole number", key)
    n = int(v)
    if key == "limit" and not 1 <= n <= MAX_LIMIT:
        raise QueryError(f"limit {n}: 1 to {MAX_LIMIT}", key)
    return n


def _ns(name: object) -> str:
    return str(name).partition("/")[0] if isinstance(name, str) and "/" in name else ""


def _protocol_is(f: dict[str, Any], want: str) -> bool:
    have = str(f.get("protocol") or "").upper()
    if want == "GRPC":  # a gRPC call: Envoy logged its grpc-status (mesh.agent.flows)
        return f.get("layer") == "L7" and isinstance(f.get("grpc_status"), int)
    return have == want or (want == "HTTP" and have.startswith("HTTP/"))


def _status_is(have: object, want: str) -> bool:
    s = str(have) if isinstance(have, int | str) else ""
    return s == want or (want.endswith("xx") and len(s) == 3 and s[0] == want[0])


def _time(f: dict[str, Any]) -> float:
    try:
        return float(f.get("time") or 0)
    except (TypeError, ValueError):
        return 0.0
