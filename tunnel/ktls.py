"""TLS 1.3 handshake in user space, then the record keys handed to the kernel (kTLS).

The handshake runs on an ``ssl.SSLObject`` over memory BIOs, fed one TLS record at a time
from the socket, so not one byte after the handshake's last record is read in user space:
whatever the peer sends next is left in the socket for the kernel. The traffic secrets come
from OpenSSL's key log (``SSLContext.keylog_filename``, a 0600 file on /run that is emptied
whenever no handshake is in flight), matched to the connection by its ClientHello random;
the record keys are derived with HKDF-Expand-Label (RFC 8446 §7.3) and installed with
``setsockopt(SOL_TLS, TLS_TX/TLS_RX)`` at sequence number 0: the server sends no session
ticket (``num_tickets = 0``), so no application-key record precedes the kernel's.

Without kTLS (no ``tls`` module: this host's kernel) :class:`UserspaceTls` keeps the
SSLObject and encrypts in Python; the session (``tunnel.session``) says which one it made.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

# linux/tls.h, linux/tcp.h (Python 3.11's socket module has none of these)
SOL_TLS, TCP_ULP, TLS_TX, TLS_RX = 282, 31, 1, 2
TLS_SET_RECORD_TYPE, TLS_GET_RECORD_TYPE = 1, 2  # cmsg types on a kTLS socket
ALERT, CLOSE_NOTIFY = 21, b"\x01\x00"  # record type; alert level warning, description close_notify
TLS_1_3_VERSION = 0x0304
_CIPHERS = {  # OpenSSL name -> (kernel cipher type, key length, iv in info, salt, hash)
    "TLS_AES_128_GCM_SHA256": (51, 16, 8, 4, hashes.SHA256),
    "TLS_AES_256_GCM_SHA384": (52, 32, 8, 4, hashes.SHA384),
    "TLS_CHACHA20_POLY1305_SHA256": (54, 32, 12, 0, hashes.SHA256),
}
MAX_RECORD = 16384 + 256
HANDSHAKE_TIMEOUT_S = 10.0
TRUNCATE_AT = 64 << 10  # key log bytes (about 150 handshakes) kept at most while idle
FORCE_TRUNCATE_AT = 16 << 20  # never idle (steady handshakes): truncated anyway past this
CUT_SHORT = "the peer closed the connection without close_notify: the stream may have been cut short"
SECRET_TTL_S = 60.0  # secrets of a handshake that never asked for them (it failed) are dropped after this


class TunnelError(Exception):
    """A tunnel could not be made or broke; the message says why (shown in status and flows)."""

    def __init__(self, message: str, peer: str = "", src: str = "", dst: str = "", denied: bool = False) -> None:
        super().__init__(message)
        self.peer, self.src, self.dst, self.denied = peer, src, dst, denied


def hkdf_expand_label(secret: bytes, label: str, length: int, algorithm: Callable[[], hashes.HashAlgorithm]) -> bytes:
    full = b"tls13 " + label.encode()
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(algorithm(), length, info).derive(secret)


def crypto_info(cipher: str, secret: bytes, seq: int = 0) -> bytes:
    """struct tls12_crypto_info_* for one direction of a TLS 1.3 session."""
    if cipher not in _CIPHERS:
        raise TunnelError(f"cipher {cipher} has no kernel TLS implementation")
    ctype, key_len, iv_len, salt_len, algo = _CIPHERS[cipher]
    key = hkdf_expand_label(secret, "key", key_len, algo)
    iv = hkdf_expand_label(secret, "iv", 12, algo)  # TLS 1.3: salt || explicit part of the nonce
    salt, explicit = iv[:salt_len], iv[salt_len:]
    # the header is host-endian u16s; the record sequence number is big-endian bytes
    return struct.pack("=HH", TLS_1_3_VERSION, ctype) + explicit + key + salt + struct.pack("!Q", seq)


def _private_dir(path: Path) -> None:
    """The key log's directory and every one made on the way to it: 0700 whatever the umask
    (mkdir's mode is masked, and ``parents=True`` gives the intermediate ones the umask's)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for p in (path, *missing):
        os.chmod(p, 0o700)


class KeyLog:
    """The traffic secrets OpenSSL logs, by ClientHello random; emptied when idle and past
    TRUNCATE_AT, and on close. A 0600 file on /run (tmpfs): it never reaches a disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        self._lock = threading.Lock()
        self._offset = 0
        self._in_flight = 0
        self._secrets: dict[bytes, dict[str, bytes]] = {}
        self._seen: dict[bytes, float] = {}  # client random -> when its first secret was read

    def close(self) -> None:
        with self._lock:
            self._clear()
            self.path.unlink(missing_ok=True)

    def _clear(self) -> None:
        if self.path.exists():
            os.truncate(self.path, 0)
        self._offset = 0
        self._secrets.clear()
        self._seen.clear()

    def attach(self, ctx: ssl.SSLContext) -> None:
        if ctx.keylog_filename != str(self.path):
            ctx.keylog_filename = str(self.path)

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def end(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if (self._in_flight == 0 and self._offset > TRUNCATE_AT) or self._offset > FORCE_TRUNCATE_AT:
                # idle: no handshake can be writing now, so every secret goes from the file (not
                # after each handshake: a truncate costs about as much as the handshake's own CPU).
                # Past FORCE_TRUNCATE_AT (handshakes without pause) a handshake in flight may lose
                # its secrets: it fails saying so, and the dialer tries again.
                self._clear()

    def take(self, client_random: bytes) -> dict[str, bytes]:
        with self._lock:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            now = time.monotonic()
            for line in data[:end].splitlines():
                parts = line.split()
                if len(parts) == 3:
                    rnd = bytes.fromhex(parts[1].decode())
                    self._secrets.setdefault(rnd, {})[parts[0].decode()] = bytes.fromhex(parts[2].decode())
                    self._seen.setdefault(rnd, now)
            for rnd in [r for r, t in self._seen.items() if now - t > SECRET_TTL_S]:
                self._secrets.pop(rnd, None)  # a failed handshake's: nobody will take them
                del self._seen[rnd]
            self._seen.pop(client_random, None)
            return self._secrets.pop(client_random, {})


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:  # a deadline for the whole handshake: a byte every few seconds does not hold a slot
            raise TunnelError(f"the TLS handshake took longer than {HANDSHAKE_TIMEOUT_S:.0f} s")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise TunnelError(f"peer closed the connection during the TLS handshake ({len(buf)}/{n} bytes of a record)")
        buf += chunk
    return bytes(buf)


def _read_record(sock: socket.socket, deadline: float) -> bytes:
    head = _recv_exact(sock, 5, deadline)
    length = struct.unpack("!H", head[3:5])[0]
    if length > MAX_RECORD:
        raise TunnelError(f"peer sent a {length}-byte TLS record (max {MAX_RECORD}): not TLS")
    return head + _recv_exact(sock, length, deadline)


@dataclass
class Handshake:
    obj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    client_random: bytes
    peer_der: bytes
    cipher: str


def handshake(sock: socket.socket, ctx: ssl.SSLContext, server_side: bool, keylog: KeyLog,
              server_hostname: str | None = None) -> tuple[Handshake, dict[str, bytes]]:
    """Run the TLS 1.3 handshake; (state, traffic secrets from the key log)."""
    keylog.attach(ctx)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=server_side, server_hostname=server_hostname)
    random = b""
    keylog.begin()
    old_timeout = sock.gettimeout()
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = out.read()
                if pending:
                    if not random and not server_side:
                        random = pending[11:43]  # record(5) + handshake header(4) + version(2)
                    sock.sendall(pending)
                record = _read_record(sock, deadline)
                if not random and server_side:
                    random = record[11:43]
                inc.write(record)
            except ssl.SSLError as e:
                pending = out.read()  # the alert that tells the peer why
                if pending:
                    try:
                        sock.sendall(pending)
                    except OSError:
                        pass
                detail = getattr(e, "verify_message", "")
                raise TunnelError(f"TLS handshake failed: {e.reason or e}" + (f" ({detail})" if detail else "")) from e
        pending = out.read()
        if pending:
            sock.sendall(pending)
        secrets = keylog.take(random)
    except (OSError, TimeoutError) as e:
        if isinstance(e, TunnelError):
            raise
        raise TunnelError(f"TLS handshake: {e}") from e
    finally:
        sock.settimeout(old_timeout)
        keylog.end()
    cipher = obj.cipher()
    der = obj.getpeercert(binary_form=True)
    if not der:
        raise TunnelError("TLS handshake: the peer presented no certificate")
    return Handshake(obj, inc, out, random, der, cipher[0] if cipher else ""), secrets


def install(sock: socket.socket, hs: Handshake, secrets: dict[str, bytes], server_side: bool) -> None:
    """Hand the session's keys to the kernel; raises OSError(ENOENT) when it has no kTLS."""
    mine, theirs = ("SERVER_TRAFFIC_SECRET_0", "CLIENT_TRAFFIC_SECRET_0")[:: 1 if server_side else -1]
    if mine not in secrets or theirs not in secrets:
        raise TunnelError(f"no traffic secrets in the key log for this handshake (have {sorted(secrets)})")
    sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    sock.setsockopt(SOL_TLS, TLS_TX, crypto_info(hs.cipher, secrets[mine]))
    sock.setsockopt(SOL_TLS, TLS_RX, crypto_info(hs.cipher, secrets[theirs]))


def ktls_probe() -> tuple[bool, str]:
    """Whether an established TCP socket here accepts the "tls" upper-layer protocol (the
    module is loaded on demand), probed on a loopback pair; and why not."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        with socket.create_connection(srv.getsockname(), timeout=2) as c:
            peer, _ = srv.accept()
            with peer:
                try:
                    c.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
                    return True, "available"
                except OSError as e:
                    return False, ("CONFIG_TLS not set (no tls module)" if e.errno == errno.ENOENT
                                   else e.strerror or str(e))


def kernel_has_ktls() -> bool:
    return ktls_probe()[0]


class UserspaceTls:
    """The same session, encrypted in Python: the fallback when the kernel has no kTLS.

    The relay reads on one thread and writes on another; OpenSSL's SSL object is not safe to
    use from two threads at once (a read and a write at the same moment corrupted the
    session: seen as a spurious end of stream), so every use of it holds ``_ssl``. Socket
    I/O happens outside that lock (a blocked read must not stop the writer)."""

    def __init__(self, sock: socket.socket, hs: Handshake) -> None:
        self.sock, self.hs = sock, hs
        self._ssl = threading.Lock()  # the SSL object and its two memory BIOs
        self._send = threading.Lock()  # encrypt + sendall: records leave in the order they were made
        self._early = b""  # plaintext decrypted by close_write before its shutdown, not yet returned
        self._early_end = False  # close_write met the peer's close_notify

    def send(self, data: bytes) -> None:
        with self._send:
            with self._ssl:
                self.hs.obj.write(data)
                out = self.hs.outgoing.read()
            self.sock.sendall(out)

    def recv(self, n: int = 65536) -> bytes:
        """Plaintext; b"" at the peer's close_notify; TunnelError when a record fails
        authentication or the connection ends without close_notify (the stream may be cut)."""
        while True:
            try:
                with self._ssl:
                    if self._early or self._early_end:
                        out, self._early = self._early[:n], self._early[n:]
                        return out
                    first = self.hs.obj.read(n)
                    return first + self._more(n - len(first)) if first else first
            except ssl.SSLWantReadError:
                data = self.sock.recv(1 << 18)
                if not data:
                    raise TunnelError(CUT_SHORT) from None
                with self._ssl:
                    self.hs.incoming.write(data)
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as e:
                if "ALERT" in str(e.reason or ""):  # the peer said why it ends (e.g. it refused our certificate)
                    raise TunnelError(f"peer sent {str(e.reason).lower()}") from e
                raise TunnelError(f"TLS record rejected: {e.reason or e}") from e

    def _more(self, n: int) -> bytes:
        """Whatever further records are already decryptable (one SSL read is one record: 16 KiB).
        Called holding ``_ssl``."""
        parts = []
        while n > 0 and self.hs.incoming.pending:
            try:
                part = self.hs.obj.read(n)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not part:
                break
            parts.append(part)
            n -= len(part)
        return b"".join(parts)

    def close_write(self) -> None:
        with self._send:
            with self._ssl:
                # unwrap() also reads: a data record waiting in the incoming buffer would make it
                # fail (APPLICATION_DATA_AFTER_CLOSE_NOTIFY) and break the direction still open.
                # So first everything decryptable is taken out, for recv() to return.
                parts = [self._early]
                while True:
                    try:
                        part = self.hs.obj.read(1 << 16)
                    except ssl.SSLZeroReturnError:
                        self._early_end = True
                        break
                    except ssl.SSLError:
                        break  # WantRead (nothing whole left), or a bad record recv() will meet again
                    if not part:
                        break
                    parts.append(part)
                self._early = b"".join(parts)
                try:
                    self.hs.obj.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLError):
                    pass
                out = self.hs.outgoing.read()
            try:
                if out:
                    self.sock.sendall(out)
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def ebadmsg(e: OSError) -> bool:
    """What a kTLS socket's read raises for a record that fails authentication."""
    return e.errno == errno.EBADMSG


def ktls_control_record(sock: socket.socket) -> bytes:
    """Read the non-data record a kTLS socket stopped at (its plain read fails with EIO, a splice
    with EINVAL): b"" for the peer's close_notify (its end of stream); TunnelError for anything
    else (another alert, a post-handshake message this tunnel never sends)."""
    data, anc, _, _ = sock.recvmsg(MAX_RECORD, socket.CMSG_SPACE(1))
    rtype = next((d[0] for level, kind, d in anc if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE and d), None)
    if rtype == ALERT and data[:2] == CLOSE_NOTIFY:
        return b""
    if rtype is None and not data:
        return b""  # the connection ended
    if rtype == ALERT:
        raise TunnelError(f"peer sent {alert_text(data)}")
    raise TunnelError(f"peer sent TLS record type {rtype} ({data[:2].hex()}): not data, not close_notify")


def alert_text(body: bytes) -> str:
    """A TLS alert's two bytes in words: "fatal alert unknown_ca (48)"."""
    if len(body) < 2:
        return f"a truncated TLS alert ({body.hex()})"
    level = {1: "warning", 2: "fatal"}.get(body[0], f"level-{body[0]}")
    try:
        name = ssl.AlertDescription(body[1]).name.removeprefix("ALERT_DESCRIPTION_").lower()
    except ValueError:
        name = "unknown"
    return f"{level} alert {name} ({body[1]})"


def ktls_close_notify(sock: socket.socket) -> None:
    """Our end of the stream, TLS-style: a close_notify alert record (the kernel encrypts it)."""
    sock.sendmsg([CLOSE_NOTIFY], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([ALERT]))])
