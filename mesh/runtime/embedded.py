"""The embedded mode's pod runtime: ``mesh.runtime.local.LocalNode`` behind ``PodRuntime``.

Pods of the Webb system namespace (the sockmap self-test's) are the accelerator's own: they
are neither removed by ``run`` nor published.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from mesh.model import SYSTEM_NAMESPACE, Pod
from mesh.runtime.local import LocalNode
from mesh.status import PodStatus


class EmbeddedRuntime:
    def __init__(self, node: LocalNode) -> None:
        self.node = node

    @property
    def pods_cgroup(self) -> Path:
        return self.node.config.pods_cgroup

    @property
    def proxy_cgroup(self) -> Path:
        return self.node.config.proxy_cgroup

    def setup(self) -> None:
        self.node.setup()

    def teardown(self, keep: bool = False) -> None:
        self.node.teardown()  # the embedded runtime's pods are its own: they go with it

    def run(self, pods: Sequence[Pod]) -> tuple[Pod, ...]:
        wanted = {p.key for p in pods}
        for key in list(self.node.sandboxes):
            if key not in wanted and not key.startswith(SYSTEM_NAMESPACE + "/"):
                self.node.remove_pod(key)
        out = []
        for p in sorted(pods, key=lambda p: p.key):
            sb = self.node.ensure_pod(p.key, p.command, env={"POD_NAME": p.name, "POD_NAMESPACE": p.namespace})
            out.append(replace(p, ip=sb.ip, ip6=sb.ip6, node=self.node.config.name))
        return tuple(out)

    def cgroups(self) -> dict[int, str]:
        return {sb.cgroup_id: sb.key for sb in self.node.sandboxes.values()}

    def addresses(self) -> dict[str, tuple[str, str]]:
        return {k: (sb.ip, sb.ip6) for k, sb in self.node.sandboxes.items() if not k.startswith(SYSTEM_NAMESPACE + "/")}

    def set_hosts(self, hosts: Mapping[str, Sequence[str]]) -> None:
        for sb in self.node.sandboxes.values():
            self.node.write_hosts(sb, {vip: list(names) for vip, names in hosts.items()})

    def proxy_cgroups(self) -> tuple[int, ...]:
        return ()  # the agent and its Envoy run outside the pods' cgroup

    def version(self) -> str:
        return ""  # its pods change only when the agent runs them

    def status(self) -> dict[str, PodStatus]:
        return {k: PodStatus(sb.ip, sb.ip6, sb.netns, str(sb.cgroup), sb.adopted) for k, sb in self.node.sandboxes.items()}
