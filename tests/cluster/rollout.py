"""A hitless agent upgrade, measured: ``kubectl rollout restart`` of the agent DaemonSet under bounded
load from inside pods (used by tests/cluster/test_install.py and bench/kube.py).

Three loads run in pods while the DaemonSet's pod is replaced, each every ``INTERVAL_S``, bounded in
time (``MAX_S``) and stopped early by a line on stdin:

  held   one TCP connection to an echo Service (L4, no policy), opened before the restart: a line out,
         the same line back, on the same connection, all along
  new    a new TCP connection to that Service each time (connect, line, echo, close)
  l7     an HTTP request through the node Envoy (an L7 policy applies): Envoy is the agent pod's and
         restarts with it, so these fail for a while: the L7 pause, measured, not hidden

Every load prints one JSON line at the end: counts, failures and the longest run of failures (s).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any

from tests.cluster.node import KubeNode
from tests.cluster.test_node import PYTHON, eventually

INTERVAL_S = 0.02
MAX_S = 150  # each load stops by itself after this at the latest
AGENT_NS, AGENT_DS = "webb-system", "daemonset/webb-agent"

ECHO = """
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 9000), H).serve_forever()
"""

# argv: mode (held|new|l7), target (host:port or URL), interval, max seconds; stops at a line on stdin
LOAD = """
import json, select, socket, sys, time, urllib.request, urllib.error
mode, target, interval, max_s = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
ok = fail = 0
run = longest = 0.0
first_fail = None
errors = {}
held = None
def once(i):
    global held
    line = b"ping %d\\n" % i
    if mode == "l7":
        req = urllib.request.Request(target, method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=2) as r:
            r.read()
            return r.status == 200
    host, port = target.rsplit(":", 1)
    if mode == "held":
        if held is None:
            held = socket.create_connection((host, int(port)), timeout=2).makefile("rwb")
        held.write(line); held.flush()
        return held.readline() == line
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(line)
        return s.makefile("rb").readline() == line
start = time.monotonic()
i = 0
print("ready", flush=True)
while time.monotonic() - start < max_s:
    if select.select([sys.stdin], [], [], 0)[0]:
        break
    t = time.monotonic()
    try:
        good = once(i)
        err = "" if good else "wrong answer"
    except Exception as e:
        good, err = False, type(e).__name__
        if mode == "held":
            held = None  # a broken held connection is counted, then opened again
    if good:
        ok += 1
        if first_fail is not None:
            longest = max(longest, t - first_fail)
            first_fail = None
    else:
        fail += 1
        errors[err] = errors.get(err, 0) + 1
        if first_fail is None:
            first_fail = t
    i += 1
    time.sleep(max(0.0, interval - (time.monotonic() - t)))
if first_fail is not None:
    longest = max(longest, time.monotonic() - first_fail)
print(json.dumps({"mode": mode, "ok": ok, "failed": fail, "longest_failure_s": round(longest, 3), "errors": errors}), flush=True)
"""


def _pod(name: str, ns: str, command: list[str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": PYTHON, "imagePullPolicy": "Never", "command": command}]}}


def deploy_echo(node: KubeNode, ns: str) -> None:
    """The echo Service (port 9000, no policy) and a client pod, in ``ns``."""
    node.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": ns},
                "spec": {"selector": {"app": "echo"}, "ports": [{"port": 9000, "targetPort": 9000}]}},
               _pod("echo", ns, ["python3", "-c", ECHO]), _pod("client", ns, ["python3", "-c", "import time; time.sleep(3600)"]))
    for name in ("echo", "client"):
        node.wait_pod_ready(ns, name)
    probe = ("import socket, sys\ns = socket.create_connection((sys.argv[1], 9000), timeout=2)\ns.sendall(b'hi\\n')\n"
             "print(s.makefile('rb').readline().decode().strip())")
    eventually("the echo Service answers", lambda: node.kubectl("exec", "-n", ns, "client", "--", "python3", "-c", probe,
                                                                f"echo.{ns}.svc.cluster.local", check=False).stdout.strip() == "hi", 60)


class Load:
    """One load in a pod (``kubectl exec -i``), until ``stop()``."""

    def __init__(self, node: KubeNode, ns: str, pod_name: str, mode: str, target: str) -> None:
        self.mode = mode
        self.proc = subprocess.Popen(
            [str(node.kubectl_path), "--kubeconfig", str(node.kubeconfig), "exec", "-i", "-n", ns, pod_name, "--",
             "python3", "-c", LOAD, mode, target, str(INTERVAL_S), str(MAX_S)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()  # the load runs once it says so
        if first.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"load {mode} did not start: {first!r} {self.proc.stderr.read() if self.proc.stderr else ''}")

    def stop(self) -> dict[str, Any]:
        out, err = self.proc.communicate("stop\n", timeout=MAX_S + 30)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"load {self.mode}: no result (exit {self.proc.returncode}): {out[-500:]} {err[-1000:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result


def rollout_under_load(node: KubeNode, echo_ns: str, l7: tuple[str, str, str] | None = None,
                       settle_s: float = 2.0) -> dict[str, Any]:
    """``kubectl rollout restart`` of the agent DaemonSet while the loads run; ``l7``: (namespace, pod, URL)
    of an L7 request allowed by policy. Returns each load's result and the rollout's duration."""
    target = f"echo.{echo_ns}.svc.cluster.local:9000"
    loads = [Load(node, echo_ns, "client", "held", target), Load(node, echo_ns, "client", "new", target)]
    if l7 is not None:
        loads.append(Load(node, l7[0], l7[1], "l7", l7[2]))
    results: dict[str, Any] = {}
    try:
        time.sleep(settle_s)  # a baseline before the restart
        old = {p["metadata"]["uid"] for p in node.get("-n", AGENT_NS, "pods", "-l", "app.kubernetes.io/name=webb-agent")["items"]}
        t0 = time.monotonic()
        node.kubectl("-n", AGENT_NS, "rollout", "restart", AGENT_DS)
        node.kubectl("-n", AGENT_NS, "rollout", "status", AGENT_DS, "--timeout=120s", timeout_s=130)
        results["rollout_s"] = round(time.monotonic() - t0, 2)
        new = {p["metadata"]["uid"] for p in node.get("-n", AGENT_NS, "pods", "-l", "app.kubernetes.io/name=webb-agent")["items"]}
        results["agent_replaced"] = bool(new) and not (new & old)
        time.sleep(settle_s)  # and after it
    finally:
        stoppers = [threading.Thread(target=lambda ld=ld: results.__setitem__(ld.mode, ld.stop())) for ld in loads]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(MAX_S + 60)
    return results
