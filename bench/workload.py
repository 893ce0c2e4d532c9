"""Runs inside a pod netns (stdlib only): the server and the client of the datapath bench.

server: echo on 9000 (request/response), sink on 9001 (throughput); stops after 300 s.
client MODE HOST PORT COUNT SIZE: prints one JSON object of measurements in nanoseconds.
"""

import json
import socket
import struct
import sys
import threading
import time


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


def connect(host: str, port: int, count: int) -> list[int]:
    out = []
    linger0 = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT, no ephemeral port exhaustion
    for _ in range(count):
        s = socket.socket()
        t0 = time.perf_counter_ns()
        s.connect((host, port))
        out.append(time.perf_counter_ns() - t0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        s.close()
    return out


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


def main() -> None:
    if sys.argv[1] == "server":
        server()
        return
    mode, host, port, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    fn = {"connect": lambda: connect(host, port, count), "rr": lambda: rr(host, port, count, size),
          "stream": lambda: stream(host, port, count, size)}[mode]
    print(json.dumps(fn()))


if __name__ == "__main__":
    main()
