"""Kernel feature probes for `webb doctor`: what the datapath needs and whether this kernel has it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datapath import libbpf
from datapath.cgroup2 import cgroup2_mount

# enum bpf_prog_type / bpf_map_type values (UAPI, stable)
PROG_TYPES = {"cgroup_sock_addr (connect/sendmsg/recvmsg/getpeername)": 18, "cgroup_skb (MeshTLS STRICT)": 8,
              "sock_ops": 13, "sk_msg": 16}
MAP_TYPES = {"hash": 1, "array": 2, "percpu_array": 6, "lru_hash": 9, "sockhash": 18, "ringbuf": 27}


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _cgroup2() -> Probe:
    try:
        return Probe("cgroup v2 mount", True, str(cgroup2_mount()))
    except RuntimeError as e:
        return Probe("cgroup v2 mount", False, str(e))


def _bpffs() -> Probe:
    with open("/proc/mounts") as f:
        mounts = [ln.split()[1] for ln in f if ln.split()[2:3] == ["bpf"]]
    if mounts:
        return Probe("bpffs", True, ", ".join(mounts))
    return Probe("bpffs", True, "not mounted yet; the agent mounts it at /sys/fs/bpf", required=False)


def run() -> list[Probe]:
    btf = Path("/sys/kernel/btf/vmlinux")
    out = [Probe("BTF (/sys/kernel/btf/vmlinux)", btf.exists(),
                 "present" if btf.exists() else "absent: CO-RE tools will not work (Webb's programs do not need it)",
                 required=False), _cgroup2(), _bpffs()]
    for name, t in PROG_TYPES.items():
        ok = libbpf.probe_prog_type(t)
        out.append(Probe(f"program type {name}", ok, "supported" if ok else "missing",
                         required=name.startswith("cgroup_")))
    for name, t in MAP_TYPES.items():
        ok = libbpf.probe_map_type(t)
        out.append(Probe(f"map type {name}", ok, "supported" if ok else "missing", required=name != "sockhash"))
    return out
