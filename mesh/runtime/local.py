"""Pods as network namespaces on a bridge, each in its own cgroup, on this machine.

The node is the host network namespace: bridge ``webb0`` holds the gateway address (where
the node Envoy listens), every pod gets a veth into it and one address from the pod CIDR.
With ``NodeConfig.netns`` the node is that network namespace instead (several nodes on one
machine, ``mesh.runtime.cluster``): the agent's process enters it before anything else
(``enter_netns``), so the bridge, Envoy and the pods' veths all live there.
Pods are dual-stack (an IPv6 ULA next to the IPv4) and get no default route, so they reach
only the pod CIDRs; the service CIDRs are blackholes in the host and in every pod (DESIGN safety rule): a VIP the datapath did not
rewrite fails at once instead of leaving the machine.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from pyroute2 import IPRoute, netns

from mesh.runtime import cgroups, cidrs

# How a pod's command runs, after its cgroup and netns (every pod is an attacker):
# - a cgroup namespace rooted at the pod's cgroup: it cannot name, so cannot join, any other cgroup;
# - a pid namespace with its own /proc: it cannot see or signal the node's processes (stopping the pod
#   kills it: --kill-child);
# - a mount namespace where every visible mount is read-only (the node's files, the agent's state and
#   code included: uid 0 without capabilities still writes files root owns); checked, or it does not start;
# - an empty capability bounding set and no new privileges: uid 0 in the pod holds no capability (no raw
#   or packet sockets, no forged source addresses, no BPF, no mounts; setuid binaries gain nothing).
_READ_ONLY = ('awk \'{print $5}\' /proc/self/mountinfo | sort -u | while read -r m; do '
              'mount -o remount,bind,ro "$(printf "%b" "$m")" 2>/dev/null; done; '
              'rw=$(awk \'{top[$5] = $6} END {for (m in top) if (top[m] ~ /^rw/) print m}\' /proc/self/mountinfo); '
              'if [ -n "$rw" ]; then echo "webb: pod not started: still writable: $rw" >&2; exit 126; fi; exec "$@"')
CONFINE = ("unshare", "--cgroup", "--pid", "--fork", "--kill-child", "--mount-proc", "--",
           "sh", "-c", _READ_ONLY, "sh",
           "setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--")
NETNS_DIR = Path("/var/run/netns")
T = TypeVar("T")
IFA_F_NODAD = 0x02


@dataclass(frozen=True)
class NodeConfig:
    name: str = "node1"
    bridge: str = "webb0"
    pod_cidr: str = "10.244.0.0/24"
    service_cidr: str = "10.96.0.0/16"
    pod_cidr6: str = "fd00:10:244::/64"  # ULA; a pod's IPv6 has the host index of its IPv4
    service_cidr6: str = "fd00:10:96::/112"
    state_dir: Path = Path("/run/webb")
    netns: str = ""  # the node's network namespace; "": the host's (one node on this machine)
    cluster_cidr: str = ""  # every node's pod CIDR inside it: pods route it via their gateway

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.IPv4Network(self.pod_cidr).hosts()))

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.pod_cidr).prefixlen

    @property
    def gateway6(self) -> str:
        return str(ipaddress.IPv6Network(self.pod_cidr6)[1])

    def ip6_of(self, ip4: str) -> str:
        """The pod's IPv6: same host index as its IPv4 (10.244.0.5 -> fd00:10:244::5)."""
        net4, net6 = ipaddress.IPv4Network(self.pod_cidr), ipaddress.IPv6Network(self.pod_cidr6)
        return str(net6[int(ipaddress.IPv4Address(ip4)) - int(net4.network_address)])

    @property
    def cgroup(self) -> Path:
        return cgroups.node_cgroup(self.name)

    @property
    def pods_cgroup(self) -> Path:
        """Where the socket programs attach: every pod, and nothing else of the node."""
        return self.cgroup / "pods"

    @property
    def proxy_cgroup(self) -> Path:
        """The node Envoy's: beside the pods, not one of them (its sockets are the host's)."""
        return self.cgroup / "proxy"


@dataclass
class Sandbox:
    """What the runtime made for one pod."""

    key: str  # namespace/name
    ip: str
    netns: str
    cgroup: Path
    cgroup_id: int
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    adopted: bool = False  # left running by a previous agent; its process is not our child
    ip6: str = ""


def _slug(key: str) -> str:
    return hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:8]


def netns_name(node: str, key: str) -> str:
    return f"webb-{node}-{key.replace('/', '-')}"


def pod_sandbox(cfg: NodeConfig, key: str) -> Sandbox:
    """The sandbox of a running pod, found by name (for exec from another process)."""
    cg = cfg.pods_cgroup / key.replace("/", "_")
    if not cg.exists():
        raise LookupError(f"find pod {key}: not running on node {cfg.name}")
    return Sandbox(key, "", netns_name(cfg.name, key), cg, cgroups.cgroup_id(cg))


@dataclass
class LocalNode:
    config: NodeConfig = field(default_factory=NodeConfig)
    sandboxes: dict[str, Sandbox] = field(default_factory=dict)

    # ---- node ----
    def check_cidrs(self) -> None:
        """Refuse CIDRs that are not ones, overlap each other, or overlap a route the host
        already has (other than our own); every error names the flag to change.

        Routes inside the cluster CIDR are the other nodes' pod CIDRs (``mesh.runtime.cluster``
        routes them over the wire): not conflicts of the cluster CIDR, but of this node's own."""
        c = self.config
        context = f"start node {c.name}"
        pod = cidrs.parse(c.pod_cidr, "--pod-cidr", "pod CIDR", version=4)
        mine = [pod, cidrs.parse(c.service_cidr, "--service-cidr", "service CIDR", version=4),
                cidrs.parse(c.pod_cidr6, "pod_cidr6", "pod CIDR", version=6),
                cidrs.parse(c.service_cidr6, "service_cidr6", "service CIDR", version=6)]
        cidrs.refuse_overlaps(context, mine)
        cluster = cidrs.parse(c.cluster_cidr, "--cluster-cidr", "cluster CIDR", version=4) if c.cluster_cidr else None
        if cluster is not None:
            cidrs.require_inside(context, [pod], cluster)
            cidrs.refuse_overlaps(context, [cluster, *mine[1:]])
        with IPRoute() as ipr:
            routes = cidrs.main_routes(ipr, skip_oifs=ipr.link_lookup(ifname=c.bridge))
        ours = {m.net for m in mine}

        def peer(r: cidrs.Net) -> bool:
            return cluster is not None and isinstance(r, ipaddress.IPv4Network) and r.subnet_of(cluster.net)  # type: ignore[arg-type]

        peers, hosts = [r for r in routes if peer(r)], [r for r in routes if not peer(r)]
        cidrs.refuse_routes(context, [*mine, *([cluster] if cluster else [])], hosts, "host route", ours)
        cidrs.refuse_routes(context, mine, peers, "another node's route", ours)

    def setup(self) -> None:
        c = self.config
        if c.netns and not in_netns_now(c.netns):
            raise RuntimeError(f"start node {c.name}: this process is not in network namespace {c.netns}; "
                               "enter it first (webb agent --node-netns does, before any thread starts)")
        self.check_cidrs()
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=c.bridge):
                ipr.link("add", ifname=c.bridge, kind="bridge")
            br = ipr.link_lookup(ifname=c.bridge)[0]
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=br)}
            if c.gateway not in have:
                ipr.addr("add", index=br, address=c.gateway, prefixlen=c.prefixlen)
            if c.gateway6 not in have:
                ipr.addr("add", index=br, address=c.gateway6, prefixlen=64, flags=IFA_F_NODAD)
            ipr.link("set", index=br, state="up")
            blackhole(ipr, c.service_cidr)
            blackhole(ipr, c.service_cidr6)
            self._peer_routes_from_gateway(ipr, True)
        c.pods_cgroup.mkdir(parents=True, exist_ok=True)
        c.proxy_cgroup.mkdir(parents=True, exist_ok=True)
        (c.state_dir / "pods").mkdir(parents=True, exist_ok=True)
        self._adopt()

    def _adopt(self) -> None:
        """Take over pods a previous runtime of this node left running (an agent that was
        killed): their netns, IP, cgroup and processes stay as they are."""
        c = self.config
        for cg in sorted(p for p in c.pods_cgroup.iterdir() if p.is_dir()):
            key = cg.name.replace("_", "/", 1)  # namespaces are DNS labels: no "_" in them
            ns = netns_name(c.name, key)
            ips = _netns_ips(ns) if (NETNS_DIR / ns).exists() else []
            if not ips or not cgroups.procs(cg):
                cgroups.remove_tree(cg)
                _del_link(f"wb{_slug(key)}")
                _del_netns(ns)
                continue
            self.sandboxes[key] = Sandbox(key, ips[0], ns, cg, cgroups.cgroup_id(cg), adopted=True,
                                          ip6=c.ip6_of(ips[0]))

    def teardown(self) -> None:
        """Remove every pod, then the node; one failure does not stop the rest."""
        errors: list[str] = []
        for key in list(self.sandboxes):
            try:
                self.remove_pod(key)
            except OSError as e:
                errors.append(str(e))
        try:
            self._teardown_node()
        except OSError as e:
            errors.append(str(e))
        if errors:
            raise OSError(f"tear down node {self.config.name}: " + "; ".join(errors))

    def _teardown_node(self) -> None:
        c = self.config
        cgroups.remove_tree(c.cgroup)
        try:
            c.cgroup.parent.rmdir()  # .../webb, when no other node is left
        except OSError:
            pass
        for leftover in NETNS_DIR.glob(f"webb-{c.name}-*") if NETNS_DIR.exists() else []:
            _del_netns(leftover.name)

        def remove(ipr: IPRoute) -> None:
            self._peer_routes_from_gateway(ipr, False)  # before the gateway address goes with the bridge
            if ipr.link_lookup(ifname=c.bridge):
                ipr.link("del", ifname=c.bridge)
            if c.netns:  # the node netns keeps its blackholes: they go with it (mesh.runtime.cluster)
                return
            for cidr, family in ((c.service_cidr, 2), (c.service_cidr6, 10)):
                if any(r.get_attr("RTA_DST") == cidr.split("/")[0] and r["type"] == 6  # RTN_BLACKHOLE
                       for r in ipr.get_routes(family=family, table=254)):
                    ipr.route("del", dst=cidr, type="blackhole")

        if not c.netns or in_netns_now(c.netns):
            with IPRoute() as ipr:
                remove(ipr)
        elif (NETNS_DIR / c.netns).exists():  # cleanup from outside (webb node cleanup, tests)
            in_netns(c.netns, remove)

    def _peer_routes_from_gateway(self, ipr: IPRoute, on: bool) -> None:
        """Several nodes (a node netns with a cluster CIDR): the node's own connections to other
        nodes' pods (Envoy's upstreams) leave from its gateway, which the pods there route back
        (their cluster CIDR route), not from its wire address, which they have no route to.
        ``on=False`` puts the routes back as they were: the kernel deletes a route whose source
        address goes away, and the gateway goes with the bridge."""
        c = self.config
        if not (c.netns and c.cluster_cidr):
            return
        cluster, own = ipaddress.IPv4Network(c.cluster_cidr), ipaddress.IPv4Network(c.pod_cidr)
        for r in ipr.get_routes(family=2, table=254):
            gw, dst = r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_DST")
            if not gw or not dst:
                continue
            net = ipaddress.IPv4Network(f"{dst}/{r['dst_len']}", strict=False)
            if not net.subnet_of(cluster) or net.overlaps(own) or (r.get_attr("RTA_PREFSRC") == c.gateway) == on:
                continue
            extra = {"prefsrc": c.gateway} if on else {}
            ipr.route("replace", dst=str(net), gateway=gw, oif=r.get_attr("RTA_OIF"), **extra)

    # ---- pods ----
    def _allocate_ip(self) -> str:
        used = {s.ip for s in self.sandboxes.values()} | {self.config.gateway}
        for host in ipaddress.IPv4Network(self.config.pod_cidr).hosts():
            if str(host) not in used:
                return str(host)
        raise RuntimeError(f"allocate pod IP: pod CIDR {self.config.pod_cidr} is full")

    def ensure_pod(self, key: str, command: Sequence[str], env: dict[str, str] | None = None,
                   workdir: Path | None = None) -> Sandbox:
        """Create the sandbox for ``key`` and start its command (idempotent)."""
        sb = self.sandboxes.get(key)
        if sb is None:
            sb = self._make_sandbox(key)
            self.sandboxes[key] = sb
        if command and not self._running(sb):
            sb.log = self.config.state_dir / "pods" / f"{key.replace('/', '_')}.log"
            with open(sb.log, "ab") as out:
                sb.process = self.spawn(sb, command, env=env, workdir=workdir, stdout=out)
        return sb

    @staticmethod
    def _running(sb: Sandbox) -> bool:
        if sb.process is not None:
            return sb.process.poll() is None
        return sb.adopted and bool(cgroups.procs(sb.cgroup))

    def _make_sandbox(self, key: str) -> Sandbox:
        c = self.config
        ip = self._allocate_ip()
        ns = netns_name(c.name, key)
        host_if, peer_if = f"wb{_slug(key)}", f"wp{_slug(key)}"
        if (NETNS_DIR / ns).exists():
            _del_netns(ns)
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        _del_link(host_if)
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": peer_if, "net_ns_fd": ns})
            br = ipr.link_lookup(ifname=c.bridge)[0]
            ipr.link("set", index=ipr.link_lookup(ifname=host_if)[0], master=br, state="up")

        def configure(nsr: IPRoute) -> None:
            # blackhole first: nothing in this pod may reach a VIP unrewritten
            blackhole(nsr, c.service_cidr)
            blackhole(nsr, c.service_cidr6)
            lo = nsr.link_lookup(ifname="lo")[0]
            nsr.link("set", index=lo, state="up")
            idx = nsr.link_lookup(ifname=peer_if)[0]
            nsr.link("set", index=idx, ifname="eth0")
            nsr.addr("add", index=idx, address=ip, prefixlen=c.prefixlen)
            # no DAD: the address is ours alone, and usable at once
            nsr.addr("add", index=idx, address=c.ip6_of(ip), prefixlen=64, flags=IFA_F_NODAD)
            nsr.link("set", index=idx, state="up")
            # the pod runs without capabilities (CONFINE): its apps may still bind ports below 1024
            Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").write_text("0\n")
            if c.cluster_cidr:  # pods of the other nodes: through this node (no default route still)
                nsr.route("add", dst=c.cluster_cidr, gateway=c.gateway)

        in_netns(ns, configure)
        cg = c.pods_cgroup / key.replace("/", "_")
        cg.mkdir(parents=True, exist_ok=True)
        return Sandbox(key=key, ip=ip, netns=ns, cgroup=cg, cgroup_id=cgroups.cgroup_id(cg), ip6=c.ip6_of(ip))

    def spawn(self, sb: Sandbox, argv: Sequence[str], env: dict[str, str] | None = None,
              workdir: Path | None = None, stdout: int | IO[bytes] | None = None,
              stderr: int | IO[bytes] | None = None, stdin: int | IO[bytes] | None = subprocess.DEVNULL
              ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the pod: its cgroup first, then its netns (via ip netns exec,
        which also bind-mounts /etc/netns/<pod>/hosts so service names resolve), then confined
        (``CONFINE``): a cgroup namespace rooted at the pod's cgroup, a pid namespace, no
        capabilities at all and no way to gain one. Every pod is an attacker: it cannot leave its
        cgroup, open raw or packet sockets, forge source addresses, load BPF, or signal the agent."""
        # A shell moves itself into the pod cgroup, then execs: no Python runs between fork
        # and exec (the agent has gRPC threads; forking Python there is unsafe).
        enter = 'echo $$ > "$1" || exit 126; shift; exec ip netns exec "$@"'
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/root", **(env or {})}
        return subprocess.Popen(
            ["sh", "-c", enter, "sh", str(sb.cgroup / "cgroup.procs"), sb.netns, *CONFINE, *argv],
            env=full_env, cwd=workdir,
            stdin=stdin, stdout=stdout, stderr=stderr if stderr is not None else subprocess.STDOUT,
            start_new_session=True,
        )

    def write_hosts(self, sb: Sandbox, names: dict[str, list[str]]) -> None:
        d = Path("/etc/netns") / sb.netns
        d.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{ip} {' '.join(n)}" for ip, n in sorted(names.items())]
        tmp = d / "hosts.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(d / "hosts")

    def remove_pod(self, key: str) -> None:
        sb = self.sandboxes.pop(key, None)
        if sb is None:
            return
        if sb.process is not None and sb.process.poll() is None:
            sb.process.terminate()
            try:
                sb.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                sb.process.kill()
                sb.process.wait(timeout=3)
        try:
            cgroups.remove_tree(sb.cgroup)
        finally:
            # delete the veth ourselves: the kernel frees a netns (and the veth in it) lazily,
            # and a pod made again under the same name must not meet the old pair
            _del_link(f"wb{_slug(key)}")
            _del_netns(sb.netns)


def blackhole(ipr: IPRoute, cidr: str, proto: int | None = None) -> None:
    """Route ``cidr`` to a blackhole in ``ipr``'s netns (idempotent): a VIP the datapath did not
    rewrite fails at once there instead of leaving (DESIGN safety rule). ``proto``: the route's
    protocol number (who owns it)."""
    try:
        ipr.route("add", dst=cidr, type="blackhole", **({"proto": proto} if proto is not None else {}))
    except Exception as e:  # pyroute2 raises NetlinkError
        if getattr(e, "code", None) != errno.EEXIST:
            raise


def node_addresses() -> tuple[str, ...]:
    """Every address of this network namespace (the node's), loopback left out."""
    with IPRoute() as ipr:
        ips = {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()}
    return tuple(sorted(ip for ip in ips if ip and not ipaddress.ip_address(ip.split("%")[0]).is_loopback))


def call_in_netns(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a short-lived thread inside netns ``name``: setns() moves only the calling
    thread (pyroute2's NetNS would fork the multi-threaded agent instead). Sockets made there
    stay in that netns, and threads it starts inherit it."""
    out: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            netns.setns(name, flags=0, fork=False)
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            failure.append(e)

    t = threading.Thread(target=run, name=f"netns-{name}")
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return out[0]


def in_netns(name: str, fn: Callable[[IPRoute], None]) -> None:
    """Run ``fn`` with a netlink socket inside netns ``name``."""
    def with_ipr() -> None:
        with IPRoute() as ipr:
            fn(ipr)
    call_in_netns(name, with_ipr)


def _ns_id(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def in_netns_now(name: str) -> bool:
    """Whether the calling thread is in network namespace ``name`` (one of /var/run/netns)."""
    try:
        return _ns_id("/proc/thread-self/ns/net") == _ns_id(NETNS_DIR / name)
    except FileNotFoundError:
        return False


def enter_netns(name: str) -> None:
    """Move this process into network namespace ``name`` for good (``webb agent --node-netns``).

    setns() moves the calling thread only; threads started afterwards inherit it, threads
    already running do not: so this must run in the main thread before any other starts.
    Not ``ip netns exec``: it also unshares the mount namespace, and the pods' netns (bind
    mounts under /var/run/netns made by ``ip netns add``) would not be seen outside."""
    if not (NETNS_DIR / name).exists():
        raise RuntimeError(f"enter network namespace {name}: no {NETNS_DIR / name}; "
                           "create the node first (mesh.runtime.cluster.Wire)")
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1 or threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"enter network namespace {name}: {threads} threads already run, and they would "
                           "stay outside; enter it first thing in the main thread")
    netns.setns(name, flags=0, fork=False)
    if not in_netns_now(name):
        raise RuntimeError(f"enter network namespace {name}: setns did not take effect")


def _netns_ips(ns: str) -> list[str]:
    ips: list[str] = []
    in_netns(ns, lambda ipr: ips.extend(a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2, label="eth0")))
    return ips


def _del_link(ifname: str) -> None:
    with IPRoute() as ipr:
        try:
            ipr.link("del", ifname=ifname)
        except Exception as e:  # pyroute2 raises NetlinkError
            if getattr(e, "code", None) not in (errno.ENODEV, errno.ENOENT):
                raise


def _del_netns(name: str) -> None:
    """Remove a pod netns; its veth pair goes with it. /etc/netns/<name> too."""
    if (NETNS_DIR / name).exists():
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def wait_until(pred: object, timeout_s: float, step_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(step_s)
    return bool(pred())  # type: ignore[operator]
