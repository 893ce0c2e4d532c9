"""The agent's status: one typed record, written by the agent (``<state-dir>/status.json``) and
read through ``AgentStatus.read`` by everyone else (the CLI, the demo, the node reporter).

The file is JSON with the field names below; writing is atomic (temporary file, then rename),
so a reader sees the previous status or the new one, never a part.
"""

from __future__ import annotations

import json
import os
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
