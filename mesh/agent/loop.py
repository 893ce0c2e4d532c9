"""The node agent: load → plan → apply.

Load: the source (a manifest directory, or the API server) and, with several nodes, the
peers; the pod runtime makes this node's pods exist and gives their addresses. Plan:
``mesh.plan.plan_node`` (pure). Apply: Envoy's snapshot (``apply_envoy``), the tunnels, the
datapath maps (``apply_datapath``).

Order of a sync, make-before-break: pods exist → Envoy has ACKed the listeners the plan
needs → the datapath starts redirecting to them. A NACK keeps Envoy on the last good
config and the datapath on the last plan Envoy accepted; status says which and why.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from datapath.loader import Datapath, pin_dir_for
from datapath.maps import DatapathState
from mesh.agent.accel import Accelerator
from mesh.agent.apply_datapath import datapath_state
from mesh.agent.apply_envoy import envoy_snapshot
from mesh.agent.flows import FlowLog, Names, Tail, from_access_log, from_event
from mesh.agent.metrics import DEFAULT_ADDRESS as METRICS_ADDRESS
from mesh.agent.metrics import AgentMetrics
from mesh.agent.quarantine import Quarantine, envoy_objects, with_objects
from mesh.agent.tunnels import NodeTunnels
from mesh.model import ClusterState
from mesh.plan.node import NodePlan, NodeSpec, Peer, plan_node
from mesh.plan.tunnels import proxy_id
from mesh.runtime.base import PodRuntime
from mesh.runtime.embedded import EmbeddedRuntime
from mesh.runtime.local import LocalNode, NodeConfig, node_addresses
from mesh.runtime.peers import ClusterSource, PeerDirectory, Peers, split_pods
from mesh.source import Source, StandaloneSource
from mesh.state import Key
from mesh.status import AgentStatus, Applied, EnvoyTypeStatus, ServiceStatus
from xds.cache import Snapshot, SnapshotCache
from xds.envoy import Envoy, EnvoyConfig
from xds.incremental import Translator
from xds.model import TrustBundle, WorkloadIdentity
from xds.server import XdsServer

log = logging.getLogger("webb.agent")
# The loop waits this long for flow events, so a source change is seen within it (the ring
# buffer wakes it at once when events come); status is rewritten at least this often.
LOOP_WAIT_MS = 10
STATUS_INTERVAL_S = 0.5
MAX_TRIES = 32  # offers to Envoy to isolate the objects of one NACK (bisection: ~2 per refused object and level)


@dataclass(frozen=True)
class AgentConfig:
    node: NodeConfig = field(default_factory=NodeConfig)
    manifests: Path = Path("/run/webb/manifests")
    envoy_admin_port: int = 15000
    envoy_concurrency: int = 1
    envoy_log_level: str = "warning"
    xds_delta: bool = True  # incremental xDS to Envoy; False: state of the world
    envoy_all_stats: bool = False  # every Envoy stat (costly at scale); default: config plane and server only
    lifetime_s: float = 0.0  # > 0: the agent stops by itself after this (tests, demos); 0: until stopped
    ack_timeout_s: float = 10.0
    sockmap: bool = False  # same-node acceleration: opt-in, and only after its self-test passed
    canary_interval_s: float = 30.0  # how often the accelerated path is re-checked
    # Ingress (class webb) listeners, on 127.0.0.1 only: the node's own address for the
    # outside is a deployment choice this local runtime does not make
    ingress_http_port: int = 80
    ingress_https_port: int = 443
    gateway_addresses: tuple[str, ...] = ("127.0.0.1",)  # where Gateways (class webb) are served
    # several nodes (mesh.runtime.peers): where the nodes publish their pods, and this node's wire address
    cluster_dir: Path | None = None
    wire_ip: str = ""
    # mTLS (MeshTLS): the CA every node of the mesh shares (own root made on first use, or the
    # user's intermediate), and the SPIFFE trust domain
    ca_dir: Path | None = None  # default: <state-dir>/ca (one node)
    trust_domain: str = "cluster.local"
    # where the node Envoy and the tunnel listeners take the pods' redirected connections: the node's
    # bridge gateway (embedded mode), or in a cluster the Node's InternalIP (any CNI routes pods to it)
    proxy_ip: str = ""
    metrics_address: str = METRICS_ADDRESS  # Prometheus /metrics (mesh.agent.metrics); "" or "off": none

    @property
    def node_proxy_ip(self) -> str:
        return self.proxy_ip or self.node.gateway

    @property
    def state_dir(self) -> Path:
        return self.node.state_dir


class Agent:
    def __init__(self, cfg: AgentConfig, source: Source | None = None, runtime: PodRuntime | None = None,
                 peers: PeerDirectory | None = None, keep_on_stop: Callable[[], bool] | None = None) -> None:
        self.cfg = cfg
        # asked once, at stop: True leaves the node to the next agent (an upgrade: programs, maps and
        # routes stay and keep enforcing; the next agent adopts them); default: Webb leaves the node
        self.keep_on_stop = keep_on_stop or (lambda: False)
        # whatever runs this node's pods: the embedded runtime (pods as network namespaces) by default
        self.runtime: PodRuntime = runtime or EmbeddedRuntime(LocalNode(cfg.node))
        # the manifest directory, or the API server (mesh.kube.watch.KubeSource)
        self.source: Source = source or StandaloneSource(cfg.manifests, cfg.node.service_cidr, cfg.node.service_cidr6)
        # several nodes: the other nodes' records (tunnel address, mTLS ports; pod IPs in the embedded mode)
        self.peers: PeerDirectory | None = peers
        if peers is None and cfg.cluster_dir is not None:
            self.peers = Peers(cfg.cluster_dir, cfg.node.name, cfg.wire_ip, cfg.node.pod_cidr, cfg.node.gateway)
        if self.peers is not None:
            self.source = ClusterSource(self.source, self.peers)
        self.cache = SnapshotCache()
        self.flows = FlowLog(cfg.state_dir / "flows.jsonl")
        self.access_log = cfg.state_dir / "envoy-access.jsonl"
        self.translator = Translator(str(self.access_log))  # Envoy resources, rebuilt only where the plan changed
        self.names = Names()
        self.plan: NodePlan | None = None
        self.applied = Applied()
        self.errors: list[str] = []
        self.refused: list[str] = []
        self._host_ips: tuple[str, ...] = ()  # the node's own addresses, read at each sync
        self.good: Snapshot | None = None  # the last snapshot Envoy ACKed: served again after a NACK
        self.quarantine = Quarantine()  # objects Envoy refused, held at their last accepted version
        self._stop = False
        self._seen_version = ""
        self._seen_runtime = ""
        self._retry_at = 0.0  # an unanswered snapshot (no ACK, no NACK) is tried again then
        self._retry_backoff_s = 0.0
        self.envoy: Envoy | None = None
        self.datapath: Datapath | None = None
        self.accel: Accelerator | None = None
        self._next_canary = 0.0
        self.tunnels: NodeTunnels | None = None
        self.metrics = AgentMetrics(self)  # read at scrape time, on the metrics server's thread

    # ---- lifecycle ----
    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        # 0: until stopped (a DaemonSet); tests and the demo bound it
        deadline = time.monotonic() + self.cfg.lifetime_s if self.cfg.lifetime_s > 0 else float("inf")
        self.cfg.manifests.mkdir(parents=True, exist_ok=True)
        self.runtime.setup()
        # a unix socket only this user can open, in the state directory (reused after a crash) when
        # its path fits a unix socket address, else in a directory of its own
        xds_dir = self.cfg.state_dir / "xds"
        xds = XdsServer(self.cache, xds_dir if len(str(xds_dir / "xds.sock")) < 100 else None)
        xds.start()
        self.metrics.start(self.cfg.metrics_address, xds)
        self.cache.set_snapshot(self.cfg.node.name, Snapshot.of({}))
        self.envoy = Envoy(EnvoyConfig(self.cfg.node.name, xds.path, self.cfg.envoy_admin_port,
                                       self.cfg.state_dir / "envoy", self.cfg.envoy_concurrency,
                                       self.cfg.envoy_log_level, delta=self.cfg.xds_delta,
                                       stats_prefixes=() if self.cfg.envoy_all_stats else EnvoyConfig.stats_prefixes,
                                       cgroup=self.runtime.proxy_cgroup))
        try:
            self.envoy.start()
            self.envoy.wait_ready()
            proxy_cg = self.runtime.proxy_cgroup
            self.datapath = Datapath(str(self.runtime.pods_cgroup), pin_dir_for(self.cfg.node.name),
                                     proxy_cgroup=str(proxy_cg) if proxy_cg else None)
            log.info("datapath %s", "adopted from pins" if self.datapath.adopted else "loaded and pinned")
            self.datapath.set_acceleration(False)  # on again only after this run's self-test
            if self.cfg.sockmap:
                self._start_accel()
            self.tunnels = NodeTunnels(self.cfg.node.name, self.cfg.state_dir, self.cfg.ca_dir or self.cfg.state_dir / "ca",
                                       self.cfg.trust_domain, self.cfg.node_proxy_ip, self.cfg.wire_ip,
                                       max(1.0, deadline - time.monotonic()))
            self.tunnels.start()
            self._publish()
            tail = Tail(self.access_log)
            tail.offset = self.access_log.stat().st_size if self.access_log.exists() else 0
            self._write_status()
            written = time.monotonic()
            while not self._stop and time.monotonic() < deadline:
                version = self.source.version()
                if self._retry_at and time.monotonic() >= self._retry_at:
                    self._retry_at = 0.0
                    self._seen_version = ""  # Envoy did not answer the last snapshot: sync again
                runtime_version = self.runtime.version()
                if version != self._seen_version or runtime_version != self._seen_runtime:
                    self._seen_runtime = runtime_version
                    with self.metrics.sync_timer():
                        self._sync_guarded(version)
                    self._publish()
                    self._write_status()  # at once: `webb apply` and the operator wait on it
                    written = time.monotonic()
                self.envoy.check()
                if proxy_id(self.cfg.trust_domain) in self.tunnels.rotate():
                    self._seen_version = ""  # Envoy's certificate was renewed: a new snapshot (SDS) at once
                if self.accel is not None and time.monotonic() > self._next_canary:
                    self._next_canary = time.monotonic() + self.cfg.canary_interval_s
                    st = self.accel.canary()
                    if not st.enabled:
                        log.warning("sockmap acceleration %s", st.reason)
                self._collect(tail)
                if time.monotonic() - written >= STATUS_INTERVAL_S:
                    self._publish()  # again, in case the last one failed (the API was away)
                    self._write_status()
                    written = time.monotonic()
        finally:
            self._shutdown(xds)

    def _request_stop(self) -> None:
        self._stop = True

    def _start_accel(self) -> None:
        assert self.datapath is not None
        if not isinstance(self.runtime, EmbeddedRuntime):  # the self-test runs its own two pods
            raise RuntimeError("sockmap acceleration (--sockmap) needs the embedded pod runtime for its self-test")
        self.accel = Accelerator(self.runtime.node, self.datapath)
        self.datapath.apply(DatapathState(endpoints=self.accel.start_pods()))
        st = self.accel.self_test()
        log.log(logging.INFO if st.enabled else logging.WARNING, "sockmap acceleration: %s (%.1f s)",
                st.reason, st.last_run_s)
        self._next_canary = time.monotonic() + self.cfg.canary_interval_s

    def _shutdown(self, xds: XdsServer) -> None:
        self.metrics.stop()  # first: no scrape reads what is being released
        try:
            keep = self.keep_on_stop()
        except Exception as e:  # noqa: BLE001 - unsure: keep enforcing (the next agent adopts; an uninstall says so again)
            log.warning("whether to leave the node to a next agent: %s; keeping the datapath", e)
            keep = True
        if keep:
            log.info("stopping for a next agent: programs, maps and routes stay (pinned) and keep enforcing")
        if self.tunnels is not None:
            self.tunnels.stop()
        if self.accel is not None:
            self.accel.stop()
        if self.peers is not None and not keep:
            self.peers.withdraw()
        # the pods go before their policy: never a pod running without the programs
        self.runtime.teardown(keep=keep)
        if self.datapath is not None:
            self.datapath.close(unpin=not keep)
        if self.envoy is not None:
            self.envoy.stop()
        xds.stop()
        self._write_status(running=False)

    # ---- one reconcile pass ----
    def _sync_guarded(self, version: str) -> None:
        """A sync that raises (a bug, input no check foresaw) never takes the node down: the last
        applied plan stays in force (datapath and Envoy), the error is reported in the status, and
        the next change of the source or the pods tries again."""
        try:
            self.sync(version)
        except Exception as e:  # noqa: BLE001 - the node keeps enforcing; the error is in the status
            log.exception("sync of source version %s", version)
            self._seen_version = version
            self.errors = [f"sync of source version {version} failed ({type(e).__name__}: {e}); the last applied plan "
                           f"{self.applied.plan_version or '(none)'} stays in force"]

    def sync(self, version: str) -> None:
        self._seen_version = version
        t0 = time.monotonic()
        state = self.source.load()
        t_load = time.monotonic()
        self.refused = list(state.refused)
        self._host_ips = node_addresses()
        mine, others = split_pods(state.pods, self.cfg.node.name)  # the other nodes' pods keep their node's IPs
        state = replace(state, pods=self.runtime.run(mine) + tuple(others))
        peers = {n: Peer(r.wire_ip, tuple(sorted(r.mtls_ports.items())), (r.gateway,) if r.gateway else ())
                 for n, r in (self.peers.read() if self.peers else {}).items()}
        state = self.quarantine.hold_back(state)  # quarantined objects stay at their last accepted version
        try:
            plan, snap, ok = self._offer(state, peers)
            if not ok and self._rejections(snap) and self.quarantine.suspects(state):
                state, plan, snap, ok = self._isolate(state, peers, self._rejections(snap))
            if not ok:  # Envoy refuses even without the changed objects (not an object's fault), or is silent
                self._not_accepted(plan, snap, version)
                return
        except (ValueError, KeyError) as e:  # a translation bug must not stop the node: keep the last plan
            log.exception("build Envoy config for source version %s", version)
            self.errors = [f"build Envoy config for source version {version}: {e}; Envoy and datapath kept on the last "
                           "accepted plan"]
            self.applied.source_version = version
            return
        t_envoy = time.monotonic()
        self.good = snap
        self.quarantine.accept(state)
        self._retry_at, self._retry_backoff_s = 0.0, 0.0
        self.runtime.set_hosts(dict(plan.hosts))
        assert self.datapath is not None and self.tunnels is not None
        tunnel_errors = self.tunnels.update(state, plan, plan.tunnels)  # listeners open before connect4 redirects to them
        cgroups = self.runtime.cgroups()
        changed = self.datapath.apply(datapath_state(plan, cgroups, self.accel.endpoints() if self.accel else None,
                                                     self.runtime.proxy_cgroups()))
        self.plan = plan
        self.names = Names.of(plan, cgroups)
        self.errors = list(plan.warnings) + tunnel_errors + self.quarantine.errors()
        self.refused += self.quarantine.names()
        self.applied = Applied(version, version, plan.version, plan.version, snap.version, changed, time.time())
        log.info("applied plan %s (%d map entries changed) in %.0f ms: load %.0f, plan + Envoy ACK %.0f, datapath %.0f",
                 plan.version, changed, 1000 * (time.monotonic() - t0), 1000 * (t_load - t0), 1000 * (t_envoy - t_load),
                 1000 * (time.monotonic() - t_envoy))

    def _offer(self, state: ClusterState, peers: dict[str, Peer]) -> tuple[NodePlan, Snapshot, bool]:
        """Plan ``state`` and offer it to Envoy: (plan, snapshot, ACKed)."""
        plan = plan_node(state, self.spec, peers)
        snap = envoy_snapshot(plan, self.translator, self._proxy_mtls if self.tunnels else None)
        t0 = time.monotonic()
        self.cache.set_snapshot(self.cfg.node.name, snap)
        ok = self.cache.wait_acked(self.cfg.node.name, snap, self.cfg.ack_timeout_s)
        self.metrics.pushed(time.monotonic() - t0, "acked" if ok else "nacked" if self._rejections(snap) else "timeout")
        return plan, snap, ok

    def _rejections(self, snap: Snapshot) -> list[str]:
        """Envoy's messages for the types of ``snap`` it refused (NACK)."""
        mine = set(snap.versions.values())
        return [f"Envoy rejected {t.rsplit('.', 1)[-1]} {s.nacked}: {s.error}"
                for t, s in self.cache.status(self.cfg.node.name).items() if s.nacked and s.nacked in mine]

    def _isolate(self, state: ClusterState, peers: dict[str, Peer],
                 first: list[str]) -> tuple[ClusterState, NodePlan, Snapshot, bool]:
        """After a NACK: find the changed objects Envoy refuses (bisection over the suspects, at most
        ``MAX_TRIES`` offers) and quarantine them. Returns the largest state Envoy accepted with its
        plan and snapshot, or the state without any changed object and False when Envoy refuses
        even that."""
        suspects = self.quarantine.suspects(state)
        base = self.quarantine.revert(state, suspects)
        plan, snap, ok = self._offer(base, peers)
        if not ok:
            return base, plan, snap, False
        tries = 0

        def narrow(keys: list[Key], refused: list[str]) -> None:
            """``refused``: Envoy's messages when ``keys`` together are already known refused."""
            nonlocal base, plan, snap, tries
            if not refused:
                if tries >= MAX_TRIES:
                    self.quarantine.hold(state, keys, "not tried alone: too many objects were refused at once")
                    return
                tries += 1
                trial = with_objects(base, {**envoy_objects(base), **{k: o for k, o in envoy_objects(state).items() if k in keys}})
                t_plan, t_snap, t_ok = self._offer(trial, peers)
                if t_ok:
                    base, plan, snap = trial, t_plan, t_snap
                    return
                refused = self._rejections(t_snap) or ["Envoy did not ACK it"]
            if len(keys) == 1:
                self.quarantine.hold(state, keys, "; ".join(refused))
                return
            half = len(keys) // 2
            narrow(keys[:half], [])
            narrow(keys[half:], [])

        narrow(suspects, first)  # all of them together: refused already
        log.warning("quarantined after a NACK: %s", ", ".join(self.quarantine.names()))
        return base, plan, snap, True

    @property
    def spec(self) -> NodeSpec:
        return NodeSpec(self.cfg.node.name, self.cfg.node_proxy_ip, self.cfg.node.gateway6 if not self.cfg.proxy_ip else "",
                        ingress_http_port=self.cfg.ingress_http_port, ingress_https_port=self.cfg.ingress_https_port,
                        gateway_addresses=self.cfg.gateway_addresses,
                        trust_domain=self.cfg.trust_domain, host_ips=self._host_ips)

    def _proxy_mtls(self) -> tuple[WorkloadIdentity, TrustBundle]:
        """The node proxy's certificate and the trust bundle (Envoy-originated mTLS to other nodes)."""
        assert self.tunnels is not None
        return self.tunnels.proxy_identity(), TrustBundle(self.cfg.trust_domain, self.tunnels.ca.bundle_pem())
    def _not_accepted(self, plan: NodePlan, snap: Snapshot, version: str) -> None:
        """Envoy refused (NACK) or did not answer in time. The datapath stays on the last plan
        Envoy accepted: it never redirects to a listener Envoy does not have. A refused snapshot
        is replaced by the last good one, so a restarted Envoy gets a config it accepts."""
        rejected = self._rejections(snap)
        if rejected and self.good is not None:
            self.cache.set_snapshot(self.cfg.node.name, self.good)
        why = "rejected it" if rejected else f"did not ACK it within {self.cfg.ack_timeout_s:.0f} s"
        if not rejected:  # a NACK is final for this config; silence is retried, backing off to 60 s
            self._retry_backoff_s = min(60.0, max(1.0, 2 * self._retry_backoff_s))
            self._retry_at = time.monotonic() + self._retry_backoff_s
            why += f" (retrying in {self._retry_backoff_s:.0f} s)"
        self.errors = list(plan.warnings) + rejected + [
            f"Envoy {why}: plan {plan.version} not applied; Envoy and datapath kept on the last accepted plan"]
        self.applied.source_version = version

    def _publish(self) -> None:
        """Several nodes: this node's pods and addresses, for the other nodes (mesh.runtime.peers)."""
        if self.peers is not None:
            self.peers.publish(self.runtime.addresses(), dict(self.plan.tunnels.inbound) if self.plan else {})

    # ---- observability ----
    def _collect(self, tail: Tail) -> None:
        flows = []
        if self.datapath is not None:
            flows += [from_event(e, self.names) for e in self.datapath.poll_events(LOOP_WAIT_MS)]
        if self.tunnels is not None:
            flows += self.tunnels.drain_flows()
        for line in tail.lines():
            try:
                flows.append(from_access_log(json.loads(line), self.names))
            except (json.JSONDecodeError, ValueError):
                log.warning("unreadable access log line: %.200s", line)
        self.flows.write(flows)

    def _write_status(self, running: bool = True) -> None:
        st = AgentStatus(
            self.cfg.node.name, running, os.getpid(), time.time(), self.applied, list(self.errors), list(self.refused),
            envoy={t.rsplit(".", 1)[-1]: EnvoyTypeStatus(s.sent, s.acked, s.nacked, s.error, s.updated)
                   for t, s in self.cache.status(self.cfg.node.name).items()},
            pods=self.runtime.status(),
            envoy_pid=self.envoy.proc.pid if self.envoy is not None and self.envoy.proc else None,
            datapath_adopted=self.datapath.adopted if self.datapath is not None else None,
            quarantined=self.quarantine.reasons(),
        )
        if self.plan is not None:
            st.identities = {str(i): text for i, text in self.plan.identities}
            st.rules = {str(i): text for i, text in self.plan.rules}
            st.services = [ServiceStatus(s.vip, s.port, len(s.backends), s.proxy_port) for s in self.plan.services]
            st.gateway_status = dict(self.plan.gateway_status)
        st.sockmap = vars(self.accel.status) if self.accel else {"enabled": False, "reason": "not requested (--sockmap)"}
        if self.tunnels is not None:
            st.mtls = self.tunnels.status(self.plan.tunnels if self.plan else None)
        if self.datapath is not None and running:
            st.sockmap["counts"] = self.datapath.accel_counts()
            st.reason_counts = {r.text: n for r, n in self.datapath.reason_counts().items()}
            st.events_received = self.datapath.received
            st.events_lost = self.datapath.events_lost()
        st.write(self.cfg.state_dir)
