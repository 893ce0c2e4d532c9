"""deploy/ against the real API server: every manifest passes server-side dry run, and the
RBAC grants exactly what the operator and the agent do (checked with kubectl auth can-i)."""

from __future__ import annotations

import pytest
import yaml

from mesh.kube.translate import RESOURCES
from tests.kube.apiserver import KubeAPI
from tests.operator.conftest import ROOT

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("webb_crds")]
DEPLOY = ROOT / "deploy"


def test_every_manifest_passes_server_dry_run(kube_api: KubeAPI) -> None:
    files = sorted(DEPLOY.glob("*.yaml"))
    kinds = {d["kind"] for f in files for d in yaml.safe_load_all(f.read_text()) if d}
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "DaemonSet"} <= kinds
    for f in files:
        out = kube_api.kubectl("apply", "--dry-run=server", "-f", str(f)).stdout
        assert "(server dry run)" in out, out


def test_agent_daemonset_is_privileged_on_the_host(kube_api: KubeAPI) -> None:
    out = kube_api.kubectl("apply", "--dry-run=server", "-o", "yaml", "-f", str(DEPLOY / "30-agent.yaml")).stdout
    spec = yaml.safe_load(out)["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["containers"][0]["securityContext"]["privileged"] is True
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {"/sys/fs/bpf", "/sys/fs/cgroup"} <= mounts


def _can(api: KubeAPI, who: str, verb: str, resource: str, ns: str = "default") -> bool:
    resource, _, sub = resource.partition("/")
    res = api.kubectl("auth", "can-i", verb, resource, "-n", ns, f"--as=system:serviceaccount:webb-system:{who}",
                      *([f"--subresource={sub}"] if sub else []), check=False)
    return res.stdout.strip() == "yes"


def test_rbac_grants_what_the_code_does(kube_api: KubeAPI) -> None:
    kube_api.kubectl("apply", "-f", str(DEPLOY / "00-namespace.yaml"), "-f", str(DEPLOY / "10-rbac.yaml"))
    roles = [d for d in yaml.safe_load_all((DEPLOY / "10-rbac.yaml").read_text()) if d and d["kind"] == "ClusterRole"]
    for r in RESOURCES.values():  # both watch every kind the indexer reads
        name = f"{r.plural}.{r.group}" if r.group else r.plural
        if r.optional:  # a CRD not installed here (Gateway API): can-i does not know it; the roles must name it
            for role in roles:
                assert any(r.group in rule["apiGroups"] and r.plural in rule["resources"] and "watch" in rule["verbs"]
                           for rule in role["rules"]), (role["metadata"]["name"], name)
            continue
        for who in ("webb-operator", "webb-agent"):
            assert _can(kube_api, who, "watch", name), (who, name)
            assert _can(kube_api, who, "list", name), (who, name)
    assert _can(kube_api, "webb-operator", "patch", "meshpolicies.webb.io/status")
    assert _can(kube_api, "webb-operator", "patch", "meshroutes.webb.io/status")
    assert _can(kube_api, "webb-operator", "patch", "meshtlses.webb.io/status")
    (operator,) = [r for r in roles if r["metadata"]["name"] == "webb-operator"]
    assert any(rule["apiGroups"] == ["gateway.networking.k8s.io"] and "patch" in rule["verbs"]
               and {"gatewayclasses/status", "gateways/status", "httproutes/status"} <= set(rule["resources"])
               for rule in operator["rules"])
    assert _can(kube_api, "webb-operator", "watch", "configmaps", "webb-system")
    assert _can(kube_api, "webb-agent", "patch", "configmaps", "webb-system")
    assert _can(kube_api, "webb-agent", "patch", "pods/status")
    # and no more than that
    assert not _can(kube_api, "webb-agent", "patch", "meshpolicies.webb.io/status")
    assert not _can(kube_api, "webb-agent", "patch", "configmaps", "default")
    assert not _can(kube_api, "webb-operator", "delete", "pods")
    assert not _can(kube_api, "webb-operator", "patch", "meshpolicies.webb.io")


def test_dockerfile_builds_from_python_slim_and_copies_what_exists() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("FROM")] == ["python:3.11-slim", "python:3.11-slim"]
    for ln in lines:
        if ln.startswith("COPY") and "--from" not in ln:
            assert (ROOT / ln.split()[1]).exists(), ln
