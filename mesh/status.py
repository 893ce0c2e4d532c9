"""The agent's status: one typed record, written by the agent (``<state-dir>/status.json``) and
read through ``AgentStatus.read`` by everyone else (the CLI, the demo, the node reporter).

The file is JSON with the field names below; writing is atomic (temporary file, then rename),
so a reader sees the previous status or the new one, never a part.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"


@dataclass
class Applied:
    """What the agent last reached. ``source_version`` moves on every sync (applied or not);
    ``applied_source_version`` only when the plan reached the datapath and Envoy."""

    source_version: str = ""
    applied_source_version: str = ""
    plan_version: str = ""
    datapath_version: str = ""
    envoy_version: str = ""
    datapath_changes: int = 0
    at: float = 0.0


@dataclass
class EnvoyTypeStatus:
    """One xDS type as the node Envoy answered it (versions sent / ACKed / NACKed, Envoy's error)."""

    sent: str = ""
    acked: str = ""
    nacked: str = ""
    error: str = ""
    updated: float = 0.0


@dataclass
class PodStatus:
    ip: str = ""
    ip6: str = ""
    netns: str = ""
    cgroup: str = ""
    adopted: bool = False


@dataclass
class ServiceStatus:
    vip: str
    port: int
    backends: int
    proxy_port: int = 0


@dataclass
class AgentStatus:
    node: str
    running: bool = False
    pid: int = 0
    updated: float = 0.0
    applied: Applied = field(default_factory=Applied)
    errors: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "Kind ns/name" whose newest version the source refused
    quarantined: dict[str, str] = field(default_factory=dict)  # "Kind ns/name" Envoy refused -> Envoy's message
    envoy: dict[str, EnvoyTypeStatus] = field(default_factory=dict)  # short type name -> status
    pods: dict[str, PodStatus] = field(default_factory=dict)  # namespace/name -> pod
    envoy_pid: int | None = None
    datapath_adopted: bool | None = None
    identities: dict[str, str] = field(default_factory=dict)  # identity (as text) -> label set
    rules: dict[str, str] = field(default_factory=dict)  # rule id (as text) -> "MeshPolicy ns/name spec.ingress[i]"
    services: list[ServiceStatus] = field(default_factory=list)
    sockmap: dict[str, Any] = field(default_factory=dict)  # enabled, reason, counts ... (mesh.agent.accel)
    mtls: dict[str, Any] | None = None  # records, identities, tunnels ... (mesh.agent.tunnels)
    reason_counts: dict[str, int] = field(default_factory=dict)
    events_received: int = 0
    events_lost: int = 0
    # Gateway API status the applied plan implies: "Kind ns/name" -> JSON (the operator writes it to the objects)
    gateway_status: dict[str, str] = field(default_factory=dict)

    # ---- file ----
    def write(self, state_dir: Path) -> None:
        path = state_dir / STATUS_FILE
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, default=str))
        tmp.replace(path)

    @classmethod
    def read(cls, state_dir: Path) -> AgentStatus | None:
        """The status in ``state_dir``, or None when there is none (no agent ran there) or it is unreadable."""
        try:
            doc = json.loads((state_dir / STATUS_FILE).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        return cls.from_dict(doc) if isinstance(doc, dict) else None

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> AgentStatus:
        d = _known(cls, doc)
        d["applied"] = Applied(**_known(Applied, doc.get("applied") or {}))
        d["envoy"] = {str(t): EnvoyTypeStatus(**_known(EnvoyTypeStatus, s)) for t, s in (doc.get("envoy") or {}).items()}
        d["pods"] = {str(k): PodStatus(**_known(PodStatus, p)) for k, p in (doc.get("pods") or {}).items()}
        d["services"] = [ServiceStatus(**_known(ServiceStatus, s)) for s in (doc.get("services") or [])]
        d.setdefault("node", "")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- questions readers ask ----
    def rejected(self) -> dict[str, str]:
        """xDS types whose last sent config Envoy refused (and has not accepted since) -> Envoy's error."""
        return {t: s.error for t, s in self.envoy.items() if s.nacked and s.nacked != s.acked}

    def applied_manifests(self) -> str:
        """The manifest part of the source version (an agent with peers reports ``<manifests>+<peers>``)."""
        return self.applied.source_version.split("+")[0]


def _known(cls: type, doc: Any) -> dict[str, Any]:
    """The keys of ``doc`` that ``cls`` has (a newer agent may write more; an older one fewer)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in doc.items() if k in names} if isinstance(doc, dict) else {}


@dataclass(frozen=True)
class NodeRecord:
    """What one node publishes for the others (mesh.runtime.peers: a file in the cluster directory;
    mesh.kube.peers: a ConfigMap): its addresses, its pods' IPs, its mTLS ports."""

    node: str
    wire_ip: str
    pod_cidr: str
    gateway: str
    pods: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # "ns/name" -> {"ip", "ip6"}
    # mTLS: "pod ip:port" -> the port on wire_ip where this node takes Envoy-originated mTLS for it
    mtls_ports: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"node": self.node, "wire_ip": self.wire_ip, "pod_cidr": self.pod_cidr, "gateway": self.gateway,
                           "pods": {k: dict(v) for k, v in sorted(self.pods.items())},
                           "mtls_ports": dict(sorted(self.mtls_ports.items()))}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, text: str, where: str) -> NodeRecord:
        """A node file, checked: its pod IPs must lie in its pod CIDR."""
        try:
            d: Any = json.loads(text)
            if not isinstance(d, dict) or not isinstance(d.get("pods", {}), dict):
                raise ValueError("not a JSON object with a 'pods' object")
            rec = cls(str(d["node"]), str(d.get("wire_ip", "")), str(d["pod_cidr"]), str(d.get("gateway", "")),
                      {str(k): {"ip": str(v.get("ip", "")), "ip6": str(v.get("ip6", ""))} for k, v in d["pods"].items()},
                      {str(k): int(v) for k, v in dict(d.get("mtls_ports") or {}).items()})
            if any(not 0 < p < 65536 for p in rec.mtls_ports.values()):
                raise ValueError("mtls_ports: a port is outside 1-65535")
            try:
                net = ipaddress.ip_network(rec.pod_cidr)
            except ValueError as e:
                raise ValueError(f"pod_cidr {rec.pod_cidr!r}: not a pod CIDR ({e}); use a network address and prefix, "
                                 "e.g. 10.244.1.0/24") from None
            if net.version != 4:
                raise ValueError(f"pod_cidr {rec.pod_cidr}: the pod CIDR must be IPv4")
            for key, p in rec.pods.items():
                if ipaddress.IPv4Address(p["ip"]) not in net:
                    raise ValueError(f"pod {key}: IP {p['ip']} is outside the node's pod CIDR {net}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"read node file {where}: {e}") from None
        return rec
