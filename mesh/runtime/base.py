"""What the agent needs from whatever runs the pods of its node: one interface.

The embedded mode runs pods itself (``mesh.runtime.embedded``: network namespaces, veths on a
bridge, cgroups, processes); in a cluster kubelet runs them and the runtime only finds them.
The agent drives either through this Protocol and never knows which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from mesh.model import Pod
from mesh.status import PodStatus


class PodRuntime(Protocol):
    @property
    def pods_cgroup(self) -> Path:
        """The cgroup that holds every pod of this node: the datapath attaches its programs there."""

    @property
    def proxy_cgroup(self) -> Path | None:
        """A cgroup of its own for the node Envoy when it runs beside the pods (the embedded node):
        the datapath attaches its SO_ORIGINAL_DST answer there too. None: Envoy runs under
        ``pods_cgroup`` already (the agent's pod)."""

    def setup(self) -> None:
        """Make the node ready (bridge, routes, cgroups), adopting what a killed agent left."""

    def teardown(self, keep: bool = False) -> None:
        """Remove what ``setup`` and the pods made; ``keep``: the node stays as it is for the next
        agent (an upgrade: its pods run on and the pinned programs keep enforcing)."""

    def run(self, pods: Sequence[Pod]) -> tuple[Pod, ...]:
        """Make exactly these pods (this node's) exist; return them with their addresses and node."""

    def cgroups(self) -> dict[int, str]:
        """cgroup id -> pod key, for every cgroup whose sockets are a pod's (its identity)."""

    def addresses(self) -> dict[str, tuple[str, str]]:
        """pod key -> (IPv4, IPv6 or "") of this node's pods."""

    def set_hosts(self, hosts: Mapping[str, Sequence[str]]) -> None:
        """Service names each pod resolves: VIP -> names (the embedded mode writes /etc/hosts)."""

    def status(self) -> dict[str, PodStatus]:
        """What ``webb status`` shows of each pod."""

    def proxy_cgroups(self) -> tuple[int, ...]:
        """Cgroups of the node proxy itself (the agent and its Envoy) under the pods' cgroup, if any:
        their sockets are neither rewritten nor judged, as the host's are not."""

    def version(self) -> str:
        """Changes when what the runtime found changes on its own (kubelet made a pod's cgroup)."""
