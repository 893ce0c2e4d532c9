"""The UI's HTTP server: the static page (mesh/ui/static) and three JSON endpoints, on 127.0.0.1 only.

  GET /api/flows?<filters>&after=<id>&limit=<n>  the newest flows that match, each with the id it was read as;
                                                 ``next`` is the cursor to send as ``after`` to get only newer ones
  GET /api/graph?<filters>                       the service map of the flows that match (mesh.ui.graph)
  GET /api/status                                the agent's status.json, summed up (alive, problems, pods)

Flows are read as ``webb observe -f`` reads them (mesh.cli.observe.FlowFile: both files once, then only the
bytes appended; rotation and truncation followed); the newest MAX_FLOWS stay in memory.

What a flow holds came from pods (a request path, a method): the page writes it with ``textContent`` only, and
the server forbids inline script and every origin but its own (Content-Security-Policy). A request whose
Host is not this server's address is refused, so a web page in another tab cannot read flows through a DNS
name rebound to 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mesh.cli.observe import FlowFile, first_flows, parse
from mesh.cli.status import liveness, problems
from mesh.status import AgentStatus
from mesh.ui import graph
from mesh.ui.query import FlowQuery, QueryError

log = logging.getLogger("webb.ui")
ADDRESS = "127.0.0.1"
DEFAULT_PORT = 12000
MAX_FLOWS = 20_000  # what the map and the table draw from: the flow log's two files hold ~60,000 at most
STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class FlowStore:
    """The flows of one state dir, numbered in the order they were read (the ids of /api/flows)."""

    def __init__(self, path: Path, keep: int = MAX_FLOWS) -> None:
        self._tail = FlowFile(path)
        self._flows: deque[tuple[int, dict[str, Any]]] = deque(maxlen=keep)
        self._last = 0
        self._started = False
        self._lock = threading.Lock()

    def snapshot(self) -> tuple[list[tuple[int, dict[str, Any]]], int]:
        """What is kept, after reading what was appended since the last call; and the newest id."""
        with self._lock:
            new = parse(self._tail.lines()) if self._started else first_flows(self._tail)
            self._started = True
            for f in new:
                self._last += 1
                self._flows.append((self._last, f))
            return list(self._flows), self._last

    def close(self) -> None:
        with self._lock:
            self._tail.close()


def status_summary(state_dir: Path, now: float) -> dict[str, Any]:
    st = AgentStatus.read(state_dir)
    if st is None:
        return {"node": "", "alive": False, "problems": [f"no agent status in {state_dir}: no agent has run there"],
                "pods": [], "services": 0}
    return {"node": st.node, "alive": liveness(st, now) is None, "pid": st.pid, "updated": st.updated,
            "problems": problems(st, now) + list(st.errors), "pods": sorted(st.pods), "services": len(st.services)}


class UIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state_dir: Path, port: int = DEFAULT_PORT) -> None:
        self.state_dir = state_dir
        self.store = FlowStore(state_dir / "flows.jsonl")
        self.static = {f"/{p.name}": p for p in STATIC.iterdir() if p.suffix in _TYPES}
        self.static["/"] = STATIC / "index.html"
        super().__init__((ADDRESS, port), Handler)

    @property
    def url(self) -> str:
        return f"http://{ADDRESS}:{self.server_address[1]}/"

    def server_close(self) -> None:
        super().server_close()
        self.store.close()


class Handler(BaseHTTPRequestHandler):
    server: UIServer
    server_version = "webb-ui"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        port = self.server.server_address[1]
        if self.headers.get("Host", "") not in (f"{ADDRESS}:{port}", f"localhost:{port}"):
            return self._send(403, "text/plain; charset=utf-8", b"Host not allowed: open this page as " +
                              self.server.url.encode())
        url = urlsplit(self.path)
        try:
            if url.path in self.server.static:
                p = self.server.static[url.path]
                return self._send(200, _TYPES[p.suffix if p.suffix in _TYPES else ".html"], p.read_bytes())
            if url.path in ("/api/flows", "/api/graph"):
                q = FlowQuery.parse(url.query)
                return self._json(self._flows(q) if url.path == "/api/flows" else self._graph(q))
            if url.path == "/api/status":
                return self._json(status_summary(self.server.state_dir, time.time()))
        except QueryError as e:
            return self._json({"error": str(e)}, 400)
        except OSError as e:
            log.warning("GET %s: %s", url.path, e)
            return self._json({"error": f"read: {e}"}, 500)
        return self._json({"error": f"no such page: {url.path}"}, 404)

    def _flows(self, q: FlowQuery) -> dict[str, Any]:
        kept, last = self.server.store.snapshot()
        match = [(i, f) for i, f in kept if i > q.after and q.matches(f)]
        return {"flows": [{"id": i, "flow": f} for i, f in match[-q.limit:]], "next": last,
                "more": max(0, len(match) - q.limit), "filters": q.filters()}

    def _graph(self, q: FlowQuery) -> dict[str, Any]:
        kept, last = self.server.store.snapshot()
        g = graph.build([f for i, f in kept if i > q.after and q.matches(f)], AgentStatus.read(self.server.state_dir))
        return {**g, "next": last, "filters": q.filters(), "status": status_summary(self.server.state_dir, time.time())}

    def _json(self, doc: dict[str, Any], code: int = 200) -> None:
        try:
            body = json.dumps(doc, allow_nan=False, default=str)
        except ValueError:  # NaN or Infinity in a flow: not JSON a browser parses
            body = json.dumps(_finite(doc), default=str)
        self._send(code, "application/json", body.encode())

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in _HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        log.debug("%s " + format, self.address_string(), *args)


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


@contextmanager
def running(state_dir: Path, port: int = 0) -> Iterator[UIServer]:
    """The server, answering from a thread of this process until the block ends (the demo's screenshot)."""
    srv = UIServer(state_dir, port)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name="webb-ui", daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)
