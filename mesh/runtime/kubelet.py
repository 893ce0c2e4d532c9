"""Pods that kubelet runs (a cluster): the runtime only finds them, it never starts one.

kubelet (cgroupfs driver) makes ``<root>/kubepods/[burstable|besteffort/]pod<uid>/`` for a pod
before any of its containers; every container, the pause one too, is a child of it. The
datapath attaches at ``<root>/kubepods`` and takes the known ancestor of a socket's
cgroup as its pod, so the pod-level cgroup id is the pod's identity (``cgroups``). With the
systemd driver the same tree is ``kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice``
(dashes of the uid as underscores).

A pod's cgroup appears after the API has told the agent about the pod; ``version`` changes when
the set of pod cgroups does, so the agent syncs again at once. Until then the pod's sockets
carry no identity: where policy applies they are denied (fail closed).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mesh.model import Pod
from mesh.runtime import cgroups
from mesh.status import PodStatus

# the protocol number of the blackhole routes Webb adds on a node: a route says itself whose it is,
# so an agent that adopted a node from its predecessor (an upgrade) removes at the end what Webb
# added, and never a route the node's admin put there
RTPROT_WEBB = 87


def _blackholes(ipr: object, cidr: str) -> list[int]:
    """The protocol numbers of the main table's blackhole routes for exactly ``cidr``."""
    net, _, plen = cidr.partition("/")
    return [int(r["proto"]) for r in ipr.get_routes(type="blackhole")  # type: ignore[attr-defined]
            if r.get_attr("RTA_DST") == net and str(r["dst_len"]) == plen]


QOS_DIRS = {"Guaranteed": "", "Burstable": "burstable", "BestEffort": "besteffort"}


class KubeletRuntime:
    def __init__(self, node: str, cgroup_root: Path, driver: str = "cgroupfs", service_cidrs: Sequence[str] = ()) -> None:
        """``cgroup_root``: kubelet's ``cgroupRoot`` in the cgroup2 hierarchy (e.g. <cgroup2>/ for "/");
        ``service_cidrs``: blackholed in the host at setup (a VIP the datapath did not rewrite fails at
        once instead of leaving the node: no kube-proxy serves them)."""
        if driver not in ("cgroupfs", "systemd"):
            raise ValueError(f"--cgroup-driver {driver!r}: use cgroupfs or systemd (kubelet's cgroupDriver)")
        self.node = node
        self.root = cgroup_root
        self.driver = driver
        self._pods: dict[str, Pod] = {}
        self.service_cidrs = tuple(service_cidrs)

    @property
    def pods_cgroup(self) -> Path:
        return self.root / ("kubepods" if self.driver == "cgroupfs" else "kubepods.slice")

    @property
    def proxy_cgroup(self) -> Path | None:
        """None when the agent runs as a pod (the DaemonSet): its Envoy is under the pods' cgroup, where
        the datapath answers SO_ORIGINAL_DST already. An agent run on the host gives its Envoy a cgroup of
        its own (``<webb>/<node>/proxy``), which the datapath attaches that answer to as well."""
        if cgroups.own_cgroup().is_relative_to(self.pods_cgroup):
            return None
        return cgroups.node_cgroup(self.node) / "proxy"

    def setup(self) -> None:
        if not self.pods_cgroup.is_dir():
            raise RuntimeError(f"kubelet's pod cgroup {self.pods_cgroup} does not exist: is kubelet running on this node "
                               "with cgroupsPerQOS, and are --kubelet-cgroup-root / --cgroup-driver the kubelet's?")
        proxy = self.proxy_cgroup
        if proxy is not None:
            proxy.mkdir(parents=True, exist_ok=True)
        if self.service_cidrs:
            from pyroute2 import IPRoute

            from mesh.runtime.local import blackhole

            with IPRoute() as ipr:
                for cidr in self.service_cidrs:
                    if not _blackholes(ipr, cidr):
                        blackhole(ipr, cidr, RTPROT_WEBB)

    def teardown(self, keep: bool = False) -> None:
        """The pods are kubelet's: they keep running. Without ``keep`` (Webb leaves the node), the
        blackhole routes Webb added go (``RTPROT_WEBB``; one the admin made stays); with it (an
        upgrade) they stay, for the next agent. The node Envoy's own cgroup (a host-run agent's) goes."""
        proxy = self.proxy_cgroup
        if proxy is not None and proxy.exists():
            cgroups.remove_tree(proxy)
            try:
                proxy.parent.rmdir()  # <webb>/<node>, when nothing else of the node is there
            except OSError:
                pass
        if keep or not self.service_cidrs:
            return
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for cidr in self.service_cidrs:
                if RTPROT_WEBB in _blackholes(ipr, cidr):
                    try:
                        ipr.route("del", dst=cidr, type="blackhole", proto=RTPROT_WEBB)
                    except Exception:  # noqa: BLE001, S110 - already gone
                        pass

    def run(self, pods: Sequence[Pod]) -> tuple[Pod, ...]:
        self._pods = {p.key: p for p in pods}
        return tuple(pods)

    def pod_cgroup(self, pod: Pod) -> Path | None:
        """The pod's cgroup directory, when kubelet has made it."""
        if not pod.uid:
            return None
        classes = [pod.qos] if pod.qos in QOS_DIRS else list(QOS_DIRS)
        for qos in classes:
            path = self._path(pod.uid, QOS_DIRS[qos])
            if path.is_dir():
                return path
        return None

    def _path(self, uid: str, qos: str) -> Path:
        if self.driver == "cgroupfs":
            return self.pods_cgroup / qos / f"pod{uid}" if qos else self.pods_cgroup / f"pod{uid}"
        unit = uid.replace("-", "_")
        if not qos:
            return self.pods_cgroup / f"kubepods-pod{unit}.slice"
        return self.pods_cgroup / f"kubepods-{qos}.slice" / f"kubepods-{qos}-pod{unit}.slice"

    def proxy_cgroups(self) -> tuple[int, ...]:
        """The agent's own cgroup when kubelet runs the agent as a pod (the DaemonSet): the node
        Envoy and the tunnel run there, under the pods' cgroup the programs attach to."""
        own = cgroups.own_cgroup()
        return (cgroups.cgroup_id(own),) if own.is_relative_to(self.pods_cgroup) else ()

    def cgroups(self) -> dict[int, str]:
        out = {}
        for key, pod in self._pods.items():
            path = self.pod_cgroup(pod)
            if path is not None:
                try:
                    out[cgroups.cgroup_id(path)] = key
                except FileNotFoundError:  # removed meanwhile
                    continue
        return out

    def version(self) -> str:
        """Changes when a pod cgroup appears or goes (a scan of the QoS levels, no recursion)."""
        names: list[str] = []
        for sub in ("", *(d for d in QOS_DIRS.values() if d)):
            d = self.pods_cgroup / (sub if self.driver == "cgroupfs" or not sub else f"kubepods-{sub}.slice")
            try:
                names += sorted(f"{sub}/{e.name}" for e in os.scandir(d) if e.is_dir() and "pod" in e.name)
            except FileNotFoundError:
                continue
        return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]

    def addresses(self) -> dict[str, tuple[str, str]]:
        return {k: (p.ip, p.ip6) for k, p in self._pods.items() if p.ip}

    def set_hosts(self, hosts: Mapping[str, Sequence[str]]) -> None:
        """Nothing: pods resolve Service names through the cluster's DNS."""

    def status(self) -> dict[str, PodStatus]:
        out = {}
        for k, p in self._pods.items():
            path = self.pod_cgroup(p)
            out[k] = PodStatus(p.ip, p.ip6, "", str(path) if path else "", False)
        return out
