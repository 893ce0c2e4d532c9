"""The flow filters of the UI's endpoints, parsed from a query string and checked.

The same filters as ``webb observe`` (verdict, pod, layer), and namespace, protocol, HTTP method and
status, and since. A URL is user input: an unknown parameter, one given twice, or a value that is not
of its kind is refused with a message naming it (HTTP 400), never ignored.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from mesh.cli.observe import Layer, Verdict

MAX_LIMIT = 5000
DEFAULT_LIMIT = 200
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")  # a Kubernetes name (DNS subdomain)
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9/._-]{0,31}")
_STATUS = re.compile(r"[1-5](\d\d|xx)")
PARAMS = ("verdict", "pod", "namespace", "protocol", "layer", "method", "status", "since", "after", "limit")


class QueryError(ValueError):
    """A parameter the endpoints refuse; the message names it and says what is accepted."""


@dataclass(frozen=True)
class FlowQuery:
    verdict: str = ""
    pod: str = ""  # namespace/name
    namespace: str = ""
    protocol: str = ""  # TCP, UDP, HTTP/1.1 ...; "http" is any HTTP version
    layer: str = ""
    method: str = ""
    status: str = ""  # "403", or a class: "4xx"
    since: float = 0.0  # Unix time; 0: all
    after: int = 0  # the flows read after this one (the id the last answer gave as "next")
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, query: str, now: float | None = None) -> FlowQuery:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, max_num_fields=len(PARAMS))
        except ValueError as e:
            raise QueryError(f"query: {e}") from None
        seen: dict[str, str] = {}
        for k, v in pairs:
            if k not in PARAMS:
                raise QueryError(f"unknown parameter {k!r}: use {', '.join(PARAMS)}")
            if k in seen:
                raise QueryError(f"parameter {k!r} given twice")
            seen[k] = v.strip()
        return cls(**{k: _check(k, v, time.time() if now is None else now) for k, v in seen.items() if v != ""})

    def matches(self, f: dict[str, Any]) -> bool:
        if self.verdict and str(f.get("verdict", "")).lower() != self.verdict:
            return False
        if self.pod and self.pod not in (f.get("src"), f.get("dst_pod")):
            return False
        if self.namespace and self.namespace not in {_ns(f.get(k)) for k in ("src", "dst_pod", "service")}:
            return False
        if self.layer and str(f.get("layer", "")).upper() != self.layer:
            return False
        if self.protocol and not _protocol_is(str(f.get("protocol") or ""), self.protocol):
            return False
        if self.method and str(f.get("method") or "").upper() != self.method:
            return False
        if self.status and not _status_is(f.get("status"), self.status):
            return False
        return not (self.since and _time(f) < self.since)

    def filters(self) -> dict[str, str]:
        """The filters in force, as they would be written in a URL (not the cursor nor the limit)."""
        return {k: str(getattr(self, k)) for k in PARAMS[:8] if getattr(self, k)}


def _check(key: str, v: str, now: float) -> Any:
    if len(v) > 253:
        raise QueryError(f"{key}: longer than 253 characters")
    if key == "verdict":
        if v.lower() not in {x.value for x in Verdict}:
            raise QueryError(f"verdict {v!r}: use one of {', '.join(x.value for x in Verdict)}")
        return v.lower()
    if key == "layer":
        if v.upper() not in {x.value for x in Layer}:
            raise QueryError(f"layer {v!r}: use L4 or L7")
        return v.upper()
    if key == "pod":
        ns, _, name = v.rpartition("/")
        if not _NAME.fullmatch(name) or (ns and not _NAME.fullmatch(ns)):
            raise QueryError(f"pod {v!r}: not a pod name; use namespace/name or name (namespace default)")
        return f"{ns or 'default'}/{name}"
    if key == "namespace":
        if not _NAME.fullmatch(v):
            raise QueryError(f"namespace {v!r}: not a namespace name (lower case letters, digits, '-', '.')")
        return v
    if key in ("protocol", "method"):
        if not _TOKEN.fullmatch(v):
            raise QueryError(f"{key} {v!r}: letters, digits, '/', '.', '-' only (e.g. "
                             + ("TCP, UDP, HTTP/1.1, http)" if key == "protocol" else "GET, POST)"))
        return v.upper()
    if key == "status":
        if not _STATUS.fullmatch(v.lower()):
            raise QueryError(f"status {v!r}: an HTTP status (100-599) or a class (e.g. 4xx)")
        return v.lower()
    if key == "since":
        return _since(v, now)
    return _count(key, v)


def _since(v: str, now: float) -> float:
    """"5m" (ago; s, m, h, d) or a Unix time."""
    m = _DURATION.fullmatch(v)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        t = float(v)
    except ValueError:
        t = -1.0
    if not 0 <= t < 1e11:
        raise QueryError(f"since {v!r}: a duration (30s, 5m, 2h, 1d) or a Unix time (seconds)")
    return t


def _count(key: str, v: str) -> int:
    if not v.isdigit() or len(v) > 18:
        raise QueryError(f"{key} {v!r}: a whole number")
    n = int(v)
    if key == "limit" and not 1 <= n <= MAX_LIMIT:
        raise QueryError(f"limit {n}: 1 to {MAX_LIMIT}")
    return n


def _ns(name: object) -> str:
    return str(name).partition("/")[0] if isinstance(name, str) and "/" in name else ""


def _protocol_is(have: str, want: str) -> bool:
    have = have.upper()
    return have == want or (want == "HTTP" and have.startswith("HTTP/"))


def _status_is(have: object, want: str) -> bool:
    s = str(have) if isinstance(have, int | str) else ""
    return s == want or (want.endswith("xx") and len(s) == 3 and s[0] == want[0])


def _time(f: dict[str, Any]) -> float:
    try:
        return float(f.get("time") or 0)
    except (TypeError, ValueError):
        return 0.0
