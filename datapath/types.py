"""What the kernel is told, as plain values: the constants of ``datapath/bpf/webb.h`` (each a
named C enum there, checked against the object's BTF by ``datapath.maps.check_enums``) and the
entries of the state maps. Pure: no ctypes, no I/O, so the planner can use it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# the C enums of the same values: see ``shared_enums``
IDENTITY_NODE = 1  # a node's own address: its proxy, its tunnel, kubelet's probes
IDENTITY_UNKNOWN = 2
EP_INGRESS_ENFORCED = 1
EP_AUDIT = 2
EP_MTLS_STRICT = 4  # MeshTLS STRICT: new TCP connections only from this node
EP_LOCAL = 8  # a pod of this node, or the node address the mTLS tunnel delivers from
EP_PROXY = 16  # the node proxy's own cgroup (agent + Envoy run as a pod): its sockets pass as the host's would
POLICY_L7 = 1  # policy_value.flags: the rule has L7 rules, allowed only through the node proxy
PROTO_TCP = 6
PROTO_UDP = 17


class Verdict(enum.IntEnum):
    FORWARDED = 1
    DENIED = 2
    DROPPED = 3
    AUDIT = 4


class Reason(enum.IntEnum):
    DIRECT = 1
    SERVICE = 2
    L7_PROXY = 3
    POLICY_DENIED = 4
    NO_BACKEND = 5
    BACKEND_MISSING = 6
    POLICY_AUDIT = 7
    MTLS_STRICT = 8
    L7_BYPASS = 9

    @property
    def text(self) -> str:
        return self.name.lower().replace("_", "-")


REASON_MAX = 10  # entries of webb_reason_counts


@dataclass(frozen=True, order=True)
class Backend:
    ip: str
    port: int


@dataclass(frozen=True)
class ServiceEntry:
    """One service port: VIP:port → backends, or → the node Envoy (proxy_port != 0)."""

    vip: str
    port: int
    service_id: int
    backends: tuple[Backend, ...]
    proxy_ip: str = "0.0.0.0"  # same family as the VIP
    proxy_port: int = 0
    proto: int = PROTO_TCP
    affinity_timeout_s: int = 0  # ClientIP session affinity; 0 = none


@dataclass(frozen=True)
class PolicyEntry:
    dst_identity: int
    src_identity: int  # 0: any source
    port: int  # 0: any port
    rule_id: int
    proto: int = PROTO_TCP
    l7: bool = False  # every rule that allows it has L7 rules: only through the node proxy
