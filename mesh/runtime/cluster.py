"""Several nodes on one machine: one network namespace per node, joined by a "wire".

```
 webb-node-<a>  (agent a: bridge, Envoy, pods' veths)      webb-node-<b>  (agent b ...)
   eth0 10.250.0.1/24                                         eth0 10.250.0.2/24
     |  route <b's pod CIDR> via 10.250.0.2                     |  route <a's pod CIDR> via 10.250.0.1
     +---- veth ----> webb-wire-<prefix>: bridge "wire" <---- veth ----+
                      (ports "wn-<a>", "wn-<b>": capture here)
```

The host network namespace is not touched (only /var/run/netns names are added): nothing
routed in these namespaces can reach it or leave the machine. Every namespace made here gets
the service CIDRs as blackholes before anything else (DESIGN safety rule), has no default route,
and has ``lo`` up. A node namespace forwards (``ip_forward=1``) between its pods' bridge and
the wire. The agent of a node enters its namespace (``webb agent --node-netns``); its pods then
reach pods of other nodes through the cluster CIDR route each pod gets (``--cluster-cidr``).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pyroute2 import IPRoute

from mesh.runtime import cidrs
from mesh.runtime.local import NETNS_DIR, blackhole, in_netns

WIRE_CIDR = "10.250.0.0/24"
SERVICE_CIDRS = ("10.96.0.0/16", "fd00:10:96::/112")
WIRE_BRIDGE = "wire"
NODE_IF = "eth0"  # the node's end of its wire veth, inside the node netns
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def node_netns(name: str) -> str:
    return f"webb-node-{name}"


def wire_netns(prefix: str) -> str:
    return f"webb-wire-{prefix}"


def wire_ifname(name: str) -> str:
    """The wire-side end of a node's veth (in the wire netns); interface names are <= 15 bytes."""
    ifname = f"wn-{name}"
    return ifname if len(ifname) <= 15 else "wn-" + hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:10]


@dataclass(frozen=True)
class WireNode:
    """One node of the wire: run its agent with ``--node NAME --node-netns NETNS --pod-cidr
    POD_CIDR --wire-ip WIRE_IP``."""

    name: str
    netns: str  # webb-node-<name>
    wire_ip: str  # its address on the wire (eth0 in its netns)
    pod_cidr: str
    wire_if: str  # its veth end in the wire netns: capture there to see what it sends and receives
    prefixlen: int = 24  # of the wire CIDR


class Wire:
    """Node namespaces on one wire bridge; ``setup()`` then ``teardown()`` (also a context manager).

    ``nodes``: (name, pod CIDR) in order; node i gets wire address i+1 of ``wire_cidr``.
    ``prefix`` names the wire netns (``webb-wire-<prefix>``), so several wires can coexist.
    """

    def __init__(self, nodes: Sequence[tuple[str, str]], prefix: str = "webb", wire_cidr: str = WIRE_CIDR,
                 cluster_cidr: str = "", service_cidrs: Sequence[str] = SERVICE_CIDRS) -> None:
        if not nodes:
            raise ValueError("make wire: no nodes")
        names = [n for n, _ in nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"make wire: node names repeat: {names}")
        for name in names:
            if not _DNS_LABEL.match(name):
                raise ValueError(f"make wire: {name!r} is not a usable node name; use a DNS label (a-z, 0-9, '-')")
        self._wire = cidrs.parse(wire_cidr, "wire_cidr", "wire CIDR", version=4)
        net = self._wire.net
        if len(nodes) > net.num_addresses - 2:
            raise ValueError(f"make wire: {len(nodes)} nodes do not fit wire CIDR {net}; choose a larger wire_cidr")
        self._pod_cidrs = {name: cidrs.parse(cidr, "--pod-cidr", "pod CIDR", f"node {name}", version=4) for name, cidr in nodes}
        self._cluster = cidrs.parse(cluster_cidr, "--cluster-cidr", "cluster CIDR", version=4) if cluster_cidr else None
        self._services = [cidrs.parse(s, "service_cidrs", "service CIDR") for s in service_cidrs]
        self.prefix = prefix
        self.netns = wire_netns(prefix)
        self.wire_cidr = str(net)
        self.cluster_cidr = cluster_cidr
        self.service_cidrs = tuple(service_cidrs)
        self.nodes = [WireNode(name, node_netns(name), str(net.network_address + i + 1), str(self._pod_cidrs[name].net),
                               wire_ifname(name), net.prefixlen)
                      for i, (name, _) in enumerate(nodes)]
        if len({n.wire_if for n in self.nodes}) != len(self.nodes):
            raise ValueError("make wire: two node names map to one wire interface name; rename a node")

    def node(self, name: str) -> WireNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name} on wire {self.netns}")

    def __iter__(self) -> Iterator[WireNode]:
        return iter(self.nodes)

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this wire makes: the wire's, then the nodes'."""
        return [self.netns, *(n.netns for n in self.nodes)]

    # ---- checks ----
    def check_cidrs(self) -> None:
        """Refuse CIDRs that overlap each other or a route of the host (the caller's netns).

        Host routes on webb's own bridges (``webb*``: single-node agents in the host netns) and
        the service CIDR blackholes are not conflicts: the wire's namespaces never reach the host."""
        context = "make wire"
        pods = [self._pod_cidrs[n.name] for n in self.nodes]
        cluster = self._cluster
        cidrs.refuse_overlaps(context, [*pods, self._wire, *self._services])
        if cluster is not None:
            cidrs.require_inside(context, pods, cluster)
            cidrs.refuse_overlaps(context, [cluster, self._wire, *self._services])
        with IPRoute() as ipr:
            webb_links = {link["index"] for link in ipr.get_links()
                          if str(link.get_attr("IFLA_IFNAME") or "").startswith("webb")}
            routes = cidrs.main_routes(ipr, families=(2,), skip_oifs=webb_links)
        cidrs.refuse_routes(context, [self._wire, *pods, *([cluster] if cluster else [])], routes, "host route",
                            ours={s.net for s in self._services})

    # ---- lifecycle ----
    def setup(self) -> Wire:
        """Make every namespace (leftovers of a killed run are removed first). On failure,
        what was made is removed again and the error raised."""
        self.check_cidrs()
        self.teardown()
        try:
            self._setup()
        except BaseException:
            try:
                self.teardown()
            except OSError:
                pass
            raise
        return self

    def _setup(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            in_netns(ns, self._harden)
        in_netns(self.netns, self._wire_bridge)
        for n in self.nodes:
            in_netns(self.netns, lambda ipr, n=n: self._plug(ipr, n))  # type: ignore[misc]
            in_netns(n.netns, lambda ipr, n=n: self._configure_node(ipr, n))  # type: ignore[misc]

    def _harden(self, ipr: IPRoute) -> None:
        # blackholes first: nothing in this namespace may send to a VIP unrewritten
        for cidr in self.service_cidrs:
            blackhole(ipr, cidr)
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    @staticmethod
    def _wire_bridge(ipr: IPRoute) -> None:
        ipr.link("add", ifname=WIRE_BRIDGE, kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=WIRE_BRIDGE)[0], state="up")

    @staticmethod
    def _plug(ipr: IPRoute, n: WireNode) -> None:
        """The node's veth: one end on the wire bridge, the other (eth0) in the node netns."""
        ipr.link("add", ifname=n.wire_if, kind="veth", peer={"ifname": NODE_IF, "net_ns_fd": n.netns})
        ipr.link("set", index=ipr.link_lookup(ifname=n.wire_if)[0],
                 master=ipr.link_lookup(ifname=WIRE_BRIDGE)[0], state="up")

    def _configure_node(self, ipr: IPRoute, n: WireNode) -> None:
        idx = ipr.link_lookup(ifname=NODE_IF)[0]
        ipr.addr("add", index=idx, address=n.wire_ip, prefixlen=n.prefixlen)
        ipr.link("set", index=idx, state="up")
        for other in self.nodes:
            if other.name != n.name:
                ipr.route("add", dst=other.pod_cidr, gateway=other.wire_ip)
        # /proc/sys/net is the calling thread's netns: this thread is in the node's
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")

    def teardown(self) -> None:
        """Remove every namespace of this wire (their veths go with them); idempotent, and each
        one is tried even if another fails. Stop the nodes' agents first: a namespace a process
        still runs in lives on, unnamed, until that process exits."""
        errors = []
        for ns in reversed(self.namespaces):
            if not (NETNS_DIR / ns).exists():
                continue
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if r.returncode != 0 and (NETNS_DIR / ns).exists():
                errors.append(f"{ns}: {r.stderr.strip()}")
        if errors:
            raise OSError(f"tear down wire {self.netns}: " + "; ".join(errors))

    def __enter__(self) -> Wire:
        return self.setup()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.teardown()
