"""The operator's /metrics (mesh/operator/metrics.py) on a real API server: status writes, the
object it refuses, the Warning Event, node reports, scraped over HTTP."""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mesh.kube.watch import REPORT_LABEL, SYSTEM_NAMESPACE, report_name
from tests.kube.apiserver import KubeAPI, Process
from tests.kube.meshpolicy import example_policy

pytestmark = pytest.mark.kube
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def metered(kube_api: KubeAPI, webb_crds: None, tmp_path: Path) -> Iterator[tuple[Process, int]]:
    """The operator with its metrics on a free port (not 9963: another may hold it); stops by itself after 300 s."""
    port = free_port()
    proc = Process("operator", [sys.executable, "-m", "mesh.operator", "--kubeconfig", str(kube_api.kubeconfig),
                                "--lifetime", "300", "--metrics-address", f"127.0.0.1:{port}"], tmp_path / "operator.log")
    try:
        yield proc, port
        proc.check_alive()
    finally:
        proc.stop()


def report_of(api: KubeAPI, node: str, report: dict[str, object]) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": report_name(node), "namespace": SYSTEM_NAMESPACE, "labels": {REPORT_LABEL: node}},
          "data": {"report": json.dumps(report)}}
    api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(cm))


def scrape(port: int) -> Samples:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # noqa: S310 - loopback
            text = r.read().decode()
    except OSError:
        return {}  # not listening yet
    families = list(text_string_to_metric_families(text))
    assert all(f.name.startswith("webb_operator_") and f.documentation for f in families)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def get(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_metric(port: int, proc: Process, what: str, ok: Callable[[Samples], bool], timeout_s: float = 30) -> Samples:
    deadline = time.monotonic() + timeout_s
    while True:
        proc.check_alive()
        got = scrape(port)
        if got and ok(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s; last: {got}\n{proc.log_tail(30)}")
        time.sleep(0.2)


def test_operator_metrics_count_status_writes_refusals_and_reports(kube_api: KubeAPI, namespace: str,
                                                                    metered: tuple[Process, int]) -> None:
    proc, port = metered
    kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(example_policy(namespace)))
    got = wait_metric(port, proc, "a MeshPolicy status written",
                      lambda g: get(g, "webb_operator_status_writes_total", kind="MeshPolicy", result="ok") >= 1)
    assert get(got, "webb_operator_watch_events_total", kind="MeshPolicy") >= 1
    refused_before = get(got, "webb_operator_invalid_objects", kind="MeshPolicy")

    bad = example_policy(namespace)
    bad["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0]["path"] = "/v1/(unclosed"  # not a regex
    kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(bad))
    got = wait_metric(port, proc, "the invalid MeshPolicy counted, its Warning Event posted",
                      lambda g: get(g, "webb_operator_invalid_objects", kind="MeshPolicy") == refused_before + 1
                      and get(g, "webb_operator_events_posted_total", result="ok") >= 1)

    node = f"n-{namespace}"
    report_of(kube_api, node, {"node": node, "planVersion": "p1", "datapathVersion": "p1", "envoyVersion": "e1",
                               "generations": {}, "envoyRejected": {}})
    try:
        got = wait_metric(port, proc, "the node report seen",
                          lambda g: get(g, "webb_operator_node_reports_total", result="report") >= 1
                          and get(g, "webb_operator_nodes_reporting") >= 1)
    finally:
        kube_api.kubectl("delete", "configmap", report_name(node), "-n", SYSTEM_NAMESPACE)
    wait_metric(port, proc, "the report's deletion seen", lambda g: get(g, "webb_operator_node_reports_total", result="deleted") >= 1)
    assert get(got, "webb_operator_status_writes_total", kind="MeshPolicy", result="failed") == 0
