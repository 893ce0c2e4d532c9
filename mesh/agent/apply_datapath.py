"""Plan → datapath state: what the kernel maps must hold for a plan (pure; the loader writes it)."""

from __future__ import annotations

from datapath.maps import DatapathState
from datapath.types import EP_LOCAL, EP_PROXY
from mesh.plan.node import NodePlan
from mesh.plan.tunnels import NODE_IDENTITY


def datapath_state(plan: NodePlan, cgroups: dict[int, str], extra: dict[str, tuple[int, int]] | None = None,
                   proxy_cgroups: tuple[int, ...] = ()) -> DatapathState:
    """``cgroups``: cgroup id -> pod key (the runtime's); ``extra``: endpoints the agent adds for
    itself (the sockmap self-test pods), overridden by the plan's; ``proxy_cgroups``: the node
    proxy's own (the agent as a pod), marked EP_PROXY."""
    by_pod = {pod: (identity, flags) for pod, identity, flags in plan.sources}
    by_pod.update((e.pod, (e.identity, e.flags)) for e in plan.endpoints)
    endpoints = {ip: (e.identity, e.flags) for e in plan.endpoints for ip in (e.ip, e.ip6) if ip}
    for ip, identity, flags in plan.node_endpoints:
        # a node address is the node, even where a hostNetwork pod (the agent's own) has it as its pod IP:
        # connections from it are the node's proxy, tunnel or kubelet
        endpoints[ip] = (identity, flags | (endpoints.get(ip, (0, 0))[1] & EP_LOCAL))
    return DatapathState(
        services=list(plan.services),
        endpoints={**(extra or {}), **endpoints},
        cgroups={**{cid: by_pod[key] for cid, key in cgroups.items() if key in by_pod},
                 **{cid: (NODE_IDENTITY, EP_PROXY) for cid in proxy_cgroups}},
        policy=list(plan.policy),
    )
