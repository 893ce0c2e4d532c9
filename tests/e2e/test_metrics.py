"""The agent's /metrics while the Star Wars demo runs (real agent, kernel, Envoy, curl in the
pods), scraped over HTTP as Prometheus would: the denied and the forwarded requests are counted
by verdict and reason, Envoy's ACKs, per-service request stats and the certificates' expiry."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.cli.common import wait_converged
from mesh.cli.demo import _apply, _wait_reachable, request
from mesh.runtime.local import NodeConfig
from mesh.status import AgentStatus
from tests.conftest import ROOT

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]
EXAMPLE = ROOT / "examples/starwars"
SERVICE = "default/deathstar:80"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # noqa: S310 - loopback
        text = r.read().decode()
    return text, {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for f in text_string_to_metric_families(text) for s in f.samples}


def get(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_scrape(port: int, ok: Callable[[Samples], bool], what: str, timeout_s: float = 20) -> Samples:
    """Scrape until ``ok``: the agent reads Envoy's access log in its loop, and Envoy flushes its
    histograms every 5 s."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, got = scrape(port)
        if ok(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s; webb_ samples: "
                                 f"{ {k: v for k, v in got.items() if 'flows' in k[0] or 'envoy_http' in k[0]} }")
        time.sleep(0.25)


def test_agent_metrics_count_the_demo_denials_and_forwards(tmp_path: Path) -> None:
    state = tmp_path / "state"
    manifests = state / "manifests"
    manifests.mkdir(parents=True)
    port = free_port()  # not 9962: another agent on this machine may hold it
    node = NodeConfig(state_dir=state)
    agent = subprocess.Popen(
        ["setpriv", "--pdeathsig", "SIGTERM", "--", sys.executable, "-m", "mesh.cli", "agent", "--state-dir", str(state),
         "--lifetime", "240", "--metrics-address", f"127.0.0.1:{port}"],
        cwd=ROOT, stdout=open(state / "agent.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115 - the child's
    try:
        deadline = time.monotonic() + 60
        while (st := AgentStatus.read(state)) is None or st.pid != agent.pid or not st.running:
            assert agent.poll() is None and time.monotonic() < deadline, (state / "agent.log").read_text()[-3000:]
            time.sleep(0.1)
        _apply(state, EXAMPLE / "01-app.yaml")
        _wait_reachable(node, 20)
        _apply(state, EXAMPLE / "policy.yaml")
        wait_converged(state, manifests, 30)
        _, before = scrape(port)

        landed = request(node, "tiefighter", "POST", "/v1/request-landing")  # forwarded (L7 rule allows it)
        exhaust = request(node, "tiefighter", "PUT", "/v1/exhaust-port")  # denied by Envoy (403)
        xwing = request(node, "xwing", "POST", "/v1/request-landing")  # denied at connect() by the kernel
        assert (landed.status, exhaust.status, xwing.exit_code) == (200, 403, 7), (landed, exhaust, xwing)

        def grew(got: Samples, name: str, **labels: str) -> float:
            return get(got, name, **labels) - get(before, name, **labels)

        got = wait_scrape(port, lambda g: grew(g, "webb_flows_total", verdict="forwarded", layer="L7", reason="l7-forwarded") >= 1
                          and grew(g, "webb_flows_total", verdict="denied", layer="L7", reason="l7-policy-denied") >= 1
                          and get(g, "webb_envoy_http_request_duration_seconds_count", service=SERVICE) >= 2,
                          "the L7 flows and Envoy's request histogram")
        text, _ = scrape(port)
        # the flows, by verdict, layer and reason: exactly the three requests' (the kernel's L4 decision of each too)
        assert grew(got, "webb_flows_total", verdict="forwarded", layer="L7", reason="l7-forwarded") == 1
        assert grew(got, "webb_flows_total", verdict="denied", layer="L7", reason="l7-policy-denied") == 1
        assert grew(got, "webb_flows_total", verdict="denied", layer="L4", reason="policy-denied") >= 1  # curl may retry
        assert grew(got, "webb_flows_total", verdict="forwarded", layer="L4", reason="l7-proxy") == 2
        # the kernel's own per-reason counters
        assert grew(got, "webb_datapath_decisions_total", reason="policy-denied") >= 1
        assert grew(got, "webb_datapath_decisions_total", reason="l7-proxy") == 2
        # Envoy: every snapshot ACKed (the app, then the policy), with its latency; none refused
        assert get(got, "webb_xds_pushes_total", result="acked") >= 2
        assert get(got, "webb_xds_pushes_total", result="nacked") == 0
        assert get(got, "webb_xds_push_to_ack_seconds_count") == get(got, "webb_xds_pushes_total", result="acked")
        assert get(got, "webb_xds_responses_total", protocol="delta") > 0
        assert get(got, "webb_sync_duration_seconds_count") >= 2
        assert get(got, "webb_xds_nacked", type="Listener") == 0
        # Envoy's per-service stats, again under webb_ names (the admin listener's left out)
        assert get(got, "webb_envoy_stats_up") == 1
        assert grew(got, "webb_envoy_http_requests_total", service=SERVICE) == 2
        assert grew(got, "webb_envoy_http_responses_total", service=SERVICE, code_class="2xx") == 1
        assert grew(got, "webb_envoy_http_responses_total", service=SERVICE, code_class="4xx") == 1
        assert 'prefix="admin"' not in text and 'service="admin"' not in text
        # certificates: the demo has no MeshTLS (no tunnel carries its traffic), but the agent issues every
        # local workload its SPIFFE certificate all the same (ready for mTLS): each has its expiry
        expiry = {dict(labels)["spiffe_id"]: v for (n, labels), v in got.items() if n == "webb_certificate_expiry_seconds"}
        assert "spiffe://cluster.local/ns/default/sa/default" in expiry, expiry
        assert all(12 * 3600 < v <= 24 * 3600 for v in expiry.values()), expiry
        assert get(got, "webb_ca_certificate_expiry_seconds") > 24 * 3600
        # nothing left out, every family documented and named webb_
        assert all(v == 0 for (n, _), v in got.items() if n == "webb_scrape_errors_total"), got
        families = list(text_string_to_metric_families(text))
        assert all(f.name.startswith("webb_") and f.documentation for f in families)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(timeout=10)
    # the agent closed its metrics port as it stopped
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
