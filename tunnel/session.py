"""The node-to-node mTLS tunnel (DESIGN "Cross-node with mTLS").

Dialing side (the source workload's node): TCP to the peer node's tunnel port, TLS 1.3 with
the *source workload's* certificate, the peer's SPIFFE ID checked against the destination
workload's, keys to the kernel (kTLS) when it can, then one framed header naming the source
pod IP and the destination pod address. Accepting side: the destination workload's
certificate (chosen by SNI), the client's SPIFFE ID and header handed to ``authorize``
(policy), the destination connected, one framed answer, then bytes relayed.

With kTLS the relay splices (socket → pipe → socket, in the kernel: no byte is copied to
user space and the kernel encrypts); without it, the same session runs in user-space TLS.

The tunnel does not import ``certs``: what it needs of the node's identities is
:class:`Identities` (``certs.store.IdentityStore`` is one), handed in by whoever composes the
two (mesh.agent.tunnels, the tests, the bench).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tunnel.accept import AcceptLoop, Slots
from tunnel.ktls import (
    CUT_SHORT,
    Handshake,
    KeyLog,
    TunnelError,
    UserspaceTls,
    handshake,
    install,
    ktls_close_notify,
    ktls_control_record,
)

KTLS, USERSPACE = "ktls", "userspace"
MAX_HEADER = 4096
PIPE_SIZE = 1 << 20  # one splice moves up to this much
RELAY_CHUNK = 1 << 18  # user-space TLS: plaintext read per record batch
CONNECT_TIMEOUT_S = 5.0  # the accepting node's connect to the destination
ANSWER_TIMEOUT_S = CONNECT_TIMEOUT_S + 3.0  # the dialer waits longer: it hears that connect's failure
# an idle tunnel whose peer vanished (node down, cable cut) ends instead of holding two threads
KEEPALIVE = ((socket.TCP_KEEPIDLE, 30), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 3))
USER_TIMEOUT_MS = 60_000  # unacknowledged data for this long: the connection is dead


@dataclass(frozen=True)
class Refusal:
    """Why the accepting node will not carry a tunnel. ``final``: a decision (policy, identity)
    every backend of the service would repeat, so the dialer stops; not final: only this
    node's view (the destination not, or not yet, one of its pods), so the dialer tries the next."""

    reason: str
    final: bool = True


# authorize(peer SPIFFE ID, source pod IP, destination "ip:port") -> None (allowed) or why not
# (a plain string is a final refusal)
Authorize = Callable[[str, str, str], "Refusal | str | None"]


class Identities(Protocol):
    """What the tunnel needs of its node's workload identities (``certs.store.IdentityStore``;
    the tunnel does not import certs). Identities are (namespace, service account) pairs."""

    def server_context(self) -> ssl.SSLContext:
        """The accepting side's first context: TLS 1.3, no certificate (SNI picks the identity's
        context), a client certificate required and verified against the trust bundle, no
        session tickets (kTLS starts at record sequence 0)."""
        ...

    def context(self, namespace: str, service_account: str, server_side: bool) -> ssl.SSLContext:
        """A context like that presenting the identity's current certificate; ValueError when
        the identity cannot have one."""
        ...

    def spiffe_id(self, namespace: str, service_account: str) -> str:
        """The identity's SPIFFE ID: what the dialer requires the peer to present."""
        ...

    def peer_id(self, der: bytes) -> str:
        """The SPIFFE ID a peer's certificate (DER) names; ValueError (why) when it names none,
        several, or one outside the trust domain."""
        ...


def _tune(sock: socket.socket) -> None:
    """A tunnel socket: no Nagle (small frames), keepalive and a user timeout (dead peers end)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


def sni_of(namespace: str, service_account: str) -> str:
    """The SNI naming the identity the dialer expects (namespaces are DNS labels: no dots)."""
    return f"{namespace}.{service_account}"


@dataclass
class Session:
    sock: socket.socket
    mode: str  # ktls | userspace
    peer_id: str
    cipher: str
    tls: UserspaceTls | None = None
    _send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, data: bytes) -> None:
        if self.tls is None:
            self.sock.sendall(data)
        else:
            with self._send_lock:
                self.tls.send(data)

    def recv(self, n: int = 65536) -> bytes:
        if self.tls is not None:
            return self.tls.recv(n)
        try:
            data = self.sock.recv(n)
        except OSError as e:
            if e.errno == errno.EBADMSG:
                raise TunnelError("TLS record rejected by the kernel (EBADMSG): tampered or corrupted") from e
            if e.errno == errno.EIO and self.mode == KTLS:  # a control record: close_notify or an alert
                return ktls_control_record(self.sock)
            raise
        if not data and n and self.mode == KTLS:  # a FIN before close_notify
            raise TunnelError(CUT_SHORT)
        return data

    def send_frame(self, obj: dict[str, object]) -> None:
        body = json.dumps(obj).encode()
        self.send(struct.pack("!H", len(body)) + body)

    def recv_frame(self) -> dict[str, object]:
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            if len(buf) >= 2 and struct.unpack("!H", buf[:2])[0] > MAX_HEADER:
                raise TunnelError("tunnel header too long")
            chunk = self.recv(1 if len(buf) < 2 else 2 + struct.unpack("!H", buf[:2])[0] - len(buf))
            if not chunk:
                raise TunnelError("peer closed the tunnel before its frame (header or answer)")
            buf += chunk
        frame = json.loads(buf[2:])
        if not isinstance(frame, dict):
            raise TunnelError("tunnel header is not an object")
        return frame

    def close_write(self) -> None:
        if self.tls is not None:
            self.tls.close_write()
            return
        try:
            if self.mode == KTLS:
                ktls_close_notify(self.sock)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class TunnelNode:
    """One node's tunnel: its identities, key log, and whether the kernel does the records."""

    def __init__(self, identities: Identities, keylog_path: Path, use_ktls: bool,
                 hosted: Callable[[str, str], bool] = lambda ns, sa: True) -> None:
        self.identities, self.use_ktls = identities, use_ktls
        self.hosted = hosted  # (namespace, service account) has a workload on this node
        self.keylog = KeyLog(keylog_path)
        self.ktls_failures = 0
        self.handshakes: dict[tuple[str, str], int] = {}  # (client | server, ok | failed) -> count (metrics)
        self._handshakes_lock = threading.Lock()
        # the server's first context: no certificate (SNI picks the workload's), but what a
        # handshake takes from the first context (client certificate required, verified
        # against the bundle, TLS 1.3, no tickets) is set here
        self._base = identities.server_context()
        self._base.sni_callback = self._pick_identity
        self.keylog.attach(self._base)

    @property
    def mode(self) -> str:
        return KTLS if self.use_ktls else USERSPACE

    def _context(self, ns: str, sa: str, server_side: bool) -> ssl.SSLContext:
        ctx = self.identities.context(ns, sa, server_side)
        self.keylog.attach(ctx)
        return ctx

    def _pick_identity(self, obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        ns, _, sa = (name or "").partition(".")
        if not ns or not sa or not self.hosted(ns, sa):  # never present an identity not hosted here
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        try:
            obj.context = self._context(ns, sa, server_side=True)
        except ValueError:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    def _establish(self, sock: socket.socket, hs: Handshake, secrets: dict[str, bytes], server_side: bool) -> Session:
        try:
            peer = self.identities.peer_id(hs.peer_der)
        except ValueError as e:  # not a workload certificate of this trust domain
            raise TunnelError(str(e)) from e
        if self.use_ktls:
            try:
                install(sock, hs, secrets, server_side)
                return Session(sock, KTLS, peer, hs.cipher)
            except OSError as e:  # the connection is unusable now: its records are half the kernel's
                self.ktls_failures += 1
                raise TunnelError(f"install kTLS keys: {e}") from e
        return Session(sock, USERSPACE, peer, hs.cipher, UserspaceTls(sock, hs))

    def _handshake(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool,
                   server_hostname: str | None = None) -> Session:
        """The TLS handshake and the keys installed, counted by side and outcome."""
        try:
            hs, secrets = handshake(sock, ctx, server_side, self.keylog, server_hostname=server_hostname)
            sess = self._establish(sock, hs, secrets, server_side)
        except Exception:
            self._count_handshake(server_side, "failed")
            raise
        self._count_handshake(server_side, "ok")
        return sess

    def _count_handshake(self, server_side: bool, result: str) -> None:
        key = ("server" if server_side else "client", result)
        with self._handshakes_lock:
            self.handshakes[key] = self.handshakes.get(key, 0) + 1

    # ---- dialing side ----
    def dial(self, peer: tuple[str, int], source: tuple[str, str], expect: tuple[str, str],
             src_ip: str, target: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Session:
        """A tunnel to ``target`` (ip:port) on the node at ``peer``, as workload ``source``
        (namespace, service account), to a workload that must be ``expect``."""
        sock = socket.create_connection(peer, timeout=timeout_s)
        try:
            _tune(sock)
            ctx = self._context(*source, server_side=False)
            sess = self._handshake(sock, ctx, False, server_hostname=sni_of(*expect))
            want = self.identities.spiffe_id(*expect)
            if sess.peer_id != want:
                raise TunnelError(f"peer presented {sess.peer_id}, expected {want}")
            try:
                sess.send_frame({"src": src_ip, "dst": target})
                sock.settimeout(max(timeout_s, ANSWER_TIMEOUT_S))
                answer = sess.recv_frame()
            except TimeoutError as e:
                raise TunnelError(f"{sess.peer_id} did not answer within {max(timeout_s, ANSWER_TIMEOUT_S):.0f} s") from e
            except (OSError, TunnelError) as e:  # TLS 1.3: the server checks our certificate after we finished
                raise TunnelError(f"{sess.peer_id} closed the tunnel before answering "
                                  f"(our certificate refused?): {e}") from e
            if not answer.get("ok"):
                raise TunnelError(f"{sess.peer_id} refused the tunnel: {answer.get('reason', '?')}",
                                  sess.peer_id, src_ip, target, denied=bool(answer.get("denied")))
            sock.settimeout(None)
            return sess
        except BaseException:
            sock.close()
            raise

    # ---- accepting side ----
    def accept(self, sock: socket.socket, authorize: Authorize,
               fixed_dst: str = "") -> tuple[Session, socket.socket, str, str]:
        """Handshake, authorize, connect the destination: (session, destination socket, src, dst).
        Every refusal is a TunnelError carrying what was known (peer, src, dst) and why.
        ``fixed_dst``: a pod's own mTLS port (Envoy-originated TLS): no header, no answer, the
        destination is the port's; a refusal closes the connection."""
        _tune(sock)
        sess = self._handshake(sock, self._base, True)
        sock.settimeout(CONNECT_TIMEOUT_S)
        if fixed_dst:
            src, dst = "", fixed_dst
        else:
            try:
                header = sess.recv_frame()
            except (TunnelError, OSError, ValueError) as e:
                raise TunnelError(f"read tunnel header: {e}", sess.peer_id) from e
            src, dst = str(header.get("src", "")), str(header.get("dst", ""))
        verdict = authorize(sess.peer_id, src, dst)
        if verdict:
            refusal = Refusal(verdict) if isinstance(verdict, str) else verdict
            if not fixed_dst:
                _answer(sess, {"ok": False, "reason": refusal.reason, "denied": refusal.final})
            raise TunnelError(f"{'denied' if refusal.final else 'refused'} {sess.peer_id} ({src or 'node proxy'}) "
                              f"-> {dst}: {refusal.reason}", sess.peer_id, src, dst, refusal.final)
        host, _, port = dst.rpartition(":")
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S)
        except (OSError, ValueError, OverflowError) as e:
            if not fixed_dst:
                _answer(sess, {"ok": False, "reason": f"connect {dst}: {e}"})
            raise TunnelError(f"connect {dst} for {sess.peer_id}: {e}", sess.peer_id, src, dst) from e
        upstream.settimeout(None)
        sock.settimeout(None)
        if not fixed_dst:
            try:
                sess.send_frame({"ok": True})
            except OSError as e:
                upstream.close()
                raise TunnelError(f"the dialer left before the answer: {e}", sess.peer_id, src, dst) from e
        return sess, upstream, src, dst


def _answer(sess: Session, frame: dict[str, object]) -> None:
    """A refusal to the dialer; one that left already changes nothing (the refusal is recorded)."""
    try:
        sess.send_frame(frame)
    except OSError:
        pass


@dataclass
class RelayStats:
    to_tunnel: int = 0
    from_tunnel: int = 0
    error: str = ""


def relay(workload: socket.socket, sess: Session) -> RelayStats:
    """Bytes both ways until both sides are done. A clean end is passed on as one (the
    workload's FIN as close_notify, the peer's close_notify as a FIN); an error on either side
    ends both at once: the tunnel without close_notify, the workload with a TCP reset — a
    stream cut short must never look whole to the other end. Blocks."""
    stats = RelayStats()
    aborted = threading.Event()

    def abort(why: str) -> None:
        stats.error = stats.error or why
        aborted.set()  # before the sockets are shut: the other thread then sees it, whatever it reads
        _reset(sess.sock, wake_writers=True)  # the peer sees no close_notify: its side fails too
        _reset(workload, wake_writers=False)  # no FIN: the reset comes with the close below

    def out() -> None:  # workload -> tunnel
        try:
            if sess.tls is None:
                _splice(workload, sess.sock, lambda n: setattr(stats, "to_tunnel", stats.to_tunnel + n))
            else:
                while data := workload.recv(RELAY_CHUNK):
                    sess.send(data)
                    stats.to_tunnel += len(data)
        except (OSError, TunnelError) as e:
            if not aborted.is_set():
                abort(f"to tunnel: {e}")
        if not aborted.is_set():  # the workload's clean FIN: close_notify, the other way still open
            sess.close_write()

    def back() -> None:  # tunnel -> workload
        try:
            if sess.tls is None:
                _splice(sess.sock, workload, lambda n: setattr(stats, "from_tunnel", stats.from_tunnel + n),
                        ktls_src=sess.mode == KTLS)
            else:
                while data := sess.recv(RELAY_CHUNK):
                    workload.sendall(data)
                    stats.from_tunnel += len(data)
        except OSError as e:
            if not aborted.is_set():
                abort("from tunnel: " + ("TLS record rejected by the kernel (EBADMSG): tampered or corrupted"
                                         if e.errno == errno.EBADMSG else str(e)))
        except TunnelError as e:
            if not aborted.is_set():
                abort(f"from tunnel: {e}")
        if not aborted.is_set():  # the peer's close_notify: a FIN to the workload
            try:
                workload.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    t = threading.Thread(target=out, name="tunnel-out", daemon=True)
    try:
        t.start()
        back()
        t.join()
    finally:
        workload.close()
        sess.close()
    return stats


def _reset(sock: socket.socket, wake_writers: bool) -> None:
    """Make the coming close() a TCP reset, and wake the threads blocked on ``sock``: readers
    always (SHUT_RD sends nothing), writers too when asked (SHUT_RDWR: a FIN goes first)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR if wake_writers else socket.SHUT_RD)
    except OSError:
        pass


def _splice(src: socket.socket, dst: socket.socket, moved: Callable[[int], None], chunk: int = PIPE_SIZE,
            ktls_src: bool = False) -> None:
    """Move bytes src -> dst through a pipe, in the kernel, until src's end of stream (for a
    kTLS source: also its close_notify, at which the kernel's splice stops with EINVAL);
    ``moved(n)`` after each piece delivered, so the count survives an error."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # above /proc/sys/fs/pipe-max-size for this user: the default 64 KiB
        chunk = 1 << 16
    try:
        while True:
            try:
                n = os.splice(src.fileno(), w, chunk)
            except OSError as e:
                if not (ktls_src and e.errno in (errno.EINVAL, errno.EIO)):
                    raise
                ktls_control_record(src)  # close_notify: the end; another record raises
                return
            if n == 0:
                if ktls_src:  # a FIN without close_notify: whoever sent it, the stream may be cut
                    raise TunnelError(CUT_SHORT)
                return
            while n:
                m = os.splice(r, dst.fileno(), n)
                n -= m
                moved(m)
    finally:
        os.close(r)
        os.close(w)


@dataclass(frozen=True)
class TunnelEvent:
    at: float
    peer: str  # the client's SPIFFE ID ("" when the handshake failed)
    src: str
    dst: str
    verdict: str  # forwarded | denied | failed
    reason: str
    mode: str
    to_tunnel: int = 0
    from_tunnel: int = 0


class TunnelServer:
    """The accepting side of a node: one thread per tunnel (at most ``max_conns``), every
    outcome an event with its reason. Stops by itself after ``lifetime_s``."""

    def __init__(self, node: TunnelNode, listen: socket.socket, authorize: Authorize,
                 max_conns: int = 256, lifetime_s: float = 3600.0, max_events: int = 10000,
                 fixed_dst: str = "") -> None:
        self.node, self.listen, self.authorize, self.fixed_dst = node, listen, authorize, fixed_dst
        self.events: list[TunnelEvent] = []  # the last max_events, for tests and status
        self.counts = {"forwarded": 0, "denied": 0, "failed": 0}
        self.bytes = {"to_tunnel": 0, "from_tunnel": 0}  # relayed by the tunnels that ended (metrics)
        self._undrained: list[TunnelEvent] = []
        self.max_conns, self.max_events = max_conns, max_events
        self._stop = threading.Event()
        self._loop = AcceptLoop(listen, self._serve, Slots(max_conns), self._accept_failed, self._stop.is_set,
                                time.monotonic() + lifetime_s, name="tunnel-accept", conn_name="tunnel-conn")
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.listen.getsockname()[1])

    def start(self) -> TunnelServer:
        self._loop.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._loop.join(timeout=5)
        self.listen.close()

    @staticmethod
    def stop_all(servers: list[TunnelServer]) -> None:
        """Several at once: every loop told first, then each joined (one accept timeout in all, not each)."""
        for srv in servers:
            srv._stop.set()
        for srv in servers:
            srv.stop()

    def _record(self, ev: TunnelEvent) -> None:
        with self._lock:
            self.events.append(ev)
            del self.events[: max(0, len(self.events) - self.max_events)]
            self.counts[ev.verdict] += 1
            self.bytes["to_tunnel"] += ev.to_tunnel
            self.bytes["from_tunnel"] += ev.from_tunnel
            self._undrained.append(ev)
            del self._undrained[: max(0, len(self._undrained) - self.max_events)]

    def drain(self) -> list[TunnelEvent]:
        """Events since the last drain (at most max_events: older ones are only counted)."""
        with self._lock:
            out, self._undrained = self._undrained, []
            return out

    def _accept_failed(self, _what: str, _peer: str, why: str) -> None:
        """The accept loop's trouble (an accept error, no free slot, no thread): a failed event."""
        self._record(TunnelEvent(time.time(), "", "", "", "failed", why, self.node.mode))

    def _serve(self, conn: socket.socket, _peer: str) -> None:
        try:
            sess, upstream, src, dst = self.node.accept(conn, self.authorize, self.fixed_dst)
        except TunnelError as e:
            self._record(TunnelEvent(time.time(), e.peer, e.src, e.dst, "denied" if e.denied else "failed",
                                     str(e), self.node.mode))
            conn.close()
            return
        except (OSError, ValueError, RecursionError) as e:  # the dialer vanished or sent garbage (deep JSON)
            self._record(TunnelEvent(time.time(), "", "", "", "failed", f"tunnel set-up: {e!r}", self.node.mode))
            conn.close()
            return
        stats = relay(upstream, sess)
        self._record(TunnelEvent(time.time(), sess.peer_id, src, dst, "failed" if stats.error else "forwarded",
                                 stats.error, sess.mode, stats.to_tunnel, stats.from_tunnel))
