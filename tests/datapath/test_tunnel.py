"""The node-to-node mTLS tunnel between two network namespaces linked by a veth "wire".

Runs on the host (no kTLS there: the user-space fallback) and in the Debian 6.1 guest
(`make test-vm`), where the kernel must do the records (kTLS) — there a missing kTLS fails.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from certs.ca import CertificateAuthority
from certs.store import IdentityStore
from mesh.runtime.cluster import Wire
from mesh.runtime.local import call_in_netns
from tests.conftest import SLOW
from tunnel.accept import ACCEPT, BUSY, POLL_S, AcceptLoop, Slots
from tunnel.ktls import TunnelError, kernel_has_ktls
from tunnel.session import KTLS, USERSPACE, TunnelNode, TunnelServer

pytestmark = [pytest.mark.root]
NODES = (("tna", "10.244.251.0/24"), ("tnb", "10.244.252.0/24"))
WIRE = Wire(NODES, prefix="tn", wire_cidr="10.251.0.0/24")
A, B = WIRE.node("tna").netns, WIRE.node("tnb").netns
IP_A, IP_B = WIRE.node("tna").wire_ip, WIRE.node("tnb").wire_ip
TUNNEL_PORT, WORKLOAD_PORT, MITM_PORT = 15008, 9000, 16000
MARKER = b"DEATH-STAR-PLANS-exhaust-port-"
in_ns = call_in_netns


@pytest.fixture
def wire() -> Iterator[None]:
    """Two nodes (a netns each) on one wire (mesh.runtime.cluster), removed even on failure."""
    with WIRE:
        yield


@dataclass
class Node:
    store: IdentityStore
    tunnel: TunnelNode


def make_node(tmp: Path, ca: CertificateAuthority, hosted: set[tuple[str, str]], name: str) -> Node:
    store = IdentityStore(ca, tmp / name / "certs")
    return Node(store, TunnelNode(store, tmp / name / "keylog", kernel_has_ktls(), lambda ns, sa: (ns, sa) in hosted))


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", "webb.test")


ENDINGS: list[str] = []  # how the workload's connections ended: "eof" (clean) or "reset"


def workload_server() -> socket.socket:
    """In netns B: answers each connection with sha256 of everything it received, at EOF."""
    srv = socket.create_server(("127.0.0.1", WORKLOAD_PORT))
    srv.settimeout(30 * SLOW)
    ENDINGS.clear()

    def answer(c: socket.socket) -> None:
        with c:
            h, n = hashlib.sha256(), 0
            try:
                while data := c.recv(65536):
                    h.update(data)
                    n += len(data)
            except ConnectionResetError:
                ENDINGS.append("reset")
                return
            ENDINGS.append("eof")
            c.sendall(f"got {n} {h.hexdigest()}".encode())

    def loop() -> None:
        with srv:
            for _ in range(20):
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                c.settimeout(30 * SLOW)
                threading.Thread(target=answer, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv


class Capture:
    """Every frame node A exchanges on the wire (AF_PACKET on its port of the wire bridge), until stopped."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.sock = in_ns(WIRE.netns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: drop nothing
        self.sock.bind((WIRE.node("tna").wire_if, 0))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        deadline = time.monotonic() + 120 * SLOW
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.frames.append(self.sock.recv(1 << 18))  # GSO frames exceed 64 KiB
            except TimeoutError:
                continue

    def stop(self) -> bytes:
        time.sleep(0.2)
        self._stop.set()
        self._t.join()
        self.sock.close()
        return b"".join(self.frames)


def serve(node: Node, authorize: Callable[[str, str, str], str | None] | None = None) -> TunnelServer:
    def start() -> TunnelServer:
        workload_server()
        listen = socket.create_server((IP_B, TUNNEL_PORT))
        return TunnelServer(node.tunnel, listen, authorize or (lambda peer, src, dst: None), lifetime_s=120 * SLOW).start()
    return in_ns(B, start)


def exchange(client: Node, payload: bytes, expect: tuple[str, str] = ("empire", "deathstar"),
             source: tuple[str, str] = ("alliance", "xwing"), port: int = TUNNEL_PORT) -> tuple[str, bytes]:
    """Dial from netns A, send payload, half-close, read the answer: (mode, answer)."""
    def run() -> tuple[str, bytes]:
        sess = client.tunnel.dial((IP_B, port), source, expect, "10.244.1.5", f"127.0.0.1:{WORKLOAD_PORT}",
                                  timeout_s=10 * SLOW)
        sess.sock.settimeout(30 * SLOW)
        for i in range(0, len(payload), 16384):
            sess.send(payload[i:i + 16384])
        sess.close_write()
        answer = b""
        while data := sess.recv():
            answer += data
        sess.close()
        return sess.mode, answer
    return in_ns(A, run)


def expected_answer(payload: bytes) -> bytes:
    return f"got {len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()


def wait_events(server: TunnelServer, n: int) -> None:
    deadline = time.monotonic() + 10 * SLOW
    while len(server.events) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.events) >= n, server.events


def test_the_guest_kernel_has_ktls() -> None:
    """The guest run exists to exercise kTLS: its absence there is a failure, not a skip."""
    if os.environ.get("WEBB_IN_VM"):
        assert kernel_has_ktls(), "the 6.1 guest must accept the tls ULP (modprobe tls in tests/vm/init)"


def test_tunnel_encrypts_on_the_wire_and_checks_both_identities(wire: None, tmp_path: Path,
                                                                 ca: CertificateAuthority) -> None:
    client = make_node(tmp_path, ca, {("alliance", "xwing")}, "a")
    server_node = make_node(tmp_path, ca, {("empire", "deathstar")}, "b")
    seen: list[tuple[str, str, str]] = []
    server = serve(server_node, lambda peer, src, dst: seen.append((peer, src, dst)) or None)
    cap = Capture()
    payload = MARKER * 20000  # ~600 KB: many records, both directions
    mode, answer = exchange(client, payload)
    wire_bytes = cap.stop()
    server.stop()
    assert answer == expected_answer(payload)
    assert mode == (KTLS if kernel_has_ktls() else USERSPACE)
    assert seen == [("spiffe://webb.test/ns/alliance/sa/xwing", "10.244.1.5", f"127.0.0.1:{WORKLOAD_PORT}")]
    wait_events(server, 1)
    ev = server.events[0]
    assert (ev.verdict, ev.mode, ev.from_tunnel) == ("forwarded", mode, len(payload)), ev
    assert len(wire_bytes) > len(payload), "the capture saw too little: is it on the wire?"
    assert MARKER not in wire_bytes and b"exhaust-port" not in wire_bytes, "plaintext on the wire"
    assert b"\x17\x03\x03" in wire_bytes  # TLS application-data records


def test_capture_sees_plaintext_when_not_tunnelled(wire: None) -> None:
    """The control: the same capture on the same wire does see a plain connection's bytes."""
    def listen() -> socket.socket:
        return socket.create_server((IP_B, WORKLOAD_PORT + 1))
    srv = in_ns(B, listen)
    srv.settimeout(10 * SLOW)
    cap = Capture()
    c = in_ns(A, lambda: socket.create_connection((IP_B, WORKLOAD_PORT + 1), timeout=10 * SLOW))
    peer, _ = srv.accept()
    c.sendall(MARKER)
    assert peer.recv(100) == MARKER
    c.close()
    peer.close()
    srv.close()
    assert MARKER in cap.stop()


def test_wrong_ca_is_refused(wire: None, tmp_path: Path, ca: CertificateAuthority) -> None:
    rogue = CertificateAuthority.load_or_create(tmp_path / "rogue-ca", "webb.test")  # same name, other key
    client = make_node(tmp_path, rogue, {("alliance", "xwing")}, "a")
    server = serve(make_node(tmp_path, ca, {("empire", "deathstar")}, "b"))
    with pytest.raises(TunnelError, match="CERTIFICATE_VERIFY_FAILED"):
        exchange(client, b"hello")  # the client refuses the server's chain...
    wait_events(server, 1)
    ev = server.events[0]
    assert ev.verdict == "failed" and "UNKNOWN_CA" in ev.reason, ev  # ...and says why
    # the other way round: a client whose own certificate comes from the rogue CA, trusting ours
    store = IdentityStore(rogue, tmp_path / "mixed")
    store.bundle.write_bytes(ca.bundle_pem())
    mixed = Node(store, TunnelNode(store, tmp_path / "mixed-keylog", kernel_has_ktls()))
    with pytest.raises(TunnelError):
        exchange(mixed, b"hello")
    wait_events(server, 2)
    server.stop()
    ev = server.events[1]
    assert ev.verdict == "failed" and "CERTIFICATE_VERIFY_FAILED" in ev.reason, ev


def test_policy_denial_reaches_the_client_with_its_reason(wire: None, tmp_path: Path, ca: CertificateAuthority) -> None:
    client = make_node(tmp_path, ca, {("alliance", "xwing")}, "a")
    reason = "no MeshPolicy of empire/deathstar allows spiffe://webb.test/ns/alliance/sa/xwing"
    server = serve(make_node(tmp_path, ca, {("empire", "deathstar")}, "b"), lambda *_: reason)
    with pytest.raises(TunnelError, match="refused the tunnel: no MeshPolicy") as e:
        exchange(client, b"hello")
    assert e.value.denied  # a policy decision, told apart from a failure (the dialer tries no other pod)
    wait_events(server, 1)
    server.stop()
    assert (server.events[0].verdict, server.events[0].reason.endswith(reason)) == ("denied", True)
    assert server.events[0].peer == "spiffe://webb.test/ns/alliance/sa/xwing"


def test_a_peer_of_another_trust_domain_is_refused_both_ways(wire: None, tmp_path: Path,
                                                            ca: CertificateAuthority) -> None:
    """Both bundles trusted on both sides (the chains verify): the SPIFFE ID's trust domain still
    decides, on each side (tunnel.session.Identities.peer_id, certs.store.IdentityStore)."""
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca", "other.test")
    both = ca.bundle_pem() + other.bundle_pem()
    store_a, store_b = IdentityStore(other, tmp_path / "a" / "certs"), IdentityStore(ca, tmp_path / "b" / "certs")
    for store in (store_a, store_b):
        store.bundle.write_bytes(both)
    client = Node(store_a, TunnelNode(store_a, tmp_path / "a" / "keylog", kernel_has_ktls()))
    server = serve(Node(store_b, TunnelNode(store_b, tmp_path / "b" / "keylog", kernel_has_ktls())))
    with pytest.raises(TunnelError, match="peer spiffe://webb.test/ns/empire/sa/deathstar is outside trust domain other.test"):
        exchange(client, b"hello")
    wait_events(server, 1)
    server.stop()
    ev = server.events[0]
    assert ev.verdict == "failed" and "spiffe://other.test/ns/alliance/sa/xwing is outside trust domain webb.test" \
        in ev.reason, ev


def test_an_identity_not_hosted_by_the_peer_is_not_presented(wire: None, tmp_path: Path, ca: CertificateAuthority) -> None:
    client = make_node(tmp_path, ca, {("alliance", "xwing")}, "a")
    server = serve(make_node(tmp_path, ca, {("empire", "deathstar")}, "b"))
    with pytest.raises(TunnelError, match="handshake failed"):
        exchange(client, b"hello", expect=("empire", "tie-fighter"))
    server.stop()


def test_rotation_drops_no_connection(wire: None, tmp_path: Path, ca: CertificateAuthority) -> None:
    now = [time.time()]
    store_a = IdentityStore(ca, tmp_path / "a", ttl_s=60, clock=lambda: now[0])
    store_b = IdentityStore(ca, tmp_path / "b", ttl_s=60, clock=lambda: now[0])
    client = Node(store_a, TunnelNode(store_a, tmp_path / "ka", kernel_has_ktls()))
    server = serve(Node(store_b, TunnelNode(store_b, tmp_path / "kb", kernel_has_ktls())))

    def run() -> bytes:
        sess = client.tunnel.dial((IP_B, TUNNEL_PORT), ("alliance", "xwing"), ("empire", "deathstar"),
                                  "10.244.1.5", f"127.0.0.1:{WORKLOAD_PORT}", timeout_s=10 * SLOW)
        sess.send(b"before rotation;")
        first = store_a.get("alliance", "xwing").serial
        now[0] += 25  # life = 60 s skew + 60 s: renewal due at 2/3, 20 s from now
        assert store_a.rotate() == ["spiffe://webb.test/ns/alliance/sa/xwing"]
        assert store_a.get("alliance", "xwing").serial != first
        fresh = exchange(client, b"new tunnel, new certificate")[1]
        assert fresh == expected_answer(b"new tunnel, new certificate")
        sess.send(b"after rotation")  # the old tunnel still carries bytes
        sess.close_write()
        out = b""
        sess.sock.settimeout(10 * SLOW)
        while data := sess.recv():
            out += data
        sess.close()
        return out
    assert in_ns(A, run) == expected_answer(b"before rotation;after rotation")
    assert store_b.renewals == 1  # the server side renewed on the new handshake
    server.stop()


def start_mitm(change: Callable[[int, bytearray], bytes | None]) -> threading.Event:
    """A man in the middle in netns B on MITM_PORT, in front of the tunnel port: every record
    from the client passes through ``change(n, record)`` (n counts application-data records
    from 1: the client's Finished, the tunnel header, then data); None cuts the stream there
    (a FIN to the server, the rest of the client's bytes swallowed). Set the event to stop."""
    stop = threading.Event()

    def mitm() -> None:
        lst = socket.create_server((IP_B, MITM_PORT))
        lst.settimeout(10 * SLOW)
        down, _ = lst.accept()
        up = socket.create_connection((IP_B, TUNNEL_PORT))

        def back() -> None:
            try:
                while not stop.is_set() and (d := up.recv(65536)):
                    down.sendall(d)
            except OSError:
                pass
        threading.Thread(target=back, daemon=True).start()
        buf, app_records, cut = b"", 0, False
        down.settimeout(30 * SLOW)
        while True:
            try:
                d = down.recv(65536)
            except OSError:
                break
            if not d:
                break
            buf += d
            while not cut and len(buf) >= 5 and len(buf) >= 5 + struct.unpack("!H", buf[3:5])[0]:
                n = 5 + struct.unpack("!H", buf[3:5])[0]
                rec, buf = bytearray(buf[:n]), buf[n:]
                app_records += rec[0] == 0x17
                out = change(app_records, rec) if rec[0] == 0x17 else bytes(rec)
                if out is None:
                    up.shutdown(socket.SHUT_WR)
                    cut = True
                else:
                    up.sendall(out)
        down.close()
        lst.close()

    threading.Thread(target=lambda: in_ns(B, mitm), daemon=True).start()
    time.sleep(0.3 * SLOW)
    return stop


def test_tampered_record_is_rejected(wire: None, tmp_path: Path, ca: CertificateAuthority) -> None:
    """A man in the middle flips one bit of the first data record after the tunnel header:
    the receiving side must refuse the record, not deliver altered bytes."""
    client = make_node(tmp_path, ca, {("alliance", "xwing")}, "a")
    server = serve(make_node(tmp_path, ca, {("empire", "deathstar")}, "b"))

    def flip(n: int, rec: bytearray) -> bytes:
        if n == 3:  # 1: client Finished, 2: tunnel header, 3: data
            rec[10] ^= 0x01
        return bytes(rec)
    stop = start_mitm(flip)
    try:
        _, answer = exchange(client, MARKER * 10, port=MITM_PORT)
    except (TunnelError, OSError):
        answer = b""
    stop.set()
    wait_events(server, 1)
    server.stop()
    assert not answer.startswith(b"got"), "the altered record was delivered"
    ev = server.events[0]
    assert ev.verdict == "failed", ev
    assert any(w in ev.reason for w in ("EBADMSG", "BAD_RECORD_MAC", "bad record mac", "DECRYPTION")), ev.reason


def test_a_cut_stream_is_an_error_not_an_end(wire: None, tmp_path: Path, ca: CertificateAuthority) -> None:
    """A FIN without close_notify after the first data record (a truncation): the server must
    not hand the workload a clean end of stream (it would answer for a partial request)."""
    client = make_node(tmp_path, ca, {("alliance", "xwing")}, "a")
    server = serve(make_node(tmp_path, ca, {("empire", "deathstar")}, "b"))
    cut = threading.Event()
    stop = start_mitm(lambda n, rec: None if cut.is_set() else bytes(rec))

    def run() -> bytes:
        # the dial returns on the server's answer: its keys are in place before anything is cut
        sess = client.tunnel.dial((IP_B, MITM_PORT), ("alliance", "xwing"), ("empire", "deathstar"),
                                  "10.244.1.5", f"127.0.0.1:{WORKLOAD_PORT}", timeout_s=10 * SLOW)
        sess.sock.settimeout(30 * SLOW)
        sess.send(MARKER)  # passes
        time.sleep(0.5 * SLOW)
        cut.set()
        sess.send(MARKER)  # the man in the middle sends a FIN instead
        sess.close_write()
        answer = b""
        try:
            while data := sess.recv():
                answer += data
        except (TunnelError, OSError):
            pass
        sess.close()
        return answer
    answer = in_ns(A, run)
    stop.set()
    wait_events(server, 1)
    server.stop()
    assert not answer.startswith(b"got"), "the workload took a cut stream for a whole one"
    ev = server.events[0]
    assert ev.verdict == "failed" and "without close_notify" in ev.reason, ev
    assert ev.from_tunnel == len(MARKER), ev  # the record before the cut was delivered
    deadline = time.monotonic() + 5 * SLOW
    while not ENDINGS and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ENDINGS == ["reset"], ENDINGS  # a reset, not a clean end of a partial request


def echo_server(port: int) -> socket.socket:
    """In netns B: echoes every byte as it arrives (both directions busy at once)."""
    srv = socket.create_server(("127.0.0.1", port))
    srv.settimeout(30 * SLOW)

    def loop() -> None:
        with srv:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                c.settimeout(30 * SLOW)
                while data := c.recv(65536):
                    c.sendall(data)
    threading.Thread(target=loop, daemon=True).start()
    return srv


def test_full_duplex_stream_arrives_intact(wire: None, tmp_path: Path, ca: CertificateAuthority) -> None:
    """16 MiB each way at once through an echoing workload: both relays read and write one
    session on two threads at the same time (a user-space TLS session shared unlocked by the
    two corrupted it: a spurious end of stream, seen in the e2e)."""
    client = make_node(tmp_path, ca, {("alliance", "xwing")}, "a")
    server = serve(make_node(tmp_path, ca, {("empire", "deathstar")}, "b"))
    in_ns(B, lambda: echo_server(WORKLOAD_PORT + 2))
    payload = os.urandom(16 << 20)

    def run() -> bytes:
        sess = client.tunnel.dial((IP_B, TUNNEL_PORT), ("alliance", "xwing"), ("empire", "deathstar"),
                                  "10.244.1.5", f"127.0.0.1:{WORKLOAD_PORT + 2}", timeout_s=10 * SLOW)
        sess.sock.settimeout(60 * SLOW)

        def send() -> None:
            for i in range(0, len(payload), 1 << 16):
                sess.send(payload[i:i + (1 << 16)])
            sess.close_write()
        t = threading.Thread(target=send, daemon=True)
        t.start()
        got = bytearray()
        while data := sess.recv(1 << 18):
            got += data
        t.join(timeout=60 * SLOW)
        sess.close()
        return bytes(got)
    got = in_ns(A, run)
    wait_events(server, 1)
    server.stop()
    assert len(got) == len(payload) and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    ev = server.events[0]
    assert (ev.verdict, ev.to_tunnel, ev.from_tunnel) == ("forwarded", len(payload), len(payload)), ev


def speaker_server(port: int, size: int, count: int) -> socket.socket:
    """In netns B: sends ``size`` bytes on each connection at once, then reads until EOF."""
    srv = socket.create_server(("127.0.0.1", port))
    srv.settimeout(30 * SLOW)

    def one(c: socket.socket) -> None:
        with c:
            c.settimeout(30 * SLOW)
            c.sendall(bytes(range(256)) * (size // 256))
            while c.recv(65536):
                pass

    def loop() -> None:
        with srv:
            for _ in range(count):
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                threading.Thread(target=one, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    return srv


def test_half_close_while_the_other_way_streams(wire: None, tmp_path: Path, ca: CertificateAuthority) -> None:
    """The client ends its direction (close_notify) while a 2 MiB answer is still arriving
    through a reader thread: the answer must arrive whole. (User-space TLS: the shutdown also
    reads, and a data record waiting then broke the open direction: about one round in 40 or so.)"""
    client = make_node(tmp_path, ca, {("alliance", "xwing")}, "a")
    server = serve(make_node(tmp_path, ca, {("empire", "deathstar")}, "b"))
    size, rounds = 2 << 20, (10 if os.environ.get("WEBB_IN_VM") else 100)  # the guest: kTLS, emulated
    in_ns(B, lambda: speaker_server(WORKLOAD_PORT + 3, size, rounds))

    def one_round() -> int:
        sess = client.tunnel.dial((IP_B, TUNNEL_PORT), ("alliance", "xwing"), ("empire", "deathstar"),
                                  "10.244.1.5", f"127.0.0.1:{WORKLOAD_PORT + 3}", timeout_s=10 * SLOW)
        sess.sock.settimeout(30 * SLOW)
        n = [0]
        first = threading.Event()

        def read() -> None:
            while data := sess.recv(1 << 16):
                n[0] += len(data)
                first.set()
        t = threading.Thread(target=read, daemon=True)
        t.start()
        first.wait(10 * SLOW)
        sess.close_write()  # mid-stream: records are arriving on the other thread
        t.join(timeout=30 * SLOW)
        sess.close()
        return n[0]

    def run() -> list[int]:
        return [one_round() for _ in range(rounds)]
    got = in_ns(A, run)
    server.stop()
    assert got == [size] * rounds, got


class FlakyListener:
    """A listening socket whose accept fails ``fails`` times first, as out of descriptors (EMFILE)."""

    def __init__(self, real: socket.socket, fails: int) -> None:
        self.real, self.fails = real, fails

    def settimeout(self, t: float | None) -> None:
        self.real.settimeout(t)

    def accept(self) -> tuple[socket.socket, object]:
        if self.fails:
            self.fails -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()

    def getsockname(self) -> object:
        return self.real.getsockname()

    def close(self) -> None:
        self.real.close()


def test_accept_loop_survives_emfile_and_bounds_its_connections() -> None:
    """tunnel.accept, the one accept loop (TunnelServer's, the agent's outbound listeners'):
    accept errors are reported and the listener keeps serving; past the slots a connection is
    refused and said so; a slot comes back when its connection ends; stopped() ends the loop."""
    real = socket.create_server(("127.0.0.1", 0))
    troubles: list[tuple[str, str, str]] = []
    served: list[str] = []
    release = threading.Event()
    stop = threading.Event()

    def handle(conn: socket.socket, peer: str) -> None:
        served.append(peer)
        release.wait(10 * SLOW)
        conn.close()
    slots = Slots(1)
    loop = AcceptLoop(cast(socket.socket, FlakyListener(real, 3)), handle, slots,
                      lambda *t: troubles.append(t), stop.is_set, time.monotonic() + 60 * SLOW).start()
    addr = real.getsockname()
    first = socket.create_connection(addr, timeout=10 * SLOW)
    deadline = time.monotonic() + 10 * SLOW
    while not served and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served == ["127.0.0.1"]
    assert troubles == [(ACCEPT, "", "accept: [Errno 24] Too many open files")] * 3
    second = socket.create_connection(addr, timeout=10 * SLOW)
    assert second.recv(1) == b""  # refused: the one slot is taken
    assert troubles[3:] == [(BUSY, "127.0.0.1", "more than 1 tunnels at once")]
    release.set()
    assert first.recv(1) == b""
    deadline = time.monotonic() + 10 * SLOW
    while not slots.take() and time.monotonic() < deadline:  # given back just after the handler returns
        time.sleep(0.01)
    slots.give()
    third = socket.create_connection(addr, timeout=10 * SLOW)  # the slot is back
    deadline = time.monotonic() + 10 * SLOW
    while len(served) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(served) == 2 and len(troubles) == 4, troubles
    stop.set()
    loop.join(timeout=POLL_S * 5)
    assert not loop.thread.is_alive()
    for s in (first, second, third, real):
        s.close()


def test_accept_loop_ends_when_its_listener_closes_or_its_time_is_up() -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    troubles: list[tuple[str, str, str]] = []
    a = AcceptLoop(closed, lambda c, p: c.close(), Slots(4), lambda *t: troubles.append(t), lambda: False,
                   time.monotonic() + 60 * SLOW).start()
    closed.close()
    timed = socket.create_server(("127.0.0.1", 0))
    b = AcceptLoop(timed, lambda c, p: c.close(), Slots(4), lambda *t: troubles.append(t), lambda: False,
                   time.monotonic() + 0.3).start()
    a.join(timeout=5 * SLOW)
    b.join(timeout=5 * SLOW)
    timed.close()
    assert not a.thread.is_alive() and not b.thread.is_alive() and troubles == []


def test_tunnel_server_reports_accept_errors_and_keeps_serving(tmp_path: Path, ca: CertificateAuthority) -> None:
    """On loopback: three accept errors are three failed events, then a tunnel is forwarded."""
    client = make_node(tmp_path, ca, {("alliance", "xwing")}, "a")
    server_node = make_node(tmp_path, ca, {("empire", "deathstar")}, "b")
    listen = socket.create_server(("127.0.0.1", 0))
    port = listen.getsockname()[1]
    server = TunnelServer(server_node.tunnel, cast(socket.socket, FlakyListener(listen, 3)), lambda *_: None,
                          lifetime_s=60 * SLOW).start()
    srv = echo_server(WORKLOAD_PORT + 4)
    try:
        sess = client.tunnel.dial(("127.0.0.1", port), ("alliance", "xwing"), ("empire", "deathstar"),
                                  "10.244.1.5", f"127.0.0.1:{WORKLOAD_PORT + 4}", timeout_s=10 * SLOW)
        sess.sock.settimeout(10 * SLOW)
        sess.send(b"ping")
        sess.close_write()
        got = b""
        while data := sess.recv():
            got += data
        sess.close()
        wait_events(server, 4)
    finally:
        server.stop()
        srv.close()
    assert got == b"ping"
    assert [(e.verdict, e.reason) for e in server.events[:3]] == [("failed", "accept: [Errno 24] Too many open files")] * 3
    assert server.events[3].verdict == "forwarded", server.events[3]
