"""The node's mTLS tunnels at run time: identities, the accepting server on the node's wire
address, one outbound listener per tunnelled service port, and what each tunnel did.

The agent calls :meth:`NodeTunnels.update` with every plan before the datapath redirects to
the listeners (make-before-break) and :meth:`drain_flows` from its loop.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certs.ca import CertificateAuthority, WorkloadCert
from certs.spiffe import parse_spiffe_id, spiffe_id
from certs.store import IdentityStore
from mesh.model import ClusterState
from mesh.plan.node import NodePlan
from mesh.plan.policy import authorize
from mesh.plan.tunnels import (
    PROXY_NAMESPACE,
    PROXY_SERVICE_ACCOUNT,
    TUNNEL_PORT,
    OutListener,
    TunnelBackend,
    TunnelPlan,
    source_identity,
)
from tunnel.accept import ACCEPT, BUSY, AcceptLoop, Slots
from tunnel.ktls import TunnelError, kernel_has_ktls
from tunnel.session import Refusal, Session, TunnelNode, TunnelServer, relay

log = logging.getLogger("webb.tunnels")
MAX_CONNS = 512
ROTATE_EVERY_S = 10.0


def _listen(addr: str, port: int, errors: list[str], what: str, effect: str) -> socket.socket | None:
    """A listening socket, or None with the reason added to ``errors`` (the sync goes on)."""
    try:
        return socket.create_server((addr, port))
    except OSError as e:
        errors.append(f"{what} ({addr}:{port}): {e.strerror}; {effect}")
        return None


@dataclass
class _Out:
    spec: OutListener
    sock: socket.socket
    loop: AcceptLoop | None = None  # set right after: the loop ends when this _Out is no longer the port's
    rr: itertools.count = field(default_factory=itertools.count)


class NodeTunnels:
    def __init__(self, node: str, state_dir: Path, ca_dir: Path, trust_domain: str, gateway: str,
                 wire_addr: str = "", lifetime_s: float = 3600.0) -> None:
        self.name, self.gateway, self.wire_addr = node, gateway, wire_addr
        self.ca = CertificateAuthority.load_or_create(ca_dir, trust_domain)
        self.store = IdentityStore(self.ca, state_dir / "certs")
        self.ktls = kernel_has_ktls()
        # the composition: the tunnel takes the identity store as its tunnel.session.Identities
        self.node = TunnelNode(self.store, state_dir / "tls" / "keylog", self.ktls, self._hosted)
        self.deadline = time.monotonic() + lifetime_s
        # (state, plan) replaced as one: an accepting thread never pairs a new state with an old plan
        self._view: tuple[ClusterState, NodePlan | None] = (ClusterState(), None)
        self.server: TunnelServer | None = None
        self.direct: dict[str, tuple[int, TunnelServer]] = {}  # "pod ip:port" -> (port, server): Envoy-originated mTLS
        self.outs: dict[int, _Out] = {}
        self.flows: deque[dict[str, Any]] = deque(maxlen=10000)
        self.counts = {"forwarded": 0, "denied": 0, "failed": 0}
        self.bytes = {"to_tunnel": 0, "from_tunnel": 0}  # relayed by the outbound connections that ended (metrics)
        self._counts_lock = threading.Lock()
        self._slots = Slots(MAX_CONNS)  # shared by every outbound listener
        self._stop = threading.Event()
        self._next_rotation = 0.0

    @property
    def state(self) -> ClusterState:
        return self._view[0]

    @property
    def mode(self) -> str:
        return self.node.mode

    def start(self) -> None:
        if self.wire_addr:
            try:
                listen = socket.create_server((self.wire_addr, TUNNEL_PORT))
            except OSError as e:
                raise RuntimeError(f"mTLS tunnel: cannot listen on {self.wire_addr}:{TUNNEL_PORT}: {e.strerror}; "
                                   "--wire-ip must be an address of this node, the port free") from None
            self.server = TunnelServer(self.node, listen, self._authorize, MAX_CONNS,
                                       max(1.0, self.deadline - time.monotonic())).start()
        log.info("mTLS tunnels: %s%s", self.mode, "" if self.ktls else " (the kernel has no kTLS: records in user space)")

    def stop(self) -> None:
        self._stop.set()
        for out in self.outs.values():
            out.sock.close()
        for out in self.outs.values():
            if out.loop is not None:
                out.loop.join(timeout=2)
        self.outs.clear()
        TunnelServer.stop_all([srv for _, srv in self.direct.values()])
        self.direct.clear()
        if self.server is not None:
            self.server.stop()
        self.node.keylog.close()

    # ---- plan ----
    def _hosted(self, ns: str, sa: str) -> bool:
        return any(p.node == self.name and (p.namespace, p.service_account) == (ns, sa) for p in self.state.pods)

    def _authorize(self, peer: str, src: str, dst: str) -> Refusal | str | None:
        state, plan = self._view
        if plan is None:
            return Refusal("this node has no plan yet", final=False)
        _, ns, sa = parse_spiffe_id(peer)
        denial = authorize(state, plan, self.name, (ns, sa), peer, src, dst)
        return None if denial is None else Refusal(denial.reason, denial.final)

    def update(self, state: ClusterState, plan: NodePlan, tplan: TunnelPlan) -> list[str]:
        """Listeners for ``tplan`` open (and identities issued) before this returns; the ones
        that could not be opened, with why (their connections are refused: fail closed)."""
        errors: list[str] = []
        self._view = (state, plan)
        mine = {(p.namespace, p.service_account) for p in state.pods if p.node == self.name}
        for ns, sa in sorted(mine):
            self.store.get(ns, sa)  # issued now, not on the first connection
        self.store.forget(mine | {(PROXY_NAMESPACE, PROXY_SERVICE_ACCOUNT)})  # the node Envoy's identity stays
        errors += self._update_direct(dict(tplan.inbound))
        want = {o.port: o for o in tplan.listeners}
        for port in set(self.outs) - set(want):
            self.outs.pop(port).sock.close()
        for port, spec in want.items():
            if port in self.outs and self.outs[port].spec.name == spec.name:
                self.outs[port].spec = spec  # new backends for new connections
                continue
            if port in self.outs:  # the port now belongs to another service: never mix their clients
                self.outs.pop(port).sock.close()
            sock = _listen(self.gateway, port, errors, f"mTLS tunnel listener for {spec.name}",
                           "its connections are refused")
            if sock is None:
                continue
            self.outs[port] = out = _Out(spec, sock)
            out.loop = self._serve(port, out)
        return errors

    def _update_direct(self, want: dict[str, int]) -> list[str]:
        """A TLS port on the wire address for each backend of this node other nodes' Envoys reach."""
        if not self.wire_addr:
            return []
        errors: list[str] = []
        TunnelServer.stop_all([self.direct.pop(d)[1] for d, (port, _) in list(self.direct.items())
                               if want.get(d) != port])
        for dst, port in want.items():
            if dst in self.direct:
                continue
            listen = _listen(self.wire_addr, port, errors, f"mTLS port for {dst}",
                             "other nodes' Envoys cannot reach that backend")
            if listen is None:
                continue
            self.direct[dst] = (port, TunnelServer(self.node, listen, self._authorize, MAX_CONNS,
                                                   max(1.0, self.deadline - time.monotonic()), fixed_dst=dst).start())
        return errors

    def proxy_identity(self) -> WorkloadCert:
        """The certificate the node's Envoy presents to other nodes (SDS)."""
        return self.store.get(PROXY_NAMESPACE, PROXY_SERVICE_ACCOUNT)

    def rotate(self) -> list[str]:
        if time.monotonic() < self._next_rotation:
            return []
        self._next_rotation = time.monotonic() + ROTATE_EVERY_S
        renewed = self.store.rotate()
        if renewed:
            log.info("renewed %d workload certificates", len(renewed))
        return renewed

    # ---- outbound ----
    def _serve(self, port: int, out: _Out) -> AcceptLoop:
        """The accept loop of an outbound listener (tunnel.accept): it ends at stop, at the
        deadline, or when ``out`` is no longer the port's (closed: the service went, or the
        port passed to another service, whose own loop serves its new socket)."""
        def failed(what: str, peer: str, why: str) -> None:
            if what == BUSY:
                self._flow(peer, out.spec.name, None, "dropped", "mtls-busy", why)
            else:  # an accept error (the listener keeps serving), or no thread to be had
                self._flow("" if what == ACCEPT else peer, out.spec.name, None, "failed", "mtls-failed", why)

        return AcceptLoop(out.sock, lambda conn, peer: self._outbound(conn, peer, out), self._slots, failed,
                          lambda: self._stop.is_set() or self.outs.get(port) is not out, self.deadline,
                          name=f"tunnel-out-{port}", conn_name=None).start()

    def _outbound(self, conn: socket.socket, src_ip: str, out: _Out) -> None:
        try:
            backends = out.spec.backends
            start = next(out.rr)
            ident = source_identity(self.state, self.name, src_ip)
            if ident is None:
                self._flow(src_ip, out.spec.name, None, "failed", "mtls-unknown-source",
                           f"{src_ip} is not a pod of node {self.name} (as it knows them now): no identity to present")
                conn.close()
                return
            sess = None
            for i in range(len(backends)):  # round robin; a backend that fails: the next one
                b = backends[(start + i) % len(backends)]
                try:
                    sess = self._connect(b, ident, src_ip)
                    break
                except (TunnelError, OSError, ValueError) as e:  # ValueError: a malformed answer
                    denied = isinstance(e, TunnelError) and e.denied  # by policy, not a failure
                    self._flow(src_ip, out.spec.name, b, "denied" if denied else "failed",
                               "mtls-denied" if denied else "mtls-failed", str(e))
                    if denied:  # the destination's policy: another pod of it would say the same
                        break
            if sess is None:
                conn.close()
                return
            stats = relay(conn, sess)
            self._flow(src_ip, out.spec.name, b, "failed" if stats.error else "forwarded",
                       "mtls-failed" if stats.error else ("mtls-tunnel" if b.node_addr else "same-node"),
                       stats.error, sess, stats.to_tunnel, stats.from_tunnel)
        except Exception as e:  # a bug must not end a connection silently: a flow says why
            log.exception("mTLS tunnel listener for %s", out.spec.name)
            self._flow(src_ip, out.spec.name, None, "failed", "mtls-failed", f"internal error: {e!r}")
        finally:
            conn.close()  # its slot is given back by the accept loop

    def _connect(self, b: TunnelBackend, ident: tuple[str, str], src_ip: str) -> Session:
        if not b.node_addr:  # a pod of this node: plaintext, it never leaves the host
            # authorized here as the accepting side authorizes a tunnel: the kernel lets this node's
            # address into any pod, so the listener must not dial what the pod's policy denies
            state, plan = self._view
            denial = None if plan is None else authorize(
                state, plan, self.name, ident, spiffe_id(self.ca.trust_domain, *ident), src_ip, f"{b.ip}:{b.port}")
            if plan is None or denial is not None:
                raise TunnelError(denial.reason if denial else "this node has no plan yet", denied=True)
            up = socket.create_connection((b.ip, b.port), timeout=5)
            up.settimeout(None)
            return Session(up, "plaintext", "", "")
        return self.node.dial((b.node_addr, TUNNEL_PORT), ident, (b.namespace, b.service_account),
                              src_ip, f"{b.ip}:{b.port}")

    def _flow(self, src_ip: str, service: str, b: TunnelBackend | None, verdict: str, reason: str, why: str,
              sess: Session | None = None, sent: int = 0, received: int = 0) -> None:
        names = {ip: p.key for p in self.state.pods for ip in (p.ip, p.ip6) if ip}
        flow: dict[str, Any] = {
            "time": time.time(), "layer": "L4", "protocol": "TCP", "src": names.get(src_ip, src_ip),
            "dst": service, "service": service, "dst_pod": names.get(b.ip) if b else None,
            "verdict": verdict, "reason": reason, "bytes_sent": sent, "bytes_received": received,
        }
        if why:
            flow["why"] = why
        if sess is not None and sess.mode != "plaintext":
            flow["tls"], flow["peer"] = sess.mode, sess.peer_id
        with self._counts_lock:
            self.counts[verdict if verdict in self.counts else "failed"] += 1
            self.bytes["to_tunnel"] += sent
            self.bytes["from_tunnel"] += received
        self.flows.append(flow)

    # ---- reporting ----
    def drain_flows(self) -> list[dict[str, Any]]:
        out = []
        while self.flows:
            out.append(self.flows.popleft())
        servers = ([self.server] if self.server is not None else []) + [srv for _, srv in self.direct.values()]
        names = {ip: p.key for p in self.state.pods for ip in (p.ip, p.ip6) if ip}
        for srv in servers:  # the accepting side's decisions
            for ev in srv.drain():
                host = ev.dst.rpartition(":")[0]
                out.append({"time": ev.at, "layer": "L4", "protocol": "TCP",
                            "src": names.get(ev.src, ev.src or ("node proxy" if srv.fixed_dst else "?")),
                            "dst": ev.dst, "dst_pod": names.get(host), "verdict": ev.verdict,
                            "reason": {"forwarded": "mtls-accepted", "denied": "mtls-denied"}.get(ev.verdict, "mtls-failed"),
                            "why": ev.reason, "peer": ev.peer, "tls": ev.mode, "direction": "ingress"})
        return out

    def status(self, tplan: TunnelPlan | None) -> dict[str, Any]:
        st: dict[str, Any] = {
            "records": self.mode,
            "why": "kernel TLS (setsockopt SOL_TLS), bytes spliced in the kernel" if self.ktls
            else "user-space TLS: this kernel has no kTLS (the tls ULP is unavailable: CONFIG_TLS)",
            "trust_domain": self.ca.trust_domain, "ca": "intermediate" if self.ca.intermediate else "own root",
            "listen": f"{self.wire_addr}:{TUNNEL_PORT}" if self.wire_addr else None,
            "identities": [{"spiffe_id": c.spiffe_id, "not_after": c.not_after, "renew_at": c.renew_at}
                           for c in self.store.identities()],
            "renewals": self.store.renewals, "tunnels": dict(self.counts),
            "outbound_listeners": {o.spec.name: port for port, o in self.outs.items()},
        }
        if self.server is not None:
            st["accepted"] = dict(self.server.counts)
            st["envoy_mtls_ports"] = {d: port for d, (port, _) in sorted(self.direct.items())}
        if tplan is not None:
            st["namespaces"] = dict(tplan.modes)
        return st
