"""Webb installed as a user would install it: its own image (``tools/image/build.py``: Debian bookworm by
mmdebstrap, Webb pip-installed into it, imported into the node's containerd, no registry), the Helm chart
(``charts/webb``, with helm v4.3.2 built from its Go module), then Star Wars enforced by the DaemonSet's
agent, and ``helm uninstall`` leaving nothing of Webb on the host.

One agent at a time: ``test_mesh.py``'s module fixture runs ``webb agent`` as a host process on the same
node. pytest runs the modules of a directory one after another, in name order (this one first), and
finishes a module's fixtures before the next module starts, so the two agents never overlap; the last
test here uninstalls, and the fixture puts the node back as it found it (namespace, CRDs, image).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from datapath.cgroup2 import cgroup2_mount
from datapath.loader import cleanup
from tests.cluster.node import KubeNode
from tests.cluster.rollout import deploy_echo, rollout_under_load
from tests.cluster.starwars import ROOT, apply_rule1, deploy, landing, request, url, wait_landing
from tests.cluster.test_node import container_id, eventually
from tools.cluster.images import import_archives
from tools.image import build as image

pytestmark = [pytest.mark.kube, pytest.mark.root]

CHART = ROOT / "charts" / "webb"
HELM_BUILD = ROOT / "tools" / "image" / "build-helm.sh"
NS = "webb-system"  # Webb's own namespace (mesh.model.SYSTEM_NAMESPACE): the chart refuses any other
RELEASE = "webb"
CAPABILITIES = ["BPF", "NET_ADMIN", "NET_BIND_SERVICE"]  # charts/webb/values.yaml: agent.capabilities
INSTALL_TIMEOUT_S = 300
UNINSTALL_TIMEOUT_S = 120
GONE_S = 60.0
SERVICE_CIDR6 = "fd00:10:96::/112"  # the agent's IPv6 service range (its default), blackholed by it too
IMAGE_MARK = "/opt/webb/"  # every process of Webb's image runs from its venv (the agent, Envoy, probes)


@dataclass
class Install:
    helm: Path
    home: Path
    kubeconfig: Path
    image: image.Result
    pods_cgroup: Path
    pin_dir: Path
    before: dict[str, list[str]]
    timings: dict[str, float] = field(default_factory=dict)
    containers: dict[str, str] = field(default_factory=dict)  # pod name -> containerd container id
    uninstalled: bool = False

    def helm_run(self, *args: str, timeout_s: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """helm against the node's API server; its cache, config and data in a directory of the test's own."""
        env = {**os.environ, "HELM_CACHE_HOME": str(self.home / "cache"), "HELM_CONFIG_HOME": str(self.home / "config"),
               "HELM_DATA_HOME": str(self.home / "data")}
        res = subprocess.run([str(self.helm), "--kubeconfig", str(self.kubeconfig), *args], capture_output=True, text=True,
                             timeout=timeout_s, env=env)
        if check and res.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args[:2])}: exit {res.returncode}: {res.stderr.strip()[-3000:]}")
        return res


def build_helm() -> Path:
    """helm v4.3.2 (tools/image/build-helm.sh: built once from helm.sh/helm/v4, cached in /var/cache/webb/helm)."""
    out = subprocess.run(["bash", str(HELM_BUILD)], check=True, capture_output=True, text=True, timeout=3600)
    return Path(out.stdout.split()[-1])


def _lines(*argv: str) -> list[str]:
    return [ln.strip() for ln in subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.splitlines() if ln.strip()]


def host_state(pods_cgroup: Path) -> dict[str, list[str]]:
    """What of Webb the host can hold: pins, programs on kubelet's pods cgroup, blackhole routes, processes of its image."""
    bpffs = Path("/sys/fs/bpf/webb")
    pins = sorted(str(p) for p in bpffs.rglob("*")) if bpffs.exists() else []
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(pods_cgroup)], capture_output=True, text=True, timeout=30)
    programs = sorted(f"{p.get('attach_type')} {p.get('name')}" for p in json.loads(out.stdout.strip() or "[]"))
    procs = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if IMAGE_MARK in cmd:
            procs.append(f"{pid} {cmd.strip()}")
    routes = _lines("ip", "-4", "route", "show", "type", "blackhole") + _lines("ip", "-6", "route", "show", "type", "blackhole")
    return {"pins": pins, "cgroup programs": programs, "blackhole routes": sorted(routes), "processes": procs}


def diagnose(node: KubeNode) -> str:
    """The pods of webb-system, their events and the last lines of their logs (for a failure message)."""
    out = []
    for args in (("get", "pods", "-o", "wide"), ("describe", "pods"), ("logs", "ds/webb-agent", "--all-containers", "--tail=40"),
                 ("logs", "deploy/webb-operator", "--tail=20")):
        r = node.kubectl("-n", NS, *args, check=False)
        out.append(f"--- kubectl {' '.join(args)}\n{(r.stdout + r.stderr).strip()[-4000:]}")
    return "\n".join(out)


def _crds(node: KubeNode) -> set[str]:
    names = node.kubectl("get", "crd", "-o", "name").stdout.split()
    return {n.split("/", 1)[1] for n in names if n.endswith(".webb.io")}


def _set_values(node: KubeNode, ref: str) -> list[str]:
    repo, tag = ref.rsplit(":", 1)
    values = {
        "image.repository": repo, "image.tag": tag, "image.pullPolicy": "Never",  # imported, never pulled
        "serviceCIDR": node.service_cidr,
        "kubelet.cgroupRoot": f"/{node.config.cgroup_root}", "kubelet.cgroupDriver": "cgroupfs",
        "cgroup.hostRoot": str(cgroup2_mount()),  # /sys/fs/cgroup/unified on this hybrid host
        # no kube-proxy here: the API server at its address until the agent serves the kubernetes ClusterIP
        "apiServer.host": node.node_ip, "apiServer.port": str(node.api_port),
        "agent.envoy.adminPort": "0",  # any free port on the host's 127.0.0.1
    }
    return [a for k, v in values.items() for a in ("--set-string", f"{k}={v}")]


@pytest.fixture(scope="module")
def installed(kube_node: KubeNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    """``helm install`` of charts/webb with Webb's image, Ready; uninstalled at the end if a test did not, and
    the node put back as found (namespace, CRDs, image)."""
    with helm_installed(kube_node, tmp_path_factory.mktemp("helm")) as inst:
        yield inst


@contextlib.contextmanager
def helm_installed(kube_node: KubeNode, home: Path) -> Iterator[Install]:
    """The chart installed with Webb's image (built or cached, imported into the node), Ready; on exit
    uninstalled (unless done already) and the node put back as found (namespace, CRDs, image, routes).
    ``home``: helm's cache, config and data. Also used by `make kube-demo` (tests/cluster/demo.py)."""
    t0 = time.monotonic()
    helm = build_helm()
    t_helm = time.monotonic() - t0
    built = image.build()
    t_image = time.monotonic() - t0 - t_helm
    import_archives(kube_node.containerd_socket, [built.archive], timeout_s=600)
    pods_cgroup = kube_node.cgroup_root / "kubepods"
    inst = Install(helm, home, kube_node.kubeconfig, built, pods_cgroup,
                   Path("/sys/fs/bpf/webb") / kube_node.name, host_state(pods_cgroup))
    inst.timings = {"helm (build or cache)": round(t_helm, 1), "image (build or cache)": round(t_image, 1),
                    "image import": round(time.monotonic() - t0 - t_helm - t_image, 1)}
    crds_before = _crds(kube_node)
    ns_before = kube_node.kubectl("get", "namespace", NS, check=False).returncode == 0
    try:
        t1 = time.monotonic()
        res = inst.helm_run("install", RELEASE, str(CHART), "--namespace", NS, "--create-namespace", "--wait",
                            "--timeout", f"{INSTALL_TIMEOUT_S}s", *_set_values(kube_node, built.ref),
                            timeout_s=INSTALL_TIMEOUT_S + 60, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"helm install: exit {res.returncode}: {res.stderr.strip()[-2000:]}\n{diagnose(kube_node)}")
        for what in ("daemonset/webb-agent", "deployment/webb-operator"):
            kube_node.kubectl("-n", NS, "rollout", "status", what, "--timeout=60s", timeout_s=70)
        inst.timings["helm install to Ready"] = round(time.monotonic() - t1, 1)
        yield inst
    finally:
        if not inst.uninstalled:
            inst.helm_run("uninstall", RELEASE, "--namespace", NS, "--wait", "--timeout", f"{UNINSTALL_TIMEOUT_S}s",
                          timeout_s=UNINSTALL_TIMEOUT_S + 30, check=False)
        if not ns_before:
            kube_node.kubectl("delete", "namespace", NS, "--ignore-not-found", "--timeout=60s", check=False, timeout_s=70)
        deadline = time.monotonic() + GONE_S
        while inst.pin_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if inst.pin_dir.exists():  # the agent did not stop cleanly (killed): what `webb datapath cleanup` does
            cleanup(inst.pin_dir, str(pods_cgroup))
        for crd in sorted(_crds(kube_node) - crds_before):  # Helm never deletes what crds/ installed
            kube_node.kubectl("delete", "crd", crd, "--timeout=60s", check=False, timeout_s=70)
        for tag in built.tags:
            with contextlib.suppress(subprocess.SubprocessError):
                kube_node.ctr("images", "rm", tag)
        for route in set(host_state(pods_cgroup)["blackhole routes"]) - set(inst.before["blackhole routes"]):
            if route.split()[1] in (kube_node.service_cidr, SERVICE_CIDR6):  # the agent's own: it never removes them
                subprocess.run(["ip", "route", "del", *route.split()[:2]], capture_output=True, timeout=30)
        print(f"\ninstall timings (s): {json.dumps(inst.timings)}", file=sys.stderr)


def _pods(node: KubeNode) -> dict[str, dict[str, Any]]:
    items = node.get("-n", NS, "pods")["items"]
    return {p["metadata"]["labels"]["app.kubernetes.io/name"]: p for p in items}


def _agent_file(node: KubeNode, path: str) -> str:
    return node.kubectl("-n", NS, "exec", "ds/webb-agent", "-c", "agent", "--", "cat", path).stdout


def test_the_chart_installs_only_into_webb_system(tmp_path: Path) -> None:
    """Webb's namespace is fixed in its code (node reports, the node proxy's identity): the chart says so."""
    res = subprocess.run([str(build_helm()), "template", RELEASE, str(CHART), "--namespace", "default"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "HELM_CACHE_HOME": str(tmp_path), "HELM_CONFIG_HOME": str(tmp_path),
                                                     "HELM_DATA_HOME": str(tmp_path)})
    assert res.returncode != 0 and "install Webb into the namespace webb-system" in res.stderr, res.stderr


def _agent_flows(node: KubeNode) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _agent_file(node, "/run/webb/flows.jsonl").splitlines() if line.strip()]


def test_installed_from_the_chart_with_webbs_own_image(kube_node: KubeNode, installed: Install) -> None:
    pods = _pods(kube_node)
    assert set(pods) == {"webb-agent", "webb-operator"}, diagnose(kube_node)
    out = kube_node.kubectl("get", "pods", "-n", NS, "-o", "wide").stdout
    for name, p in pods.items():
        assert p["status"]["phase"] == "Running", out
        assert p["spec"]["containers"][0]["image"] == installed.image.ref
        installed.containers[name] = container_id(p)  # containerd://: kubelet's containers
        assert p["spec"]["nodeName"] == kube_node.name
    # the image came from the archive, imported under both tags
    listed = kube_node.ctr("images", "ls", "-q").split()
    assert set(installed.image.tags) <= set(listed)

    agent = pods["webb-agent"]
    spec, ctx = agent["spec"], agent["spec"]["containers"][0]["securityContext"]
    assert spec["hostNetwork"] is True and not spec.get("hostPID")
    assert ctx.get("privileged") is False and ctx["capabilities"] == {"drop": ["ALL"], "add": CAPABILITIES}
    # the agent is this pod's process: its host PID is in the pod's cgroup, under kubelet's pods cgroup
    pid = kube_node.task_pids()[installed.containers["webb-agent"]]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"/opt/webb/bin/webb" in cmdline and b"agent" in cmdline, cmdline
    cgroup = [ln for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if ln.startswith("0::")][0]
    assert cgroup.startswith(f"0::/{kube_node.config.cgroup_root}/kubepods/") and f"/pod{agent['metadata']['uid']}/" in cgroup

    # its datapath: pinned in the host's bpffs, attached to kubelet's pods cgroup
    state = host_state(installed.pods_cgroup)
    assert any(p.startswith(f"{installed.pin_dir}/") for p in state["pins"]), state["pins"]
    assert "cgroup_inet4_connect webb_sock4_connect" in state["cgroup programs"], state["cgroup programs"]

    # status: running with a plan applied; one CA for the cluster, the Secret's, key 0600 in the pod
    st = json.loads(_agent_file(kube_node, "/run/webb/status.json"))
    assert st["running"] and st["applied"]["plan_version"] and st["node"] == kube_node.name
    secret = kube_node.get("-n", NS, "secret", "webb-ca")
    assert _agent_file(kube_node, "/run/webb-ca/ca.crt").encode() == base64.b64decode(secret["data"]["ca.crt"])
    mode = kube_node.kubectl("-n", NS, "exec", "ds/webb-agent", "-c", "agent", "--", "stat", "-c", "%a", "/run/webb-ca/ca.key")
    assert mode.stdout.strip() == "600"
    # the IngressClass
    assert kube_node.get("ingressclass", "webb")["spec"]["controller"] == "webb.io/ingress"
    # Prometheus metrics (docs/metrics.md): the agent on the node's address (host network), the operator on its
    # pod's (the chart's defaults); both scraped from this host, as Prometheus would from its pod
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for url_, metric in ((f"http://{agent['status']['hostIP']}:9962/metrics", "webb_xds_pushes_total{"),
                         (f"http://{pods['webb-operator']['status']['podIP']}:9963/metrics", "webb_operator_watch_events_total{")):
        eventually(f"{metric} at {url_}", lambda u=url_, m=metric: m in _scrape(no_proxy, u), 30)


def _scrape(opener: urllib.request.OpenerDirector, url: str) -> str:
    try:
        with opener.open(url, timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return ""


@pytest.fixture(scope="module")
def starwars(kube_node: KubeNode, installed: Install) -> Iterator[str]:
    """Star Wars in a namespace of its own, served by the DaemonSet's agent: landing checked without a policy,
    then rule1 applied and in force (the xwing refused at connect). Yields the namespace."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    kube_node.kubectl("create", "namespace", ns)
    try:
        pods = deploy(kube_node, ns)

        def known() -> bool:
            st = json.loads(_agent_file(kube_node, "/run/webb/status.json"))
            return all(p["metadata"]["uid"] in ((st["pods"].get(f"{ns}/{n}") or {}).get("cgroup") or "") for n, p in pods.items())
        eventually("the DaemonSet's agent knows the pods' cgroups", known, 30)

        assert wait_landing(kube_node, ns).startswith("200")
        assert landing(kube_node, ns, "xwing") == "200 Ship landed"
        apply_rule1(kube_node, ns)
        yield ns
    finally:
        kube_node.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_star_wars_enforced_by_the_daemonset_agent(kube_node: KubeNode, installed: Install, starwars: str) -> None:
    ns = starwars
    assert "PermissionError" in request(kube_node, ns, "xwing", "POST", url(ns, "/v1/request-landing"))  # cgroup/connect4
    assert request(kube_node, ns, "tiefighter", "PUT", url(ns, "/v1/exhaust-port")) == "403 Access denied"  # Envoy's RBAC

    def denied() -> list[dict[str, Any]]:
        return [f for f in _agent_flows(kube_node) if f.get("verdict") == "denied"]
    eventually("the L7 denial in the agent pod's flows", lambda: any(
        f["layer"] == "L7" and f.get("path") == "/v1/exhaust-port" and f.get("src") == f"{ns}/tiefighter" for f in denied()), 10)
    assert any(f["layer"] == "L4" and f["src"] == f"{ns}/xwing" and f"{ns}/rule1" in f.get("policy", "") for f in denied())

    # the operator (the Deployment, in-cluster) judged the policy and saw the node apply it
    def conditions() -> dict[str, str]:
        mp = kube_node.get("-n", ns, "meshpolicy", "rule1")
        return {c["type"]: c["status"] for c in (mp.get("status") or {}).get("conditions", [])}
    eventually("rule1 Valid and Applied (the operator)", lambda: conditions() == {"Ready": "True", "Valid": "True", "Applied": "True"}, 60)


def test_an_allowed_request_passes_the_node_envoy(kube_node: KubeNode, installed: Install, starwars: str) -> None:
    """The node Envoy runs in the agent pod, under kubelet's kubepods where the programs attach: the
    agent marks its own cgroup as the node proxy's (EP_PROXY), so Envoy's upstream connections pass as
    the host's would, and the L7 policy decides (tiefighter may land)."""
    assert request(kube_node, starwars, "tiefighter", "POST", url(starwars, "/v1/request-landing")) == "200 Ship landed"


def test_rollout_restart_of_the_agent_drops_no_connection(kube_node: KubeNode, installed: Install, starwars: str) -> None:
    """``kubectl rollout restart`` of the agent DaemonSet under load: the old agent leaves the pinned datapath
    in place (its DaemonSet stays), the new one adopts it. No L4 connection is dropped, held or new; the
    L7 requests pause while Envoy (the agent pod's) restarts: measured and printed, and they come back."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    kube_node.kubectl("create", "namespace", ns)
    try:
        deploy_echo(kube_node, ns)
        res = rollout_under_load(kube_node, ns, (starwars, "tiefighter", url(starwars, "/v1/request-landing")))
    finally:
        kube_node.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    print(f"\nrollout restart under load: {json.dumps(res)}", file=sys.stderr)
    installed.timings["rollout restart"] = res["rollout_s"]
    assert res["agent_replaced"], res
    assert res["held"]["ok"] > 0 and res["held"]["failed"] == 0, res["held"]
    assert res["new"]["ok"] > 0 and res["new"]["failed"] == 0, res["new"]
    assert res["l7"]["ok"] > 0, res["l7"]
    logs = kube_node.kubectl("-n", NS, "logs", "ds/webb-agent", "-c", "agent").stdout
    assert "datapath adopted from pins" in logs, logs[-2000:]
    assert "PermissionError" in landing(kube_node, starwars, "xwing")  # rule1 in force all along, and after


def test_helm_upgrade_keeps_the_mesh_ca(kube_node: KubeNode, installed: Install) -> None:
    """The CA is made at install time and looked up at upgrade: workload identities stay valid."""
    before = kube_node.get("-n", NS, "secret", "webb-ca")["data"]
    installed.helm_run("upgrade", RELEASE, str(CHART), "--namespace", NS, "--reuse-values", "--wait", "--timeout", "120s",
                       timeout_s=150)
    assert kube_node.get("-n", NS, "secret", "webb-ca")["data"] == before
    assert json.loads(_agent_file(kube_node, "/run/webb/status.json"))["running"]


def test_helm_uninstall_leaves_nothing_of_webb_on_the_host(kube_node: KubeNode, installed: Install) -> None:
    assert installed.containers, "the first test records the pods' containers"
    t0 = time.monotonic()
    installed.helm_run("uninstall", RELEASE, "--namespace", NS, "--wait", "--timeout", f"{UNINSTALL_TIMEOUT_S}s",
                       timeout_s=UNINSTALL_TIMEOUT_S + 30)
    installed.uninstalled = True

    def gone() -> bool:
        pods = kube_node.kubectl("get", "pods", "-n", NS, "-o", "name").stdout.split()
        tasks = kube_node.task_pids()
        return not pods and not set(installed.containers.values()) & set(tasks) and not installed.pin_dir.exists()
    eventually("the agent's pod stopped and its pins removed (a clean stop)", gone, GONE_S)
    installed.timings["helm uninstall to nothing left"] = round(time.monotonic() - t0, 1)
    after = host_state(installed.pods_cgroup)
    left = {k: sorted(set(v) - set(installed.before[k])) for k, v in after.items() if set(v) - set(installed.before[k])}
    # the DaemonSet went first: the agent saw it was leaving the node (not restarting) and removed its
    # programs, pins and the blackhole routes it added (RTPROT_WEBB), the ones adopted from a predecessor too
    assert not left, f"left on the host after helm uninstall: {left}"
    for kind in ("daemonset", "deployment", "clusterrole", "clusterrolebinding", "ingressclass"):
        names = kube_node.kubectl("get", kind, "-A", "-o", "name").stdout.split()
        assert not [n for n in names if "webb" in n], names
