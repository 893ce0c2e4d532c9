"""The one accept loop of the tunnel's listeners: the accepting side's (TunnelServer) and the
agent's outbound listeners (mesh.agent.tunnels), and the bench's.

Accept with a short timeout (so a stop is seen), a thread per connection while a slot is free,
and survive what a busy node meets: an accept error (out of descriptors: EMFILE, ENFILE, out of
memory) is reported and the listener keeps serving after a pause (the backlog waits); no free
slot, or no thread to be had, refuses that one connection and says so. The loop ends when told
(``stopped()``), at its deadline, or when its listener is closed (EBADF/EINVAL).
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable

POLL_S = 0.2  # the accept timeout: how soon a stop is seen
ERROR_PAUSE_S = 0.1  # after an accept error (out of descriptors): the backlog waits, the listener stays
ACCEPT, BUSY, NO_THREAD = "accept", "busy", "thread"  # what on_error is told went wrong


class Slots:
    """At most ``limit`` connections served at once, by every loop that shares this."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = threading.BoundedSemaphore(limit)

    def take(self) -> bool:
        return self._sem.acquire(blocking=False)

    def give(self) -> None:
        self._sem.release()


# handle(connection, peer host): runs on the connection's own thread, which closes nothing for it
Handle = Callable[[socket.socket, str], None]
# on_error(what: ACCEPT | BUSY | NO_THREAD, peer host ("" for ACCEPT), why in words)
OnError = Callable[[str, str, str], None]


class AcceptLoop:
    """One listener's accept loop on its own thread (see the module)."""

    def __init__(self, listener: socket.socket, handle: Handle, slots: Slots, on_error: OnError,
                 stopped: Callable[[], bool], until: float, name: str = "tunnel-accept",
                 conn_name: str | None = "tunnel-conn") -> None:
        """``until``: a time.monotonic() deadline; ``conn_name``: the connection threads' name
        (None: Python's default)."""
        self.listener, self.handle, self.slots, self.on_error = listener, handle, slots, on_error
        self.stopped, self.until, self.conn_name = stopped, until, conn_name
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)

    def start(self) -> AcceptLoop:
        self.listener.settimeout(POLL_S)
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        self.thread.join(timeout=timeout)

    def run(self) -> None:
        while not self.stopped() and time.monotonic() < self.until:
            try:
                conn, addr = self.listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self.stopped() or e.errno in (errno.EBADF, errno.EINVAL):
                    return  # the listener was closed
                self.on_error(ACCEPT, "", f"accept: {e}")
                time.sleep(ERROR_PAUSE_S)
                continue
            peer = str(addr[0]) if isinstance(addr, tuple) and addr else ""
            if not self.slots.take():
                self.on_error(BUSY, peer, f"more than {self.slots.limit} tunnels at once")
                conn.close()
                continue
            conn.settimeout(None)
            try:
                threading.Thread(target=self._serve, args=(conn, peer), name=self.conn_name, daemon=True).start()
            except RuntimeError as e:  # no thread to be had
                self.slots.give()
                conn.close()
                self.on_error(NO_THREAD, peer, f"start a thread: {e}")

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            self.handle(conn, peer)
        finally:
            self.slots.give()
