"""An HTTP backend for the layer-7 examples, stdlib only.

Every answer names the pod (``POD_NAME``). ``/slow`` answers after --slow-ms; ``/flaky/<key>``
answers 503 to the first --fail-first requests for each key, then 200; ``/count/<key>``
says how many requests ``/flaky/<key>`` has seen (so a test counts Envoy's retries on the
backend itself). Stops by itself after --lifetime seconds.
"""

import argparse
import http.server
import os
import socket
import threading
import time
from collections import Counter

HITS: Counter[str] = Counter()
LOCK = threading.Lock()
ARGS = argparse.Namespace()


class Backend(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", os.environ.get("POD_NAME", socket.gethostname()))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        pod = os.environ.get("POD_NAME", socket.gethostname())
        path = self.path.split("?")[0]
        if path == "/slow":
            time.sleep(ARGS.slow_ms / 1000)
        if path.startswith("/flaky/"):
            with LOCK:
                HITS[path.removeprefix("/flaky/")] += 1
                seen = HITS[path.removeprefix("/flaky/")]
            if seen <= ARGS.fail_first:
                self._send(503, f"{pod} failing ({seen})\n")
                return
        if path.startswith("/count/"):
            with LOCK:
                self._send(200, f"{HITS[path.removeprefix('/count/')]}\n")
            return
        self._send(200, f"{pod} {self.command} {path}\n")

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, fmt: str, *args: object) -> None:
        print(f"{self.client_address[0]} {fmt % args}", flush=True)


class DualStackServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--slow-ms", type=int, default=3000)
    ap.add_argument("--fail-first", type=int, default=2)
    ap.add_argument("--lifetime", type=float, default=3600.0)
    ap.parse_args(namespace=ARGS)
    server = DualStackServer(("::", ARGS.port), Backend)
    threading.Timer(ARGS.lifetime, server.shutdown).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
