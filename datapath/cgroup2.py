"""Where cgroup v2 is mounted: the one lookup (stdlib only, no ctypes).

Read from /proc/mounts, never assumed: it is /sys/fs/cgroup on a pure v2 host, but
/sys/fs/cgroup/unified (or elsewhere) on a hybrid one. ``datapath.probes`` (webb doctor),
``mesh.runtime.cgroups`` (the node's cgroup subtree), the tests and the bench all ask here.
"""

from __future__ import annotations

from pathlib import Path

MOUNTS = Path("/proc/mounts")
HOW_TO_MOUNT = "mount -t cgroup2 none /sys/fs/cgroup/unified"


def cgroup2_mount(mounts: Path = MOUNTS) -> Path:
    """The cgroup v2 mount point (the first one listed); RuntimeError says how to make one."""
    with open(mounts) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    raise RuntimeError(f"find cgroup v2: no cgroup2 mount in {mounts}; mount one with '{HOW_TO_MOUNT}'")
