"""The node-to-node mTLS tunnel vs plaintext over the same wire between two nodes
(mesh.runtime.cluster.Wire: a network namespace each; root). Throughput: a workload socket in node A → relay → tunnel → node B's
tunnel server → relay → a sink in B, against a direct plaintext connection A → B and
against the same relays without TLS. Handshakes: full tunnel set-ups per second against
plaintext TCP connects per second, sequentially.

On a kernel without kTLS (this host) the tunnel is user-space TLS; on a kTLS kernel the
same run measures kTLS (``tunnel.records`` says which).
"""

from __future__ import annotations

import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from certs.ca import CertificateAuthority
from certs.store import IdentityStore
from mesh.runtime.cluster import Wire
from mesh.runtime.local import call_in_netns
from tunnel.accept import AcceptLoop, Slots
from tunnel.ktls import kernel_has_ktls
from tunnel.session import Session, TunnelNode, TunnelServer, relay

WIRE = Wire((("bta", "10.244.253.0/24"), ("btb", "10.244.254.0/24")), prefix="bt", wire_cidr="10.252.0.0/24")
A, B = WIRE.node("bta").netns, WIRE.node("btb").netns
IP_A, IP_B = WIRE.node("bta").wire_ip, WIRE.node("btb").wire_ip
TUNNEL_PORT, SINK_PORT, RELAY_PORT = 15008, 9100, 9101
BULK = 64 << 20  # bytes per round
ROUNDS = 3
HANDSHAKES, HANDSHAKE_BUDGET_S = 300, 10.0
CHUNK = b"\x5a" * (256 << 10)
_in = call_in_netns


def _serve_forever(srv: socket.socket, handle: Callable[[socket.socket], None], stop: threading.Event) -> None:
    """The tunnel's own accept loop (tunnel.accept) until ``stop``; its troubles on stderr."""
    def failed(_what: str, _peer: str, why: str) -> None:
        print(f"bench tunnel: {why}", file=sys.stderr)

    AcceptLoop(srv, lambda c, _peer: handle(c), Slots(1024), failed, stop.is_set, float("inf"),
               name="bench-accept", conn_name=None).run()


def _sink(c: socket.socket) -> None:
    """Counts bytes to EOF, answers the count."""
    with c:
        n = 0
        while data := c.recv(1 << 20):
            n += len(data)
        c.sendall(str(n).encode())


def _push(addr: tuple[str, int]) -> float:
    """Bytes/s of one bulk transfer from netns A to ``addr``, checked by the sink's count."""
    def run() -> float:
        with socket.create_connection(addr, timeout=30) as s:
            t0 = time.perf_counter()
            sent = 0
            while sent < BULK:
                s.sendall(CHUNK)
                sent += len(CHUNK)
            s.shutdown(socket.SHUT_WR)
            answer = s.recv(64)
            dt = time.perf_counter() - t0
        if int(answer or b"0") != sent:
            raise RuntimeError(f"bench tunnel: sink counted {answer!r}, {sent} sent")
        return sent / dt
    return _in(A, run)


def run() -> tuple[dict[str, float], list[list[str]]]:
    stop = threading.Event()
    tmp = Path(tempfile.mkdtemp(prefix="webb-bench-tunnel-"))
    WIRE.setup()
    try:
        ca = CertificateAuthority.load_or_create(tmp / "ca", "bench.local")
        ktls = kernel_has_ktls()
        node_a = TunnelNode(IdentityStore(ca, tmp / "a"), tmp / "a" / "keylog", ktls)
        node_b = TunnelNode(IdentityStore(ca, tmp / "b"), tmp / "b" / "keylog", ktls)
        src, dst = ("bench", "client"), ("bench", "server")

        def start_b() -> TunnelServer:
            sink = socket.create_server((IP_B, SINK_PORT))
            threading.Thread(target=_serve_forever, args=(sink, _sink, stop), daemon=True).start()
            lsink = socket.create_server(("127.0.0.1", SINK_PORT))
            threading.Thread(target=_serve_forever, args=(lsink, _sink, stop), daemon=True).start()
            relay_b = socket.create_server((IP_B, RELAY_PORT))  # plaintext relay: same hops, no TLS
            threading.Thread(target=_serve_forever, args=(relay_b, lambda c: relay(
                c, Session(socket.create_connection(("127.0.0.1", SINK_PORT)), "plaintext", "", "")), stop),
                daemon=True).start()
            return TunnelServer(node_b, socket.create_server((IP_B, TUNNEL_PORT)), lambda *_: None,
                                lifetime_s=600).start()

        server = _in(B, start_b)

        def start_a() -> None:
            tun = socket.create_server(("127.0.0.1", TUNNEL_PORT))  # the outbound listener of node A
            threading.Thread(target=_serve_forever, args=(tun, lambda c: relay(c, node_a.dial(
                (IP_B, TUNNEL_PORT), src, dst, IP_A, f"127.0.0.1:{SINK_PORT}")), stop), daemon=True).start()
            plain = socket.create_server(("127.0.0.1", RELAY_PORT))
            threading.Thread(target=_serve_forever, args=(plain, lambda c: relay(
                c, Session(socket.create_connection((IP_B, RELAY_PORT)), "plaintext", "", "")), stop),
                daemon=True).start()

        _in(A, start_a)
        direct, relayed, tunnelled = [], [], []
        for _ in range(ROUNDS):  # interleaved: drift hits all three alike
            direct.append(_push((IP_B, SINK_PORT)))
            relayed.append(_push(("127.0.0.1", RELAY_PORT)))
            tunnelled.append(_push(("127.0.0.1", TUNNEL_PORT)))
        d, r, t = (statistics.median(x) for x in (direct, relayed, tunnelled))
        hs, connects = _handshakes(node_a, src, dst), _connects()
        server.stop()
    finally:
        stop.set()
        WIRE.teardown()
        shutil.rmtree(tmp, ignore_errors=True)  # the bench CA's private key and the TLS key logs go with it
    mode = "ktls" if ktls else "userspace"
    figures: dict[str, float] = {
        f"tunnel.{mode}_throughput_ratio": round(t / d, 3),
        "tunnel.relay_plaintext_throughput_ratio": round(r / d, 3),
        "tunnel.plaintext_mb_s": round(d / 1e6, 1), f"tunnel.{mode}_mb_s": round(t / 1e6, 1),
        "tunnel.relay_plaintext_mb_s": round(r / 1e6, 1),
        "tunnel.handshakes_per_s": round(hs, 1), "tunnel.plain_connects_per_s": round(connects, 1),
        "tunnel.handshake_vs_connect_ratio": round(hs / connects, 4),
        "tunnel.ktls_available": float(ktls),
    }
    rows = [
        ["bulk MB/s (64 MiB, median of 3)", f"{d / 1e6:.0f}", f"{t / 1e6:.0f} ({mode})", f"{t / d:.3f}"],
        ["  same relays, no TLS", f"{d / 1e6:.0f}", f"{r / 1e6:.0f}", f"{r / d:.3f}"],
        ["set-ups/s (handshake vs TCP connect)", f"{connects:.0f}", f"{hs:.0f}", f"{hs / connects:.4f}"],
        ["kTLS bulk", "—", "measured above" if ktls else "no kTLS in this kernel: guest tests check correctness", ""],
    ]
    return figures, rows


def _handshakes(node: TunnelNode, src: tuple[str, str], dst: tuple[str, str]) -> float:
    def go() -> float:
        t0 = time.perf_counter()
        n = 0
        while n < HANDSHAKES and time.perf_counter() - t0 < HANDSHAKE_BUDGET_S:
            sess = node.dial((IP_B, TUNNEL_PORT), src, dst, IP_A, f"127.0.0.1:{SINK_PORT}")
            sess.close_write()
            sess.recv()  # the sink's count: the tunnel carried a round trip
            sess.close()
            n += 1
        return n / (time.perf_counter() - t0)
    return _in(A, go)


def _connects() -> float:
    def go() -> float:
        t0 = time.perf_counter()
        n = 0
        while n < HANDSHAKES and time.perf_counter() - t0 < HANDSHAKE_BUDGET_S:
            with socket.create_connection((IP_B, SINK_PORT), timeout=5) as s:
                s.shutdown(socket.SHUT_WR)
                s.recv(64)
            n += 1
        return n / (time.perf_counter() - t0)
    return _in(A, go)


if __name__ == "__main__":
    figs, table = run()
    for row in table:
        print(" | ".join(row))
    print(figs)
