"""Undo a one-node cluster from its record: standard library only, safe to run more than once.

``KubeNode`` writes a ``Record`` (``<run dir>/node.json``) before each thing it adds to the host,
so whatever has been made is undone from it by whoever finds it: ``KubeNode.stop()``, the guard
process (``python -m tests.cluster.node guard``, which does it when the test process dies, even by
SIGKILL), or ``python -m tests.cluster.node down``. ``cleanup()`` stops only processes the node
started, by PID (a PID counts as the node's only while its start time is the recorded one):

  1. the daemons of the record (SIGTERM, then SIGKILL after a grace period)
  2. containerd's shims, which outlive containerd by design: the ones whose ``-address`` is this
     node's containerd socket
  3. every process left in the node's cgroup subtree (the containers)

then unmounts what is left under the node's directories (netns, rootfs, tmpfs volumes, kubelet's
own bind mount), removes the cgroup subtree, the bridge, the service-range blackhole route, what
containerd, kubelet and libcni put outside (``/run/containerd/s`` shim sockets, ``/var/log/containers``
links, ``/var/lib/cni/results``: only this node's entries, and the directories only if they did not
exist before), puts back the sysctls kubelet changes, and removes both directories. ``leftovers()``
lists whatever is still there.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECORD_NAME = "node.json"
# kubelet's setupKernelTunables sets these at every start; ip_forward is watched too (the bridge
# plugin would set it with isGateway, which the node does not use)
SYSCTLS = ("vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
           "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes", "net.ipv4.ip_forward")
# written outside the node's directories, paths compiled in: kubelet (container log links, its device-plugin
# socket), libcni (its result cache), containerd 1.6 (shim sockets)
OUTSIDE = ("/var/log/containers", "/var/lib/kubelet", "/var/lib/cni", "/run/containerd")
DEVICE_PLUGIN_SOCKET = Path("/var/lib/kubelet/device-plugins/kubelet.sock")
CONTAINERD_STATE = Path("/run/containerd")  # containerd 1.6 puts shim sockets in <this>/s, whatever its config says
STOP_GRACE_S = 15.0
KILL_WAIT_S = 10.0


@dataclass
class Daemon:
    pid: int
    start: int  # /proc/<pid>/stat start time (clock ticks since boot): tells a reused PID apart
    argv0: str


@dataclass
class Record:
    """What a node has added to this host, written before each addition."""

    name: str
    run_dir: str
    state_dir: str
    bridge: str
    service_cidr: str
    cgroup_root: str  # kubelet's cgroupRoot without the slash, e.g. "webbkube"
    cni_network: str
    containerd_socket: str
    owner_pid: int = 0
    owner_start: int = 0
    guard_pid: int = 0
    sysctls: dict[str, str] = field(default_factory=dict)  # the host's values before the node started
    existed: dict[str, bool] = field(default_factory=dict)  # the OUTSIDE paths, before the node started
    bridge_added: bool = False
    blackhole_added: bool = False
    cgroups_added: bool = False
    daemons: dict[str, Daemon] = field(default_factory=dict)
    ready: bool = False
    api_url: str = ""
    kubeconfig: str = ""
    kubectl: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / RECORD_NAME

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.rename(self.path)

    @classmethod
    def load(cls, path: Path) -> Record | None:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        raw["daemons"] = {k: Daemon(**v) for k, v in raw.get("daemons", {}).items()}
        return cls(**raw)


# ---- processes

def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat, or None when there is no such process (or it is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def is_alive(d: Daemon) -> bool:
    return d.pid > 0 and start_time(d.pid) == d.start


def stop_daemons(daemons: list[tuple[str, Daemon]], grace_s: float = STOP_GRACE_S) -> list[str]:
    """SIGTERM to each (all at once), SIGKILL to those still there after ``grace_s``; returns notes. A zombie counts as
    gone: nothing is reaped here (a waitpid(-1) would take other fixtures' children's exit codes); Popen.wait does that."""
    notes = []
    live = [(n, d) for n, d in daemons if is_alive(d)]
    for _, d in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(d.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while live and time.monotonic() < deadline:
        live = [(n, d) for n, d in live if is_alive(d)]
        time.sleep(0.05)
    for n, d in live:
        notes.append(f"{n} ({d.pid}) ignored SIGTERM for {grace_s:.0f} s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(d.pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while live and time.monotonic() < deadline:
        live = [(n, d) for n, d in live if is_alive(d)]
        time.sleep(0.05)
    return notes


def shim_pids(socket: str) -> list[int]:
    """containerd-shim-runc-v2 processes serving this containerd (their -address is its socket)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"containerd-shim" in argv[0] and b"-address" in argv:
            i = argv.index(b"-address")
            if i + 1 < len(argv) and argv[i + 1].decode(errors="replace") == socket:
                out.append(int(d.name))
    return out


def cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy's mount point (the v1 ones and the unified one) from /proc/mounts."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2"):
                out.append(Path(parts[1]))
    return out


def cgroup_procs(cgroup_root: str) -> set[int]:
    """PIDs in the node's subtree of any hierarchy."""
    pids: set[int] = set()
    for mnt in cgroup_mounts():
        top = mnt / cgroup_root
        if not top.is_dir():
            continue
        for dirpath, _, files in os.walk(top):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def kill_cgroup_procs(cgroup_root: str, timeout_s: float = KILL_WAIT_S) -> int:
    """SIGKILL every process of the subtree until none is left (bounded); returns how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = cgroup_procs(cgroup_root)
        if not pids:
            break
        for pid in pids - killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= pids
        time.sleep(0.1)
    return len(killed)


# ---- mounts, cgroups, network, files

def mounts_under(*roots: str) -> list[str]:
    """Mount points at or below ``roots`` (from mountinfo; octal escapes undone), deepest first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if any(mp == r or mp.startswith(r.rstrip("/") + "/") for r in roots):
                out.append(mp)
    return sorted(set(out), key=lambda m: (-m.count("/"), m))


def unmount_all(*roots: str) -> list[str]:
    """Unmount everything under ``roots`` (a lazy unmount when a plain one fails); returns what is left."""
    for _ in range(4):
        left = mounts_under(*roots)
        if not left:
            return []
        for mp in left:
            if subprocess.run(["umount", mp], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30)
    return mounts_under(*roots)


def remove_cgroups(cgroup_root: str) -> list[str]:
    """rmdir the subtree in every hierarchy, deepest first; returns the directories that stayed."""
    left = []
    for mnt in cgroup_mounts():
        top = mnt / cgroup_root
        if not top.is_dir():
            continue
        dirs = sorted((Path(dp) for dp, _, _ in os.walk(top)), key=lambda p: -len(p.parts))
        for d in dirs:
            for _ in range(50):  # a cgroup whose last task just died is busy for a moment
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
        if top.exists():
            left.append(str(top))
    return left


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def blackhole_present(cidr: str) -> bool:
    out = subprocess.run(["ip", "route", "show", "type", "blackhole", cidr], capture_output=True, text=True, timeout=10)
    return bool(out.stdout.strip())


def read_sysctl(name: str) -> str:
    return Path("/proc/sys", *name.split(".")).read_text().strip()


def write_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", *name.split(".")).write_text(value + "\n")


def restore_sysctls(before: dict[str, str]) -> list[str]:
    """Put back every recorded sysctl that differs now; returns 'name: now -> before' notes."""
    notes = []
    for name, value in before.items():
        try:
            now = read_sysctl(name)
        except OSError:
            continue
        if now != value:
            write_sysctl(name, value)
            notes.append(f"{name}: {now} -> {value}")
    return notes


def task_ids(record: Record) -> list[str]:
    """Ids of the containers and sandboxes containerd's runtime v2 knows (its state directory)."""
    tasks = Path(record.run_dir, "containerd", "io.containerd.runtime.v2.task", "k8s.io")
    try:
        return sorted(p.name for p in tasks.iterdir())
    except FileNotFoundError:
        return []


def shim_socket(containerd_socket: str, task_id: str, namespace: str = "k8s.io") -> Path:
    """Where containerd 1.6 puts the shim socket of a task (runtime/v2/shim SocketAddress)."""
    digest = hashlib.sha256(os.path.join(containerd_socket, namespace, task_id).encode()).hexdigest()
    return CONTAINERD_STATE / "s" / digest


def remove_outside(record: Record, ids: list[str]) -> None:
    """This node's entries in the directories kubelet, containerd and libcni write outside its own."""
    for tid in ids:
        shim_socket(record.containerd_socket, tid).unlink(missing_ok=True)
    logs = Path("/var/log/containers")
    if logs.is_dir():
        for link in logs.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(record.state_dir.rstrip("/") + "/"):
                    link.unlink()
    results = Path("/var/lib/cni/results")  # libcni's cache: <network>-<container id>-<interface>
    if results.is_dir():
        for f in results.glob(f"{record.cni_network}-*"):
            f.unlink(missing_ok=True)
        for tid in ids:
            (results / f"cni-loopback-{tid}-lo").unlink(missing_ok=True)
    if DEVICE_PLUGIN_SOCKET.is_socket() and not _listening(DEVICE_PLUGIN_SOCKET):  # left by a kubelet that has stopped
        DEVICE_PLUGIN_SOCKET.unlink(missing_ok=True)
    for path in OUTSIDE:
        if not record.existed.get(path, True):
            _remove_empty_dirs(Path(path))


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _only_dirs(top: Path) -> bool:
    """``top`` is a tree of directories with no file in it (what a node made and emptied)."""
    return all(not files for _, _, files in os.walk(top))


def _remove_empty_dirs(top: Path) -> None:
    if not top.is_dir():
        return
    for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(Path(w[0]).parts)):
        with contextlib.suppress(OSError):
            Path(dirpath).rmdir()


def remove_dir(path: str) -> str | None:
    """rm -rf ``path``, refused while anything is mounted below it; returns a note when it stays."""
    if not os.path.lexists(path):
        return None
    mounted = mounts_under(path)
    if mounted:
        return f"{path} kept: still mounted below it: {', '.join(mounted[:5])}"
    shutil.rmtree(path, ignore_errors=True)
    return f"{path} could not be removed" if os.path.lexists(path) else None


# ---- the whole

def cleanup(record: Record, grace_s: float = STOP_GRACE_S) -> list[str]:
    """Undo everything the record names; every step runs even if an earlier one failed. Returns notes."""
    notes: list[str] = []

    def step(what: str, fn: Callable[[], object]) -> None:
        try:
            res = fn()
            if isinstance(res, list):
                notes.extend(res)
        except Exception as e:  # noqa: BLE001 - every later step must still run
            notes.append(f"{what}: {type(e).__name__}: {e}")

    ids = task_ids(record)
    # in waves: the API server's shutdown needs etcd (it gives up its endpoint lease), the rest need the API server
    waves = [[n for n in record.daemons if n not in ("kube-apiserver", "etcd")], ["kube-apiserver"], ["etcd"]]
    for wave in waves:
        daemons = [(n, record.daemons[n]) for n in wave if n in record.daemons]
        step(f"stop {', '.join(wave)}", functools.partial(stop_daemons, daemons, grace_s))

    def kill_shims() -> list[str]:
        pids = shim_pids(record.containerd_socket)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return [f"killed {len(pids)} containerd shim(s)"] if pids else []

    step("shims", kill_shims)
    step("containers", lambda: [f"killed {n} container process(es)"] if (n := kill_cgroup_procs(record.cgroup_root)) else [])
    step("unmount", lambda: [f"still mounted: {m}" for m in unmount_all(record.run_dir, record.state_dir)])
    if record.cgroups_added:
        step("cgroups", lambda: [f"cgroup left: {c}" for c in remove_cgroups(record.cgroup_root)])
    if record.bridge_added and link_exists(record.bridge):
        step("bridge", lambda: subprocess.run(["ip", "link", "del", record.bridge], check=True, capture_output=True, timeout=30))
    if record.blackhole_added and blackhole_present(record.service_cidr):
        step("route", lambda: subprocess.run(["ip", "route", "del", "blackhole", record.service_cidr], check=True,
                                             capture_output=True, timeout=30))
    step("outside files", lambda: remove_outside(record, ids))
    step("sysctls", lambda: [f"sysctl restored {n}" for n in restore_sysctls(record.sysctls)])
    for d in (record.state_dir, record.run_dir):
        note = remove_dir(d)
        if note:
            notes.append(note)
        with contextlib.suppress(OSError):
            Path(d).parent.rmdir()  # /run/webb-kube, /var/lib/webb-kube: only when no other node is there
    return notes


def leftovers(record: Record) -> list[str]:
    """What of the node is still on the host; empty when the teardown was complete."""
    left = [f"process {n} ({d.pid})" for n, d in record.daemons.items() if is_alive(d)]
    left += [f"containerd shim {p}" for p in shim_pids(record.containerd_socket)]
    left += [f"process {p} in cgroup {record.cgroup_root}" for p in sorted(cgroup_procs(record.cgroup_root))]
    left += [f"cgroup {m / record.cgroup_root}" for m in cgroup_mounts() if (m / record.cgroup_root).exists()]
    left += [f"mount {m}" for m in mounts_under(record.run_dir, record.state_dir)]
    if link_exists(record.bridge):
        left.append(f"bridge {record.bridge}")
    if record.blackhole_added and blackhole_present(record.service_cidr):
        left.append(f"route blackhole {record.service_cidr}")
    for name, value in record.sysctls.items():
        with contextlib.suppress(OSError):
            if (now := read_sysctl(name)) != value:
                left.append(f"sysctl {name}={now} (was {value})")
    left += [f"directory {d}" for d in (record.run_dir, record.state_dir) if os.path.lexists(d)]
    if Path("/var/lib/cni/results").is_dir():
        left += [f"file {f}" for f in Path("/var/lib/cni/results").glob(f"{record.cni_network}-*")]
    if Path("/var/log/containers").is_dir():
        left += [f"link {f}" for f in Path("/var/log/containers").iterdir()
                 if f.is_symlink() and os.readlink(f).startswith(record.state_dir.rstrip("/") + "/")]
    left += [f"directory {p} (made by the node, empty)" for p in OUTSIDE
             if not record.existed.get(p, True) and Path(p).is_dir() and _only_dirs(Path(p))]
    return left
