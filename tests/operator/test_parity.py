"""Standalone parity: the Star Wars manifests give the same NodePlan (same version) read from
YAML files (StandaloneSource) and read from the real API server through the agent's watch
(KubeSource, the indexer the operator shares)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.kube.watch import RESOURCES, KubeSource, api_path, request
from mesh.model import ClusterState
from mesh.plan.node import NodeSpec, plan_node
from mesh.source import StandaloneSource, allocate_vips
from tests.kube.apiserver import SERVICE_CLUSTER_IP_RANGE, KubeAPI
from tests.operator.conftest import ROOT

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("webb_crds")]
NODE = NodeSpec("k1", "10.244.210.1")


def _manifests(tmp: Path, ns: str) -> dict[str, str]:
    """The example in the test's namespace, each Service with the VIP the standalone source
    gives it (in a cluster the API server allocates VIPs: the one field the modes do not share)."""
    out: dict[str, str] = {}
    for name in ("01-app.yaml", "policy.yaml"):
        docs = [d for d in yaml.safe_load_all((ROOT / "examples/starwars" / name).read_text()) if d]
        for d in docs:
            d["metadata"]["namespace"] = ns
        out[name] = yaml.safe_dump_all(docs)
    probe = tmp / "probe"
    probe.mkdir()
    (probe / "01-app.yaml").write_text(out["01-app.yaml"])
    services = allocate_vips(list(StandaloneSource(probe, SERVICE_CLUSTER_IP_RANGE).load().services), SERVICE_CLUSTER_IP_RANGE)
    vip = {s.name: s.cluster_ip for s in services}
    docs = list(yaml.safe_load_all(out["01-app.yaml"]))
    for d in docs:
        if d["kind"] == "Service":
            d["spec"]["clusterIP"] = vip[d["metadata"]["name"]]
    out["01-app.yaml"] = yaml.safe_dump_all(docs)
    return out


def _ips(state: ClusterState) -> dict[str, str]:
    return {p.key: f"10.244.210.{i + 2}" for i, p in enumerate(sorted(state.pods, key=lambda p: p.key))}


def _with_ips(state: ClusterState, ips: dict[str, str]) -> ClusterState:
    """What the agent does in standalone mode: the runtime's IP on every pod."""
    return replace(state, pods=tuple(replace(p, ip=ips[p.key]) for p in state.pods))


def _only(st: ClusterState, ns: str) -> ClusterState:
    """The test's namespace only: other suites share the API server."""
    return replace(st, namespaces=(), pods=tuple(p for p in st.pods if p.namespace == ns),
                   services=tuple(s for s in st.services if s.namespace == ns),
                   policies=tuple(p for p in st.policies if p.namespace == ns),
                   routes=tuple(r for r in st.routes if r.namespace == ns),
                   ingresses=tuple(i for i in st.ingresses if i.namespace == ns),
                   secrets=tuple(x for x in st.secrets if x.namespace == ns),
                   mtls=tuple(m for m in st.mtls if m.namespace == ns),
                   gateway_classes=(), gateways=tuple(g for g in st.gateways if g.namespace == ns),
                   grants=tuple(g for g in st.grants if g.namespace == ns),
                   errors=tuple(e for e in st.errors if f" {ns}/" in e))


def _wait(source: KubeSource, ok: Any, timeout_s: float = 20.0) -> ClusterState:
    deadline = time.monotonic() + timeout_s
    while True:
        source.version()
        st = source.load()
        if ok(st):
            return st
        assert time.monotonic() < deadline, f"API state not reached: {st}"
        time.sleep(0.05)


def test_same_plan_from_yaml_and_from_the_api_server(kube_api: KubeAPI, namespace: str, tmp_path: Path) -> None:
    files = _manifests(tmp_path, namespace)
    yaml_dir = tmp_path / "manifests"
    yaml_dir.mkdir()
    (yaml_dir / "01-app.yaml").write_text(files["01-app.yaml"])
    standalone = StandaloneSource(yaml_dir, SERVICE_CLUSTER_IP_RANGE)
    ips = _ips(standalone.load())

    source = KubeSource(kube_api.api)
    source.indexer.base_dir = yaml_dir  # relative pod commands resolve where the files are, as standalone
    source.start()
    try:
        kube_api.kubectl("apply", "-f", "-", stdin=files["01-app.yaml"])
        for key, ip in ips.items():  # kubelet's part: the pods' IPs
            ns, _, name = key.partition("/")
            request(kube_api.api, "PATCH", api_path(RESOURCES["Pod"], ns, name, "status"),
                    {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}}, content_type="application/merge-patch+json")
        mine = lambda st: [p for p in st.pods if p.namespace == namespace]  # noqa: E731
        kube = _wait(source, lambda st: len(mine(st)) == 4 and all(p.ip for p in mine(st)))
        kube = _only(kube, namespace)
        plan_yaml, plan_kube = plan_node(_with_ips(standalone.load(), ips), NODE), plan_node(kube, NODE)
        assert plan_kube == plan_yaml and plan_kube.version == plan_yaml.version
        assert len(plan_kube.services) == 1 and len(plan_kube.endpoints) == 4

        (yaml_dir / "policy.yaml").write_text(files["policy.yaml"])
        kube_api.kubectl("apply", "-f", "-", stdin=files["policy.yaml"])
        kube = _wait(source, lambda st: any(p.namespace == namespace for p in st.policies))
        kube = _only(kube, namespace)
        with_policy = plan_node(_with_ips(standalone.load(), ips), NODE)
        assert with_policy.version != plan_yaml.version and with_policy.http  # the policy made an L7 listener
        assert plan_node(kube, NODE).version == with_policy.version
    finally:
        source.stop()
        # no controller deletes a namespace's pods: delete them, so that no agent of a later test runs them
        kube_api.kubectl("delete", "-f", "-", "--wait=false", stdin=files["01-app.yaml"], check=False)
