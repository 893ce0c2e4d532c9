"""Python view of the map layouts and shared constants in ``datapath/bpf/webb.h``.

These are ``struct`` formats (no ctypes outside ``libbpf.py``). ``check_layout`` compares
each size with the loaded object's BTF-derived key/value sizes, so a layout changed on one
side only fails at load with the map's name rather than corrupting entries. ``check_enums``
does the same for the constants: each is a named C enum, compared member by member.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from datapath.types import (
    EP_AUDIT,
    EP_INGRESS_ENFORCED,
    EP_LOCAL,
    EP_MTLS_STRICT,
    EP_PROXY,
    IDENTITY_NODE,
    IDENTITY_UNKNOWN,
    POLICY_L7,
    REASON_MAX,
    PolicyEntry,
    Reason,
    ServiceEntry,
    Verdict,
)

if TYPE_CHECKING:
    from datapath.libbpf import Map

class Layout(struct.Struct):
    """A ``struct`` format built from named fields, checked member by member against the C
    struct of the same name in the BPF object's BTF (``check_btf``)."""

    def __init__(self, c_name: str, *fields: tuple[str, str]) -> None:
        super().__init__("=" + "".join(f for _, f in fields))
        self.c_name = c_name
        self.fields = fields

    def offsets(self) -> dict[str, int]:
        out, prefix = {}, "="
        for name, fmt in self.fields:
            out[name] = struct.calcsize(prefix)
            prefix += fmt
        return out


ADDR = "16s"  # struct webb_addr: IPv6, IPv4 as IPv4-mapped
SERVICE_KEY = Layout("service_key", ("vip", ADDR), ("port", "2s"), ("proto", "B"), ("pad", "x"))
SERVICE_VALUE = Layout("service_value", ("service_id", "I"), ("backend_count", "I"), ("proxy", ADDR),
                       ("proxy_port", "2s"), ("pad", "2x"), ("affinity_timeout_s", "I"))
BACKEND_KEY = Layout("backend_key", ("service_id", "I"), ("slot", "I"))
BACKEND_VALUE = Layout("backend_value", ("addr", ADDR), ("port", "2s"), ("pad", "2x"))
ENDPOINT_KEY = Layout("webb_addr", ("w", ADDR))
CGROUP_KEY = struct.Struct("=Q")
ENDPOINT_VALUE = Layout("endpoint_value", ("identity", "I"), ("flags", "I"))
POLICY_KEY = Layout("policy_key", ("dst_identity", "I"), ("src_identity", "I"), ("port", "H"), ("proto", "B"),
                    ("pad", "x"))
POLICY_VALUE = Layout("policy_value", ("rule_id", "I"), ("flags", "I"))
COUNTER_KEY = struct.Struct("=I")
FLOW_EVENT = Layout("flow_event", ("ts_ns", "Q"), ("cgroup_id", "Q"), ("src_identity", "I"), ("dst_identity", "I"),
                    ("orig", ADDR), ("new", ADDR), ("orig_port", "2s"), ("new_port", "2s"), ("verdict", "B"),
                    ("reason", "B"), ("proto", "B"), ("family", "B"))
SOCK_KEY = Layout("sock_key", ("local", ADDR), ("remote", ADDR), ("local_port", "2s"), ("remote_port", "2s"),
                  ("pad", "4x"))
META_VALUE = Layout("webb_meta", ("digest", "32s"))
CONFIG_VALUE = Layout("webb_config", ("flags", "I"))
BTF_CHECKED = (SERVICE_KEY, SERVICE_VALUE, BACKEND_KEY, BACKEND_VALUE, ENDPOINT_KEY, ENDPOINT_VALUE, POLICY_KEY,
               POLICY_VALUE, FLOW_EVENT, SOCK_KEY, META_VALUE, CONFIG_VALUE)

LAYOUT = {
    "webb_services": (SERVICE_KEY, SERVICE_VALUE),
    "webb_backends": (BACKEND_KEY, BACKEND_VALUE),
    "webb_endpoints": (ENDPOINT_KEY, ENDPOINT_VALUE),
    "webb_cgroups": (CGROUP_KEY, ENDPOINT_VALUE),
    "webb_policy": (POLICY_KEY, POLICY_VALUE),
    "webb_reason_counts": (COUNTER_KEY, struct.Struct("=Q")),
    "webb_meta": (COUNTER_KEY, META_VALUE),
    "webb_config": (COUNTER_KEY, CONFIG_VALUE),
    "webb_accel_counts": (COUNTER_KEY, struct.Struct("=Q")),
    "webb_sockhash": (SOCK_KEY, struct.Struct("=Q")),
}
CONFIG_SOCKMAP = 1
ACCEL_COUNTERS = ("sockets", "redirected", "passed")  # webb_accel_counts keys 0, 1, 2
ACCEL_MAX = 4  # entries of webb_accel_counts
assert max(Reason) < REASON_MAX and len(ACCEL_COUNTERS) <= ACCEL_MAX
STATE_MAPS = ("webb_services", "webb_backends", "webb_endpoints", "webb_cgroups", "webb_policy")


def check_btf(members: dict[str, tuple[int, dict[str, int]]]) -> None:
    """``members``: C struct name -> (size, member -> byte offset), read from the object's BTF."""
    for lay in BTF_CHECKED:
        if lay.c_name not in members:
            raise RuntimeError(f"check layout {lay.c_name}: not in the BPF object's BTF; rebuild with 'make bpf'")
        size, offs = members[lay.c_name]
        if size != lay.size or offs != lay.offsets():
            raise RuntimeError(
                f"check layout {lay.c_name}: C has size {size} members {offs}, datapath/maps.py has size "
                f"{lay.size} members {lay.offsets()}; change datapath/bpf/webb.h and datapath/maps.py together"
            )


def shared_enums() -> dict[str, dict[str, int]]:
    """Python's side of every C enum of ``webb.h``: enum name -> member name -> value."""
    return {
        "webb_identity": {"WEBB_IDENTITY_NODE": IDENTITY_NODE, "WEBB_IDENTITY_UNKNOWN": IDENTITY_UNKNOWN},
        "webb_ep_flag": {"WEBB_EP_INGRESS_ENFORCED": EP_INGRESS_ENFORCED, "WEBB_EP_AUDIT": EP_AUDIT,
                         "WEBB_EP_MTLS_STRICT": EP_MTLS_STRICT, "WEBB_EP_LOCAL": EP_LOCAL,
                         "WEBB_EP_PROXY": EP_PROXY},
        "webb_verdict": {f"WEBB_VERDICT_{v.name}": int(v) for v in Verdict},
        "webb_reason": {**{f"WEBB_REASON_{r.name}": int(r) for r in Reason}, "WEBB_REASON_MAX": REASON_MAX},
        "webb_config_flag": {"WEBB_CONFIG_SOCKMAP": CONFIG_SOCKMAP},
        "webb_policy_flag": {"WEBB_POLICY_L7": POLICY_L7},
        "webb_accel_counter": {**{f"WEBB_ACCEL_{n.upper()}": i for i, n in enumerate(ACCEL_COUNTERS)},
                               "WEBB_ACCEL_MAX": ACCEL_MAX},
    }


def check_enums(enums: dict[str, dict[str, int]]) -> None:
    """``enums``: C enum name -> (member -> value), read from the object's BTF."""
    for c_name, py in shared_enums().items():
        if c_name not in enums:
            raise RuntimeError(f"check enum {c_name}: not in the BPF object's BTF; rebuild with 'make bpf'")
        c = enums[c_name]
        differ = [f"{m} is {c.get(m, 'missing')} in C, {py.get(m, 'missing')} in datapath/maps.py"
                  for m in [*c, *(m for m in py if m not in c)] if c.get(m) != py.get(m)]
        if differ:
            raise RuntimeError(f"check enum {c_name}: {'; '.join(differ)}; "
                               "change datapath/bpf/webb.h and datapath/maps.py together")


def check_layout(maps: dict[str, Map]) -> None:
    for name, (key, value) in LAYOUT.items():
        m = maps[name]
        if (m.key_size, m.value_size) != (key.size, value.size):
            raise RuntimeError(
                f"check map {name}: object has key/value {m.key_size}/{m.value_size} bytes, "
                f"datapath/maps.py has {key.size}/{value.size}; rebuild with 'make bpf' "
                "or update both definitions together"
            )


def _ip(addr: str) -> bytes:
    """The maps' one address form: IPv6, with IPv4 as IPv4-mapped (::ffff:a.b.c.d)."""
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes(10) + b"\xff\xff" + ip.packed
    return ip.packed


def _addr_text(raw: bytes) -> str:
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


def _port(port: int) -> bytes:
    return port.to_bytes(2, "big")


@dataclass
class DatapathState:
    """Everything the kernel must know; the agent turns a plan into this."""

    services: list[ServiceEntry] = field(default_factory=list)
    endpoints: dict[str, tuple[int, int]] = field(default_factory=dict)  # ip -> (identity, EP_* flags)
    cgroups: dict[int, tuple[int, int]] = field(default_factory=dict)  # cgroup id -> same
    policy: list[PolicyEntry] = field(default_factory=list)

    def entries(self) -> dict[str, dict[bytes, bytes]]:
        """Encoded map contents, map name -> key -> value."""
        out: dict[str, dict[bytes, bytes]] = {n: {} for n in STATE_MAPS}
        for s in self.services:
            key = SERVICE_KEY.pack(_ip(s.vip), _port(s.port), s.proto)
            out["webb_services"][key] = SERVICE_VALUE.pack(
                s.service_id, len(s.backends), _ip(s.proxy_ip), _port(s.proxy_port), s.affinity_timeout_s
            )
            for slot, be in enumerate(s.backends):
                out["webb_backends"][BACKEND_KEY.pack(s.service_id, slot)] = BACKEND_VALUE.pack(
                    _ip(be.ip), _port(be.port)
                )
        for ip, (ident, flags) in self.endpoints.items():
            out["webb_endpoints"][ENDPOINT_KEY.pack(_ip(ip))] = ENDPOINT_VALUE.pack(ident, flags)
        for cg, (ident, flags) in self.cgroups.items():
            out["webb_cgroups"][CGROUP_KEY.pack(cg)] = ENDPOINT_VALUE.pack(ident, flags)
        for p in self.policy:
            out["webb_policy"][POLICY_KEY.pack(p.dst_identity, p.src_identity, p.port, p.proto)] = (
                POLICY_VALUE.pack(p.rule_id, POLICY_L7 if p.l7 else 0)
            )
        return out


@dataclass(frozen=True)
class FlowEvent:
    ts_ns: int
    cgroup_id: int
    src_identity: int
    dst_identity: int
    orig_ip: str
    orig_port: int
    new_ip: str
    new_port: int
    verdict: Verdict
    reason: Reason
    proto: int

    @classmethod
    def decode(cls, raw: bytes) -> FlowEvent:
        ts, cg, src, dst, oip, nip, oport, nport, verdict, reason, proto, _family = FLOW_EVENT.unpack(
            raw[: FLOW_EVENT.size]
        )
        return cls(
            ts, cg, src, dst,
            _addr_text(oip), int.from_bytes(oport, "big"),
            _addr_text(nip), int.from_bytes(nport, "big"),
            Verdict(verdict), Reason(reason), proto,
        )
