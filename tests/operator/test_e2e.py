"""Star Wars on the real API server: kubectl apply → operator + agent (--kube, local runtime on
node k1, bridge webbk0) → real BPF datapath and Envoy; the demo's three outcomes hold; a
malformed MeshPolicy is refused by the API server naming the field; deleting the policy
restores access; the CR status says which node applied it."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.cli.demo import Outcome, request
from mesh.runtime.local import NodeConfig
from tests.conftest import leftovers
from tests.kube.apiserver import KubeAPI, Process, free_port
from tests.kube.meshpolicy import malformed
from tests.operator.conftest import ROOT
from tests.operator.test_status import cond, cr_status_of

pytestmark = [pytest.mark.kube, pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]
APP, POLICY = ROOT / "examples/starwars/01-app.yaml", ROOT / "examples/starwars/policy.yaml"
LANDING = ("tiefighter", "POST", "/v1/request-landing")
EXHAUST = ("tiefighter", "PUT", "/v1/exhaust-port")
XWING = ("xwing", "POST", "/v1/request-landing")


def _until(what: str, get: Callable[[], Any], ok: Callable[[Any], bool], agent: Process, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        agent.check_alive()
        value = get()
        if ok(value):
            return value
        assert time.monotonic() < deadline, f"{what}: last {value!r}\n{agent.log_tail(40)}"
        time.sleep(0.2)


def test_starwars_through_the_api_server(kube_api: KubeAPI, operator: Process, tmp_path: Path) -> None:
    state = tmp_path / "state"
    node = NodeConfig(name="k1", bridge="webbk0", pod_cidr="10.244.210.0/24", state_dir=state)
    agent = Process("agent", [sys.executable, "-m", "mesh.cli", "agent", "--kube", str(kube_api.kubeconfig),
                              "--pod-workdir", str(APP.parent), "--node", "k1", "--bridge", "webbk0",
                              "--pod-cidr", "10.244.210.0/24", "--state-dir", str(state),
                              "--envoy-admin-port", str(free_port()), "--ingress-http-port", str(free_port()),
                              "--ingress-https-port", str(free_port()), "--lifetime", "240"], tmp_path / "agent.log")
    try:
        kube_api.kubectl("apply", "-f", str(APP))

        def outcome(case: tuple[str, str, str]) -> Outcome:
            try:
                return request(node, *case)
            except LookupError as e:  # the agent has not started that pod yet
                return Outcome(-1, 0, str(e))

        _until("landing without policy", lambda: outcome(LANDING).body.strip(), lambda b: b == "Ship landed", agent)
        # the agent starts the pods one by one: the xwing may come a plan later than the tiefighter
        _until("xwing lands without policy", lambda: outcome(XWING).body.strip(), lambda b: b == "Ship landed", agent)

        kube_api.kubectl("apply", "-f", str(POLICY))
        _until("xwing refused", lambda: outcome(XWING).exit_code, lambda c: c != 0, agent)
        assert outcome(LANDING).body.strip() == "Ship landed"
        denied = outcome(EXHAUST)
        assert (denied.status, denied.body.strip()) == (403, "Access denied")
        st = _until("status Applied", lambda: cr_status_of(kube_api, "default"),
                    lambda s: cond(s, "Applied").get("status") == "True", agent, 30)
        k1 = next(n for n in st["nodes"] if n["node"] == "k1")
        applied = json.loads((state / "status.json").read_text())["applied"]
        assert k1["envoy"] == "ACK" and k1["observedGeneration"] == 1
        assert (k1["datapathVersion"], k1["envoyVersion"]) == (applied["datapath_version"], applied["envoy_version"])

        res = kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(malformed("port-not-a-number", "default")), check=False)
        assert res.returncode != 0 and "spec.ingress[0].toPorts[0].ports[0].port" in res.stderr
        assert outcome(XWING).exit_code != 0  # the stored policy is still in force

        kube_api.kubectl("delete", "-f", str(POLICY))
        _until("xwing lands again", lambda: outcome(XWING).body.strip(), lambda b: b == "Ship landed", agent)
    finally:
        kube_api.kubectl("delete", "-f", str(POLICY), "--ignore-not-found", check=False)
        kube_api.kubectl("delete", "-f", str(APP), "--wait=false", check=False)
        agent.stop()
        print(agent.log_tail(30))
    assert not leftovers("webb-k1-"), "netns left behind"
