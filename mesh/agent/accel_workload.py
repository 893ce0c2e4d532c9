"""Stress workload of the sockmap self-test, run inside two pods (stdlib only).

server PORT LIFETIME_S: for each connection, read to EOF (the client half-closes), then send the
  sha256 of what arrived followed by a reply of the same length (a pattern), and close.
client HOST PORT PAIRS SIZES TIMEOUT_S: PAIRS threads; each, for every size, connects, writes the
  payload in uneven chunks, half-closes, reads digest + reply to EOF and checks both: a byte lost,
  reordered or duplicated, or a stall longer than TIMEOUT_S, fails. Prints one JSON line.
"""

import hashlib
import json
import random
import socket
import sys
import threading
import time


def _payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _reply(n: int) -> bytes:
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


def _serve(c: socket.socket) -> None:
    with c:
        h, n = hashlib.sha256(), 0
        while data := c.recv(1 << 16):
            h.update(data)
            n += len(data)
        c.sendall(h.digest() + _reply(n))


def server(port: int, lifetime_s: float) -> None:
    s = socket.create_server(("0.0.0.0", port), backlog=256)
    s.settimeout(1)
    end = time.monotonic() + lifetime_s
    while time.monotonic() < end:
        try:
            c, _ = s.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_serve, args=(c,), daemon=True).start()


def _one(host: str, port: int, seed: int, size: int, timeout_s: float) -> str | None:
    data = _payload(seed, size)
    rnd = random.Random(seed + 1)
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        i = 0
        while i < size:
            step = rnd.choice((1, 3, 100, 1400, 4096, 65536, 262144))
            s.sendall(data[i:i + step])
            i += step
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := s.recv(1 << 16):
            got += chunk
    if bytes(got[:32]) != hashlib.sha256(data).digest():
        return f"size {size}: the server received other bytes than were sent"
    if bytes(got[32:]) != _reply(size):
        return f"size {size}: the reply arrived altered ({len(got) - 32} of {size} bytes)"
    return None


def client(host: str, port: int, pairs: int, sizes: list[int], timeout_s: float) -> None:
    errors: list[str] = []
    done = [0]
    t0 = time.monotonic()

    def worker(w: int) -> None:
        for k, size in enumerate(sizes):
            try:
                err = _one(host, port, w * 1000 + k, size, timeout_s)
            except OSError as e:  # a timeout here is a stall
                err = f"size {size}: {type(e).__name__} {e}"
            if err:
                errors.append(f"pair {w}: {err}")
                return
            done[0] += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"connections": done[0], "errors": errors[:5], "seconds": round(time.monotonic() - t0, 3)}))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]), float(sys.argv[3]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), [int(x) for x in sys.argv[5].split(",")],
               float(sys.argv[6]))
