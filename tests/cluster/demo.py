"""`make kube-demo`: the Star Wars demo on a real node, Webb installed as a user would.

A one-node cluster (tests/cluster/node.py: kubelet, containerd, CoreDNS) comes up; Webb is
installed from its Helm chart with its own image; the Star Wars pods run (kubelet's, with their
``containerd://`` IDs); Cilium's rule1 is applied with kubectl; the three outcomes are printed
and checked. Everything is removed at the end, the node too. Exit 0 only if every outcome is the
expected one and nothing was left behind.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from rich.console import Console

from tests.cluster.node import KubeNode
from tests.cluster.starwars import apply_rule1, deploy, request, url, wait_landing
from tests.cluster.test_install import helm_installed

console = Console()
NS = "starwars"
CASES = (  # pod, method, path, what the outcome must start with
    ("tiefighter", "POST", "/v1/request-landing", "200 Ship landed"),
    ("tiefighter", "PUT", "/v1/exhaust-port", "403 Access denied"),
    ("xwing", "POST", "/v1/request-landing", "PermissionError"),
)


def main() -> int:
    ok = True
    node = KubeNode()
    console.print(f"[bold]A real node: {node.name} (kubelet, containerd, CoreDNS; pods {node.pod_cidr}, services {node.service_cidr})[/]")
    node.start()
    try:
        with tempfile.TemporaryDirectory(prefix="webb-kube-demo-") as home, helm_installed(node, Path(home)) as inst:
            console.print(f"[bold]Webb installed with helm ({inst.image.ref}): {inst.timings}[/]")
            node.kubectl("create", "namespace", NS)
            pods = deploy(node, NS)
            for name, p in pods.items():
                console.print(f"  pod {name}: {p['status']['podIP']} {p['status']['containerStatuses'][0]['containerID']}")
            got = wait_landing(node, NS)
            console.print(f"[bold]Without a policy:[/] tiefighter POST /v1/request-landing → {got}")
            ok &= got.startswith("200")
            apply_rule1(node, NS)
            console.print("[bold]With MeshPolicy rule1 (kubectl apply):[/]")
            for pod, method, path, want in CASES:
                got = request(node, NS, pod, method, url(NS, path))
                good = got.startswith(want)
                ok &= good
                console.print(f"  {pod:10} {method:4} {path:22} → {got}  {'[green]as expected[/]' if good else f'[red]expected {want}[/]'}")
            node.kubectl("delete", "namespace", NS, "--wait=false")
    finally:
        node.stop()
    left = node.leftovers()
    if left:
        console.print(f"[red]left behind: {left}[/]")
    ok &= not left
    console.print("[green bold]PASS: the three outcomes match, nothing left behind[/]" if ok else "[red bold]FAIL[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
