"""`webb ui`'s server without a browser (tests/e2e/test_ui_chromium.py has the browser): the filters and the
cursor of /api/flows, the map of /api/graph, what is refused (an unknown or malformed parameter, another Host,
a path that is not one of the page's files), the headers that keep flow text from running as a page's code, and
a flow log that grows, is rotated and holds torn lines, read through `webb observe`'s reader."""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.ui import graph
from mesh.ui.query import FlowQuery, QueryError
from mesh.ui.server import UIServer, running

T0 = 1_700_000_000.0


def flow(n: int, **kw: Any) -> dict[str, Any]:
    f: dict[str, Any] = {"time": T0 + n, "layer": "L4", "protocol": "TCP", "src": "default/tiefighter",
                         "dst": "10.96.0.10:80", "service": "default/deathstar", "dst_pod": "default/deathstar-1",
                         "verdict": "forwarded", "reason": "service", "n": n}
    f.update(kw)
    return f


DENIED = flow(2, src="default/xwing", verdict="denied", reason="policy-denied", policy="default/rule1",
              why="default/deathstar-1 is selected by MeshPolicy default/rule1 and no ingress rule allows default/xwing")
L7_403 = flow(3, layer="L7", protocol="HTTP/1.1", service="default/deathstar:80", dst_pod=None, method="PUT",
              path="/v1/exhaust-port", status=403, verdict="denied", reason="l7-policy-denied", policy="default/rule1#ingress[0]")
L7_200 = flow(4, layer="L7", protocol="HTTP/1.1", service="default/deathstar:80", method="POST", path="/v1/request-landing",
              status=200, reason="l7-forwarded")
AUDIT = flow(5, src="empire/probe", service="default/deathstar", verdict="audit", reason="policy-audit")


def write(path: Path, flows: list[dict[str, Any]], extra: str = "") -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(x) + "\n" for x in flows) + extra)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[UIServer]:
    write(tmp_path / "flows.jsonl.1", [flow(0)])
    write(tmp_path / "flows.jsonl", [flow(1), DENIED, L7_403, L7_200, AUDIT], extra="{torn\n[1, 2]\n")
    with running(tmp_path) as srv:
        yield srv


def get(srv: UIServer, path: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    port = srv.server_address[1]
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.putrequest("GET", path, skip_host=True)
        c.putheader("Host", host or f"127.0.0.1:{port}")
        c.endheaders()
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def api(srv: UIServer, path: str) -> Any:
    code, _, body = get(srv, path)
    assert code == 200, body
    return json.loads(body)


def ns(doc: dict[str, Any]) -> list[int]:
    return [x["flow"]["n"] for x in doc["flows"]]


def test_flows_both_files_oldest_first_torn_lines_skipped(server: UIServer) -> None:
    doc = api(server, "/api/flows")
    assert ns(doc) == [0, 1, 2, 3, 4, 5]  # the rotated file's first (observe's first_flows: sorted by time)
    assert doc["next"] == 6 and doc["more"] == 0


@pytest.mark.parametrize(("query", "want"), [
    ("verdict=denied", [2, 3]),
    ("verdict=DENIED&layer=l4", [2]),
    ("pod=xwing", [2]),
    ("pod=default/deathstar-1", [0, 1, 2, 4, 5]),  # the 403 reached no pod
    ("namespace=empire", [5]),
    ("protocol=http", [3, 4]),
    ("protocol=tcp", [0, 1, 2, 5]),
    ("method=put", [3]),
    ("status=4xx", [3]),
    ("status=200", [4]),
    (f"since={T0 + 3}", [3, 4, 5]),
    ("verdict=audit", [5]),
    ("limit=2", [4, 5]),
    ("after=4", [4, 5]),
])
def test_filters(server: UIServer, query: str, want: list[int]) -> None:
    assert ns(api(server, f"/api/flows?{query}")) == want


def test_since_a_duration_counts_back_from_now() -> None:
    assert FlowQuery.parse("since=5m", now=1000.0).since == 700.0
    assert FlowQuery.parse("since=2h", now=10_000.0).since == 2800.0
    assert FlowQuery.parse("since=", now=1.0).since == 0.0  # blank: no filter (an empty form field)


@pytest.mark.parametrize(("query", "says"), [
    ("verdict=maybe", "verdict 'maybe': use one of forwarded, denied"),
    ("colour=red", "unknown parameter 'colour'"),
    ("pod=a&pod=b", "given twice"),
    ("pod=<script>", "not a pod name"),
    ("namespace=Bad_NS", "not a namespace name"),
    ("status=99", "an HTTP status (100-599)"),
    ("status=6xx", "an HTTP status"),
    ("since=yesterday", "a duration (30s, 5m, 2h, 1d)"),
    ("limit=0", "limit 0: 1 to 5000"),
    ("after=-1", "a whole number"),
    ("method=GET%20/x", "letters, digits"),
    ("layer=L3", "use L4 or L7"),
])
def test_bad_parameters_are_refused_naming_them(server: UIServer, query: str, says: str) -> None:
    code, headers, body = get(server, f"/api/flows?{query}")
    assert code == 400 and headers["Content-Type"] == "application/json"
    assert says in json.loads(body)["error"]
    with pytest.raises(QueryError):
        FlowQuery.parse(query)


def test_new_lines_rotation_and_the_cursor(server: UIServer, tmp_path: Path) -> None:
    first = api(server, "/api/flows")
    write(tmp_path / "flows.jsonl", [flow(6, verdict="dropped", reason="no-backend")])
    doc = api(server, f"/api/flows?after={first['next']}")
    assert ns(doc) == [6] and doc["next"] == 7
    os.replace(tmp_path / "flows.jsonl", tmp_path / "flows.jsonl.1")  # the agent rotates (FlowLog)
    write(tmp_path / "flows.jsonl", [flow(7)])
    assert ns(api(server, f"/api/flows?after={doc['next']}")) == [7]
    assert ns(api(server, f"/api/flows?after={doc['next']}&verdict=denied")) == []


def test_graph_edges_per_verdict_class(server: UIServer) -> None:
    g = api(server, "/api/graph")
    edges = {(e["src"], e["dst"], e["verdict"]): e for e in g["edges"]}
    assert set(edges) == {("default/tiefighter", "default/deathstar", "forwarded"),
                          ("default/tiefighter", "default/deathstar", "denied"),  # the L7 403: its service without ":80"
                          ("default/xwing", "default/deathstar", "denied"),
                          ("empire/probe", "default/deathstar", "audit")}
    denied = edges[("default/xwing", "default/deathstar", "denied")]
    assert denied["last"]["why"] == DENIED["why"] and denied["policies"] == ["default/rule1"] and denied["layers"] == ["L4"]
    assert edges[("default/tiefighter", "default/deathstar", "forwarded")]["count"] == 3  # flows 0, 1, 4
    nodes = {n["id"]: n for n in g["nodes"]}
    assert nodes["default/deathstar"]["kind"] == "service" and nodes["default/deathstar"]["pods"] == ["default/deathstar-1"]
    assert "default/deathstar-1" not in nodes  # drawn as the service's backend, not apart
    assert g["status"]["alive"] is False and "no agent status" in g["status"]["problems"][0]
    only = api(server, "/api/graph?verdict=denied&layer=L4")
    assert [(e["src"], e["verdict"]) for e in only["edges"]] == [("default/xwing", "denied")]


def test_graph_dropped_and_unknown_verdicts_are_red_and_addresses_are_nodes() -> None:
    g = graph.build([flow(1, verdict="dropped", service=None, dst_pod=None, dst="[fd00::9]:80", src="10.0.0.9"),
                     flow(2, verdict="weird")], None)
    assert [(e["src"], e["dst"], e["verdict"]) for e in g["edges"]] == [
        ("10.0.0.9", "fd00::9", "denied"), ("default/tiefighter", "default/deathstar", "denied")]
    assert {n["id"]: n["kind"] for n in g["nodes"]}["fd00::9"] == "address"


def test_the_page_and_its_headers(server: UIServer) -> None:
    code, headers, body = get(server, "/")
    assert code == 200 and headers["Content-Type"].startswith("text/html") and b'<script src="/app.js"' in body
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    code, headers, body = get(server, "/app.js")
    assert code == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"innerHTML" not in body and b"insertAdjacentHTML" not in body and b"document.write" not in body
    assert b"http://" not in body.replace(b'"http://www.w3.org/2000/svg"', b"") and b"https://" not in body  # nothing fetched elsewhere
    for path in ("/../server.py", "/static/app.js", "/server.py", "/%2e%2e/server.py", "/api"):
        assert get(server, path)[0] == 404, path


def test_another_host_is_refused(server: UIServer) -> None:
    """A page elsewhere, its name rebound to 127.0.0.1, must not read the flows."""
    assert get(server, "/api/flows", host="attacker.example:12000")[0] == 403
    assert get(server, "/api/flows", host=f"localhost:{server.server_address[1]}")[0] == 200


def test_nan_in_a_flow_still_gives_json(tmp_path: Path) -> None:
    (tmp_path / "flows.jsonl").write_text('{"time": NaN, "src": "default/a", "verdict": "forwarded"}\n')
    with running(tmp_path) as srv:
        doc = api(srv, "/api/flows")
    assert doc["flows"][0]["flow"]["time"] == "nan"
