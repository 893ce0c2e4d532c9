"""Runs inside a pod netns (stdlib only): the server and the client of the datapath bench,
and the one connect storm of the bench and the tests (``connect_storm``).

server: echo on 9000 (request/response), sink on 9001 (throughput); stops after 300 s.
client MODE HOST PORT COUNT SIZE: prints one JSON object of measurements in nanoseconds
(MODE connect, rr, stream).
storm HOST PORT COUNT RATE [LIMIT_S]: refused connects, paced; prints a JSON ``Storm``.

Run it in a pod with ``argv(...)`` (``LocalNode.spawn``); read a storm's line with ``Storm.parse``.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

PATH = Path(__file__).resolve()
LIMIT_S = 60.0  # a connect storm stops after this long, whatever its count
STEP = 100  # the pacing and the time limit are checked every STEP connects


def _echo(c: socket.socket) -> None:
    with c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := c.recv(1 << 16):
            c.sendall(data)


def _sink(c: socket.socket) -> None:
    with c:
        total = 0
        while data := c.recv(1 << 20):
            total += len(data)
        c.sendall(total.to_bytes(8, "big"))


def server() -> None:
    deadline = time.monotonic() + 300
    for port, fn in ((9000, _echo), (9001, _sink)):
        s = socket.create_server(("0.0.0.0", port), backlog=1024)
        s.settimeout(1)

        def loop(s: socket.socket = s, fn=fn) -> None:  # noqa: ANN001
            while time.monotonic() < deadline:
                try:
                    c, _ = s.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=fn, args=(c,), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()
    while time.monotonic() < deadline:
        time.sleep(1)


def _recv_exact(s: socket.socket, n: int) -> None:
    while n:
        n -= len(s.recv(n))


@dataclass(frozen=True)
class Storm:
    """What one connect storm did: connects made (``count`` unless the time limit came first),
    how many were refused, the rate reached, and each connect()'s time when timed (ns)."""

    connects: int
    refused: int
    per_s: float
    latencies_ns: list[int] = field(default_factory=list)

    @classmethod
    def parse(cls, out: str | bytes) -> Storm:
        return cls(**json.loads(out))


def connect_storm(host: str, port: int, count: int, rate: float = 0.0, limit_s: float = LIMIT_S,
                  timed: bool = False) -> Storm:
    """Up to ``count`` TCP connects to host:port one after the other, each socket closed at once;
    at most ``limit_s`` seconds (checked every STEP connects). ``rate``: paced to that many per
    second in steps of STEP, so the rate holds on a fast host; 0: as fast as one client goes.

    ``timed``: each connect() is timed, to a listening server (a refused one raises); closed with
    RST (SO_LINGER 0): no TIME_WAIT, no ephemeral port exhaustion. Untimed: a refused connect
    (a service without backend: refused in the kernel, a counted decision) is counted."""
    latencies: list[int] = []
    refused = 0
    done = count
    linger0 = struct.pack("ii", 1, 0)
    t0 = time.perf_counter()
    for i in range(count):
        if i % STEP == 0:
            now = time.perf_counter()
            if now - t0 >= limit_s:
                done = i
                break
            if rate and (ahead := t0 + i / rate - now) > 0:
                time.sleep(ahead)
        s = socket.socket()
        if timed:
            c0 = time.perf_counter_ns()
            s.connect((host, port))
            latencies.append(time.perf_counter_ns() - c0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        else:
            try:
                s.connect((host, port))
            except ConnectionRefusedError:
                refused += 1
        s.close()
    return Storm(done, refused, done / (time.perf_counter() - t0), latencies)


def connect(host: str, port: int, count: int) -> list[int]:
    """connect() latencies (ns) to a listening server: a timed connect storm of ``count``, unpaced."""
    st = connect_storm(host, port, count, timed=True)
    if st.connects < count:
        raise TimeoutError(f"connect {host}:{port}: {st.connects} of {count} connects in the time limit of {LIMIT_S:.0f} s")
    return st.latencies_ns


def rr(host: str, port: int, count: int, size: int) -> list[int]:
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * size
    for _ in range(min(200, count)):  # warm-up
        s.sendall(msg)
        _recv_exact(s, size)
    out = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        s.sendall(msg)
        _recv_exact(s, size)
        out.append(time.perf_counter_ns() - t0)
    s.close()
    return out


def stream(host: str, port: int, total: int, size: int) -> list[int]:
    s = socket.create_connection((host, port))
    msg = b"x" * size
    t0 = time.perf_counter_ns()
    sent = 0
    while sent < total:
        s.sendall(msg)
        sent += size
    s.shutdown(socket.SHUT_WR)
    _recv_exact(s, 8)
    return [time.perf_counter_ns() - t0, sent]


def argv(mode: str, *args: object) -> list[str]:
    """The command line running this workload (in a pod: ``LocalNode.spawn(sb, argv(...))``)."""
    return [sys.executable, str(PATH), mode, *map(str, args)]


def _hard_limit(seconds: float) -> None:
    """A connect() that blocks (a dropped SYN is retried for minutes) ends the process too."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"connect() still blocked after {seconds:.0f} s")

    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def main() -> None:
    if sys.argv[1] == "server":
        server()
        return
    if sys.argv[1] == "storm":
        host, port, count, rate = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
        limit_s = float(sys.argv[6]) if len(sys.argv) > 6 else LIMIT_S
        _hard_limit(limit_s + 10)
        print(json.dumps(asdict(connect_storm(host, port, count, rate, limit_s))))
        return
    mode, host, port, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    if mode == "connect":
        _hard_limit(LIMIT_S + 10)
    fn = {"connect": lambda: connect(host, port, count), "rr": lambda: rr(host, port, count, size),
          "stream": lambda: stream(host, port, count, size)}[mode]
    print(json.dumps(fn()))


if __name__ == "__main__":
    main()
