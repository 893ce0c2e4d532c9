"""cgroup v2 discovery and the node's cgroup subtree."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from datapath.cgroup2 import cgroup2_mount

__all__ = ["cgroup2_mount", "cgroup_id", "node_cgroup", "own_cgroup", "populated", "procs", "remove_tree"]


WEBB = "webb"  # the subtree every node of this machine makes its own under: <cgroup2>/webb/<node>


def node_cgroup(node: str) -> Path:
    """Node ``node``'s cgroup subtree (its pods' under ``pods/``), on the one cgroup v2 mount."""
    return cgroup2_mount() / WEBB / node


def own_cgroup(pid: int | str = "self") -> Path:
    """The cgroup v2 directory of a process (``/proc/<pid>/cgroup``'s unified line)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return cgroup2_mount() / line.removeprefix("0::").lstrip("/")
    raise RuntimeError(f"process {pid} is in no cgroup v2 (no 0:: line in /proc/{pid}/cgroup)")


def cgroup_id(path: Path) -> int:
    """The id bpf_get_current_cgroup_id() returns for tasks in ``path``."""
    return os.stat(path).st_ino


def procs(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def populated(path: Path) -> bool:
    """True while any task, a dying one included, still belongs to the subtree."""
    try:
        return "populated 1" in (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False


def remove_tree(path: Path, grace_s: float = 3.0) -> None:
    """Stop every process of a cgroup subtree this node created, then remove it.

    Processes get SIGTERM, then SIGKILL after ``grace_s``; only processes inside the
    subtree (started by the runtime into it) are signalled. The wait is on the kernel's
    ``populated`` flag, not on cgroup.procs: an exited task whose parent has not reaped
    it yet (pods adopted from a killed agent are not our children) still pins the cgroup.
    """
    if not path.exists():
        return
    children = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    groups = [*children, path]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in groups:
            for pid in procs(g):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and populated(path):
            time.sleep(0.02)
        if not populated(path):
            break
    deadline = time.monotonic() + 10 * grace_s
    for g in groups:
        while True:
            try:
                g.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise OSError(e.errno, f"remove cgroup {g}: {e.strerror} (processes: {procs(g) or 'exited, not reaped'})"
                                  ) from None
                time.sleep(0.05)
