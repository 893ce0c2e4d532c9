"""The Star Wars demo services (after Cilium's getting-started guide), stdlib only.

deathstar: serves POST /v1/request-landing and PUT /v1/exhaust-port on port 80.
Stops by itself after --lifetime seconds (default one hour).
"""

import argparse
import http.server
import socket
import threading

ROUTES = {
    ("POST", "/v1/request-landing"): b"Ship landed\n",
    ("PUT", "/v1/exhaust-port"): b"Panic: deathstar exploded\n",
}


class Deathstar(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        body = ROUTES.get((self.command, self.path.split("?")[0]))
        code = 200 if body else 404
        body = body or b"Not found\n"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", socket.gethostname())
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, fmt: str, *args: object) -> None:
        print(f"{self.client_address[0]} {fmt % args}", flush=True)


class DualStackServer(http.server.ThreadingHTTPServer):
    """IPv6 socket that also accepts IPv4 (v4-mapped): the pods are dual-stack."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--lifetime", type=float, default=3600.0)
    a = ap.parse_args()
    srv = DualStackServer(("::", a.port), Deathstar)
    threading.Timer(a.lifetime, srv.shutdown).start()
    srv.serve_forever()


if __name__ == "__main__":
    main()
