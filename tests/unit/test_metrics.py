"""The agent's /metrics (mesh.agent.metrics): an Agent that is not running (no root: no datapath,
no Envoy), its flow log, xDS cache and a real mTLS tunnel on loopback, scraped over HTTP;
Envoy's stats text turned into the webb_envoy_http_* metrics; the address flag."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from certs.ca import CertificateAuthority
from certs.store import IdentityStore
from mesh.agent.loop import Agent, AgentConfig
from mesh.agent.metrics import envoy_red, parse_address, serve, stat_prefix
from mesh.agent.tunnels import NodeTunnels
from mesh.runtime.local import NodeConfig
from tests.conftest import ROOT
from tunnel.session import TunnelNode, TunnelServer
from xds import model as xm
from xds.resources import l7_chain

# Envoy 1.40's /stats/prometheus?filter=^http\.[^.]+\.downstream_rq_ for one service after 3 requests
# answered 200 and one 403 (taken from a real Envoy with the agent's stats matcher; buckets cut short)
ENVOY_TEXT = """\
# TYPE envoy_http_downstream_rq_completed counter
envoy_http_downstream_rq_completed{envoy_http_conn_manager_prefix="admin"} 1
envoy_http_downstream_rq_completed{envoy_http_conn_manager_prefix="default_deathstar_80"} 4
# TYPE envoy_http_downstream_rq_total counter
envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="admin"} 2
envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="default_deathstar_80"} 4
# TYPE envoy_http_downstream_rq_xx counter
envoy_http_downstream_rq_xx{envoy_response_code_class="2",envoy_http_conn_manager_prefix="admin"} 1
envoy_http_downstream_rq_xx{envoy_response_code_class="2",envoy_http_conn_manager_prefix="default_deathstar_80"} 3
envoy_http_downstream_rq_xx{envoy_response_code_class="4",envoy_http_conn_manager_prefix="default_deathstar_80"} 1
envoy_http_downstream_rq_xx{envoy_response_code_class="5",envoy_http_conn_manager_prefix="default_deathstar_80"} 0
# TYPE envoy_http_downstream_rq_time histogram
envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix="admin",le="0.5"} 0
envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix="admin",le="+Inf"} 1
envoy_http_downstream_rq_time_sum{envoy_http_conn_manager_prefix="admin"} 2.05
envoy_http_downstream_rq_time_count{envoy_http_conn_manager_prefix="admin"} 1
envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix="default_deathstar_80",le="0.5"} 1
envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix="default_deathstar_80",le="1"} 3
envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix="default_deathstar_80",le="1800000"} 4
envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix="default_deathstar_80",le="3600000"} 4
envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix="default_deathstar_80",le="+Inf"} 4
envoy_http_downstream_rq_time_sum{envoy_http_conn_manager_prefix="default_deathstar_80"} 2500
envoy_http_downstream_rq_time_count{envoy_http_conn_manager_prefix="default_deathstar_80"} 4
"""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, of an exposition text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the address ----
@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9962", ("127.0.0.1", 9962)), ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::1]:9962", ("::1", 9962)),
    ("localhost:9962", ("localhost", 9962)), ("[10.0.0.1]:9962", ("10.0.0.1", 9962)), ("", None), ("off", None),
    (" OFF ", None),
])
def test_metrics_address_parses(text: str, want: tuple[str, int] | None) -> None:
    assert parse_address(text) == want


@pytest.mark.parametrize("text, says", [
    ("9962", "HOST:PORT"), ("127.0.0.1:0", "HOST:PORT"), ("127.0.0.1:65536", "HOST:PORT"), ("127.0.0.1:x", "HOST:PORT"),
    ("::1:9962", "brackets"), ("[example.com]:9962", "not an IP address"), ("example.com:9962", "not an IP address"),
    ("127.0.0.1:99[/]", "HOST:PORT"), ("[]:9962", "not an IP address"),
])
def test_bad_metrics_address_is_refused_saying_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT|brackets|not an IP") as e:
        parse_address(text)
    assert says in str(e.value)


def test_a_taken_port_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        assert serve(CollectorRegistry(), address, "agent") is None
    assert "cannot listen on" in caplog.text


# ---- Envoy's stats ----
def test_stat_prefix_is_the_one_envoy_is_given() -> None:
    svc = xm.HttpService("default/deathstar:80", "10.244.0.1", 15001, (("10.244.0.5", 80),), None)
    chain = l7_chain(svc, "/dev/null")
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    manager = hcm.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(manager)
    assert manager.stat_prefix == stat_prefix(svc.name) == "default_deathstar_80"


def test_envoy_red_per_service_in_seconds_without_the_admin_listener() -> None:
    metrics = envoy_red(ENVOY_TEXT, {"default_deathstar_80": "default/deathstar:80"})

    class Fixed:
        def collect(self) -> list[Metric]:
            return metrics

    reg = CollectorRegistry()
    reg.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    got = samples(text)
    svc = "default/deathstar:80"
    assert value(got, "webb_envoy_http_requests_total", service=svc) == 4
    assert value(got, "webb_envoy_http_responses_total", service=svc, code_class="2xx") == 3
    assert value(got, "webb_envoy_http_responses_total", service=svc, code_class="4xx") == 1
    assert value(got, "webb_envoy_http_request_duration_seconds_bucket", service=svc, le="0.0005") == 1
    assert value(got, "webb_envoy_http_request_duration_seconds_bucket", service=svc, le="0.001") == 3
    assert value(got, "webb_envoy_http_request_duration_seconds_bucket", service=svc, le="1800.0") == 4
    assert value(got, "webb_envoy_http_request_duration_seconds_bucket", service=svc, le="+Inf") == 4
    assert value(got, "webb_envoy_http_request_duration_seconds_count", service=svc) == 4
    assert value(got, "webb_envoy_http_request_duration_seconds_sum", service=svc) == 2.5
    assert "admin" not in text and "envoy_http_conn_manager_prefix" not in text
    assert "# HELP webb_envoy_http_requests_total" in text


# ---- the agent, scraped ----
@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    port = free_port()
    a = Agent(AgentConfig(node=NodeConfig(name="m1", state_dir=tmp_path / "state"), manifests=tmp_path / "manifests",
                          metrics_address=f"127.0.0.1:{port}", trust_domain="webb.test"))
    a.metrics.start(a.cfg.metrics_address)
    try:
        yield a
    finally:
        a.metrics.stop()
        if a.tunnels is not None:
            a.tunnels.stop()


def scrape(a: Agent) -> str:
    with urllib.request.urlopen(f"http://{a.cfg.metrics_address}/metrics", timeout=5) as r:  # noqa: S310 - loopback
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return str(r.read().decode())


def test_agent_metrics_over_http_count_what_the_agent_did(agent: Agent) -> None:
    agent.flows.write([
        {"verdict": "denied", "layer": "L4", "reason": "policy-denied"},
        {"verdict": "denied", "layer": "L7", "reason": "l7-policy-denied"},
        {"verdict": "forwarded", "layer": "L7", "reason": "l7-forwarded"},
        {"verdict": "forwarded", "layer": "L7", "reason": "l7-forwarded"},
    ])
    agent.metrics.pushed(0.02, "acked")
    agent.metrics.pushed(0.5, "nacked")
    with agent.metrics.sync_timer():
        time.sleep(0.01)
    node = agent.cfg.node.name
    agent.cache.record(node, "type.googleapis.com/envoy.config.listener.v3.Listener", sent="v2", nacked="v2", error="bad")
    agent.cache.record(node, "type.googleapis.com/envoy.config.cluster.v3.Cluster", sent="v2", acked="v2")
    text = scrape(agent)
    got = samples(text)
    assert value(got, "webb_flows_total", verdict="denied", layer="L4", reason="policy-denied") == 1
    assert value(got, "webb_flows_total", verdict="denied", layer="L7", reason="l7-policy-denied") == 1
    assert value(got, "webb_flows_total", verdict="forwarded", layer="L7", reason="l7-forwarded") == 2
    assert value(got, "webb_xds_pushes_total", result="acked") == 1
    assert value(got, "webb_xds_pushes_total", result="nacked") == 1
    assert value(got, "webb_xds_pushes_total", result="timeout") == 0
    assert value(got, "webb_xds_push_to_ack_seconds_count") == 1  # only what was ACKed
    assert value(got, "webb_xds_push_to_ack_seconds_bucket", le="0.025") == 1
    assert value(got, "webb_sync_duration_seconds_count") == 1
    assert value(got, "webb_sync_duration_seconds_sum") >= 0.01
    assert value(got, "webb_xds_nacked", type="Listener") == 1 and value(got, "webb_xds_nacked", type="Cluster") == 0
    assert value(got, "webb_agent_info", node="m1", xds="delta") == 1
    # the agent is not running: no datapath, no Envoy; those sections say so and nothing failed
    assert value(got, "webb_envoy_stats_up") == 0
    assert not any(n.startswith("webb_datapath_") for n, _ in got)
    assert all(v == 0 for (n, _), v in got.items() if n == "webb_scrape_errors_total")
    # every family has its HELP, every name its prefix
    families = list(text_string_to_metric_families(text))
    assert families and all(f.name.startswith("webb_") and f.documentation for f in families)


def test_flow_label_sets_stay_bounded(agent: Agent) -> None:
    agent.flows.write([{"verdict": "forwarded", "layer": "L4", "reason": f"r{i}"} for i in range(300)])
    got = samples(scrape(agent))
    flows = {labels: v for (n, labels), v in got.items() if n == "webb_flows_total"}
    assert len(flows) <= 257 and sum(flows.values()) == 300
    assert value(got, "webb_flows_total", verdict="other", layer="other", reason="other") == 300 - 256


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)

    def run() -> None:
        with srv:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                conn.sendall(b"echo:" + data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, t


def test_tunnel_handshakes_bytes_and_certificate_expiry(agent: Agent, tmp_path: Path) -> None:
    """A real tunnel on loopback (user-space TLS here): this node accepts one from a client node,
    and fails a handshake that is not TLS."""
    state = agent.cfg.state_dir
    agent.tunnels = t = NodeTunnels("m1", state, state / "ca", "webb.test", "127.0.0.1")
    t.node.hosted = lambda ns, sa: True
    t.server = TunnelServer(t.node, socket.create_server(("127.0.0.1", 0)), lambda peer, src, dst: None, lifetime_s=30).start()
    t.store.get("default", "deathstar")  # the agent issues one per local workload
    workload, served = _echo_server()
    ca = CertificateAuthority.load_or_create(state / "ca", "webb.test")
    client = TunnelNode(IdentityStore(ca, tmp_path / "client"), tmp_path / "client-keylog", False)
    sess = client.dial(("127.0.0.1", t.server.port), ("default", "tiefighter"), ("default", "deathstar"), "10.0.0.9",
                       f"127.0.0.1:{workload.getsockname()[1]}")
    sess.send(b"x" * 1000)
    sess.close_write()
    reply = b""
    while chunk := sess.recv():
        reply += chunk
    sess.close()
    assert reply == b"echo:" + b"x" * 1000
    with socket.create_connection(("127.0.0.1", t.server.port), timeout=5) as junk:
        junk.sendall(b"\x16\x03\x01\x00\x05hello")  # a TLS record, but no ClientHello: the handshake fails
        junk.recv(100)  # waits for the alert, or the end
    deadline = time.monotonic() + 10
    while sum(t.server.counts.values()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    served.join(timeout=5)
    got = samples(scrape(agent))
    assert value(got, "webb_tunnel_handshakes_total", side="server", result="ok") == 1
    assert value(got, "webb_tunnel_handshakes_total", side="server", result="failed") == 1
    assert client.handshakes == {("client", "ok"): 1}
    assert value(got, "webb_tunnel_connections_total", direction="inbound", result="forwarded") == 1
    assert value(got, "webb_tunnel_connections_total", direction="inbound", result="failed") == 1
    assert value(got, "webb_tunnel_received_bytes_total", direction="inbound") == 1000
    assert value(got, "webb_tunnel_sent_bytes_total", direction="inbound") == 1005
    assert value(got, "webb_tunnel_connections_total", direction="outbound", result="forwarded") == 0
    left = value(got, "webb_certificate_expiry_seconds", spiffe_id="spiffe://webb.test/ns/default/sa/deathstar")
    assert 23 * 3600 < left <= 24 * 3600  # the default 24 h
    assert value(got, "webb_ca_certificate_expiry_seconds") > left
    assert value(got, "webb_certificate_renewals_total") == 0


# ---- the docs and the dashboard name what the code serves ----
def _base(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total"):
        name = name.removesuffix(suffix)
    return name


def _served() -> set[str]:
    src = "".join((ROOT / f).read_text() for f in ("mesh/agent/metrics.py", "mesh/operator/metrics.py"))
    return {_base(n) for n in re.findall(r"\bwebb_[a-z_]+[a-z]\b", src)}


def test_docs_list_every_metric_and_no_other() -> None:
    doc = (ROOT / "docs/metrics.md").read_text()
    listed = {_base(n) for n in re.findall(r"^\| `(webb_[a-z_]+)` \|", doc, re.MULTILINE)}
    assert listed == _served(), (listed ^ _served())


def test_dashboard_uses_only_served_metrics() -> None:
    dash = json.loads((ROOT / "deploy/grafana/webb.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {_base(n) for e in exprs for n in re.findall(r"\bwebb_[a-z_]+\b", e)}
    assert len(exprs) > 20 and used <= _served(), used - _served()
    # every section of the docs has a panel: decisions, flows, RED, xDS, tunnels, certificates, operator
    for name in ("webb_datapath_decisions", "webb_flows", "webb_envoy_http_requests", "webb_envoy_http_request_duration_seconds",
                 "webb_xds_pushes", "webb_sync_duration_seconds", "webb_tunnel_handshakes", "webb_certificate_expiry_seconds",
                 "webb_operator_status_writes"):
        assert name in used, name
