"""The one CIDR check of the runtime: parse a CIDR naming the flag that set it, then refuse
overlaps with each other and with routes the machine already has, naming the flag and the route.

``LocalNode.check_cidrs`` (one node: pod, service, cluster CIDRs against the host's routes) and
``Wire.check_cidrs`` (several nodes: pod CIDRs, wire, cluster and service CIDRs) both come here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
MAIN_TABLE = 254


class CidrError(ValueError):
    """A CIDR that is not one (or not of the IP version it must be); the message names its flag."""


class CidrConflictError(RuntimeError):
    """Two CIDRs, or a CIDR and a route, that must not overlap and do; the message names the flag."""


@dataclass(frozen=True)
class Cidr:
    """A parsed CIDR and where it came from: ``flag`` (``--pod-cidr``, ``wire_cidr``) is what the
    user changes to fix a conflict; ``kind`` and ``owner`` say what it is (pod CIDR of node a)."""

    net: Net
    flag: str
    kind: str
    owner: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.net}" + (f" of {self.owner}" if self.owner else "")


def parse(text: str, flag: str, kind: str, owner: str = "", version: int | None = None) -> Cidr:
    """``text`` as a network (strict: no host bits set); CidrError names ``flag`` and says why not."""
    try:
        net = ipaddress.ip_network(text)
    except ValueError as e:
        raise CidrError(f"{flag} {text!r}: not a {kind} ({e}); use a network address and prefix, "
                        f"e.g. {'fd00:10:244::/64' if ':' in text else '10.244.1.0/24'}") from None
    if version is not None and net.version != version:
        raise CidrError(f"{flag} {text}: the {kind} must be IPv{version}")
    return Cidr(net, flag, kind, owner)


def _choose(*flags: str) -> str:
    return "choose another " + " or ".join(dict.fromkeys(flags))


def refuse_overlaps(context: str, cidrs: Sequence[Cidr]) -> None:
    """Every two of ``cidrs`` (of one IP version) must be disjoint."""
    for i, a in enumerate(cidrs):
        for b in cidrs[i + 1:]:
            if a.net.version == b.net.version and a.net.overlaps(b.net):
                raise CidrConflictError(f"{context}: {a} overlaps {b}; {_choose(a.flag, b.flag)}")


def require_inside(context: str, inner: Iterable[Cidr], outer: Cidr) -> None:
    """Every one of ``inner`` must lie inside ``outer`` (each node's pod CIDR in the cluster CIDR)."""
    for c in inner:
        if c.net.version != outer.net.version or not c.net.subnet_of(outer.net):  # type: ignore[arg-type]
            raise CidrConflictError(f"{context}: {c} is not inside {outer}; "
                                    f"choose another {outer.flag} (a supernet of every {c.flag}) or another {c.flag}")


def main_routes(ipr: IPRoute, families: Iterable[int] = (2, 10), skip_oifs: Collection[int] = ()) -> list[Net]:
    """The destinations of the main routing table of ``ipr``'s netns, but default routes,
    link-local ones and routes out of ``skip_oifs`` (webb's own bridges)."""
    out: list[Net] = []
    for family in families:
        for r in ipr.get_routes(family=family, table=MAIN_TABLE):
            dst = r.get_attr("RTA_DST") or ("0.0.0.0" if r["family"] == 2 else "::")
            net = ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False)
            if net.prefixlen == 0 or net.is_link_local or r.get_attr("RTA_OIF") in skip_oifs:
                continue
            out.append(net)
    return out


def refuse_routes(context: str, cidrs: Iterable[Cidr], routes: Iterable[Net], what: str = "host route",
                  ours: Collection[Net] = ()) -> None:
    """None of ``cidrs`` may overlap one of ``routes`` (of its IP version); a route equal to one
    of ``ours`` (our own blackholes, the routes a previous run made) is not a conflict."""
    cidrs = list(cidrs)
    for net in routes:
        if net in ours:
            continue
        for c in cidrs:
            if c.net.version == net.version and c.net.overlaps(net):
                raise CidrConflictError(f"{context}: {c} overlaps {what} {net}; {_choose(c.flag)}")
