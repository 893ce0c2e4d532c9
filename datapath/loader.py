"""Loads the socket programs, attaches them to a cgroup, pins everything, keeps maps in sync.

Restart-proof: maps and links are pinned under ``<bpffs>/webb/<node>/``. A pinned link keeps
its program attached when the agent dies (even by SIGKILL), so established connections are
untouched and new ones keep being translated with the last state. A restarted agent whose
BPF object is the same (sha256 in ``webb_meta``) adopts the pins without loading anything; a
different object is loaded reusing the pinned maps and swapped into the links atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

from datapath import libbpf
from datapath.maps import (
    ACCEL_COUNTERS,
    CONFIG_SOCKMAP,
    COUNTER_KEY,
    LAYOUT,
    STATE_MAPS,
    DatapathState,
    FlowEvent,
    check_btf,
    check_enums,
    check_layout,
)
from datapath.types import Reason

OBJECT_PATH = Path(__file__).parent / "bpf" / "sock.bpf.o"
BPFFS = Path("/sys/fs/bpf")
PROGRAMS = (*(f"webb_sock{f}_{hook}" for f in (4, 6) for hook in ("connect", "sendmsg", "recvmsg", "getpeername")),
            "webb_sockops", "webb_ingress", "webb_getsockopt")
# attached to the proxy's own cgroup too, when the proxy runs outside the pods' (the embedded node's Envoy):
# its getsockopt(SO_ORIGINAL_DST) is answered from the datapath's maps
PROXY_PROGRAMS = ("webb_getsockopt",)
MAPS = (*LAYOUT, "webb_events")
# make-before-break: a service entry is written after its backends and removed before them
_WRITE_ORDER = ("webb_backends", "webb_endpoints", "webb_cgroups", "webb_policy", "webb_services")
assert set(_WRITE_ORDER) == set(STATE_MAPS)


def ensure_bpffs() -> None:
    with open("/proc/mounts") as f:
        if any(line.split()[1] == str(BPFFS) and line.split()[2] == "bpf" for line in f):
            return
    BPFFS.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)


def pin_dir_for(node: str) -> Path:
    return BPFFS / "webb" / node


def _link_cgroup_id(link_fd: int) -> int:
    # struct bpf_link_info: type, id, prog_id (u32 each), then the union at offset 16:
    # cgroup.cgroup_id (u64). 0 once the cgroup is gone (a defunct link).
    info = libbpf.obj_info(link_fd)
    return int(struct.unpack_from("=Q", info, 16)[0]) if len(info) >= 24 else 0


def verify_object(object_path: Path, data: bytes) -> None:
    """The object is the one built: its sha256 matches ``<object>.sha256``, written by ``make bpf``
    (and shipped beside it in the package). A changed or unrecorded object is refused, never loaded."""
    record = object_path.with_name(object_path.name + ".sha256")
    try:
        want = record.read_text().split()[0] if record.exists() else ""
    except (OSError, IndexError):
        want = ""
    if not want:
        raise RuntimeError(f"load datapath: {record} is missing or empty: the object's sha256 is recorded at build; "
                           "rebuild with 'make bpf' (or reinstall the package)")
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise RuntimeError(f"load datapath: {object_path} has sha256 {got}, not {want} recorded at build: the object "
                           "was changed after it was built; refusing to load it. Rebuild with 'make bpf' (or reinstall)")


class Datapath:
    """The socket programs attached to ``cgroup_path``; ``adopted`` tells whether this instance
    took over pinned state instead of loading."""

    def __init__(self, cgroup_path: str, pin_dir: Path, object_path: Path = OBJECT_PATH,
                 proxy_cgroup: str | None = None) -> None:
        if not object_path.exists():
            raise FileNotFoundError(f"load datapath: {object_path} is missing; build it with 'make bpf'")
        data = object_path.read_bytes()
        verify_object(object_path, data)
        ensure_bpffs()
        check_btf(libbpf.btf_structs(str(object_path)))  # every shared struct, member by member
        check_enums(libbpf.btf_enums(str(object_path)))  # every shared constant: flags, verdicts, reasons
        self.cgroup_path = cgroup_path
        self.proxy_cgroup = proxy_cgroup
        self.pin_dir = pin_dir
        self.digest = hashlib.sha256(data).digest()
        self._obj: libbpf.BpfObject | None = None
        self._links: list[libbpf.Link] = []
        self._ring: libbpf.RingBuffer | None = None
        self._pending: list[FlowEvent] = []
        self.received = 0  # events read from the ring buffer by this instance
        self.maps: dict[str, libbpf.Map] = {}
        try:
            self.adopted = self._adopt()
            if not self.adopted:
                self._load(object_path)
            check_layout(self.maps)
            self._ring = libbpf.RingBuffer(self.maps["webb_events"], self._on_event)
            self._counted_at_start = sum(self.reason_counts().values())
        except BaseException:
            self.close()
            raise

    # ---- start ----
    def _adopt(self) -> bool:
        """Take over pinned maps when the pinned links run this very object on this cgroup."""
        links = [(self.pin_dir / pin, cg) for _, cg, pin in self._attachments()]
        if not (self.pin_dir / "webb_meta").exists() or not all(p.exists() for p, _ in links):
            return False
        meta = libbpf.Map.pinned(str(self.pin_dir / "webb_meta"), "webb_meta")
        try:
            if meta.lookup(COUNTER_KEY.pack(0)) != self.digest:
                return False
        finally:
            meta.close()
        for p, cg in links:
            fd = libbpf.obj_get(str(p))
            try:
                if _link_cgroup_id(fd) != os.stat(cg).st_ino:
                    return False
            finally:
                os.close(fd)
        self.maps = {n: libbpf.Map.pinned(str(self.pin_dir / n), n) for n in MAPS}
        return True

    def _load(self, object_path: Path) -> None:
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            obj = libbpf.BpfObject(str(object_path))
            for n in MAPS:
                obj.map(n).set_pin_path(str(self.pin_dir / n))
            try:
                obj.load()
                break
            except OSError:
                obj.close()
                if attempt == 2:
                    raise
                # pinned maps of an incompatible layout: start them afresh (the agent
                # rewrites their content from the plan right after)
                for n in MAPS:
                    (self.pin_dir / n).unlink(missing_ok=True)
        self._obj = obj
        self.maps = {n: obj.map(n) for n in MAPS}
        for name, cg, pin_name in self._attachments():
            prog = obj.program(name)
            pin = self.pin_dir / pin_name
            link = None
            if pin.exists():
                link = libbpf.Link.open_pinned(str(pin))
                if _link_cgroup_id(link.fd) == os.stat(cg).st_ino:
                    link.update_program(prog)  # atomic swap: never a moment unattached
                else:
                    link.destroy()
                    pin.unlink()
                    link = None
            if link is None:
                link = prog.attach_cgroup(cg)
                link.pin(str(pin))
            self._links.append(link)
        # sk_msg lives in the (pinned) sockhash, not in a link: it survives with the map
        obj.program("webb_sk_msg").attach_to_map(self.maps["webb_sockhash"], libbpf.BPF_SK_MSG_VERDICT)
        self.maps["webb_meta"].update(COUNTER_KEY.pack(0), self.digest)

    def _attachments(self) -> list[tuple[str, str, str]]:
        """(program, cgroup, pin name) of every link."""
        out = [(p, self.cgroup_path, f"link_{p}") for p in PROGRAMS]
        if self.proxy_cgroup:
            out += [(p, self.proxy_cgroup, f"link_{p}_proxy") for p in PROXY_PROGRAMS]
        return out

    # ---- run ----
    def _on_event(self, raw: bytes) -> None:
        self.received += 1
        self._pending.append(FlowEvent.decode(raw))

    def events_lost(self) -> int:
        """Decisions counted in the kernel but not read (yet, or ever: the ring buffer was
        full). Every counted decision emits one event; counting starts with this instance."""
        return sum(self.reason_counts().values()) - self._counted_at_start - self.received

    def apply(self, state: DatapathState) -> int:
        """Make the maps hold exactly ``state``; returns the number of entries changed."""
        want = state.entries()
        changed = 0
        for name in _WRITE_ORDER:
            m = self.maps[name]
            for key, value in want[name].items():
                if m.lookup(key) != value:
                    m.update(key, value)
                    changed += 1
        for name in reversed(_WRITE_ORDER):
            m = self.maps[name]
            for key in [k for k in m.keys() if k not in want[name]]:
                m.delete(key)
                changed += 1
        return changed

    def poll_events(self, timeout_ms: int = 0) -> list[FlowEvent]:
        if self._ring is not None:
            self._ring.poll(timeout_ms)
        events, self._pending = self._pending, []
        return events

    def set_acceleration(self, on: bool) -> None:
        """Same-node sockmap acceleration on/off (the agent only turns it on after a self-test)."""
        self.maps["webb_config"].update(COUNTER_KEY.pack(0), struct.pack("=I", CONFIG_SOCKMAP if on else 0))

    @property
    def acceleration(self) -> bool:
        raw = self.maps["webb_config"].lookup(COUNTER_KEY.pack(0)) or bytes(4)
        return bool(struct.unpack("=I", raw)[0] & CONFIG_SOCKMAP)

    def accel_counts(self) -> dict[str, int]:
        m = self.maps["webb_accel_counts"]
        return {name: sum(v for (v,) in struct.iter_unpack("=Q", m.lookup(COUNTER_KEY.pack(i)) or b""))
                for i, name in enumerate(ACCEL_COUNTERS)}

    def reason_counts(self) -> dict[Reason, int]:
        m = self.maps["webb_reason_counts"]
        out: dict[Reason, int] = {}
        for reason in Reason:
            raw = m.lookup(COUNTER_KEY.pack(int(reason))) or b""
            out[reason] = sum(v for (v,) in struct.iter_unpack("=Q", raw))
        return out

    # ---- stop ----
    def close(self, unpin: bool = False) -> None:
        """Release this process's handles. The programs stay attached (pinned) unless
        ``unpin``: then they are detached and every pin is removed."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for link in self._links:
            link.destroy()
        self._links.clear()
        for m in self.maps.values():
            m.close()
        self.maps = {}
        if self._obj is not None:
            self._obj.close()
            self._obj = None
        if unpin:
            cleanup(self.pin_dir, self.cgroup_path)
            if self.proxy_cgroup:
                wait_detached(self.proxy_cgroup)


# enum bpf_attach_type of every program in PROGRAMS (cgroup connect/sendmsg/recvmsg/getpeername, sockops,
# inet ingress)
ATTACH_TYPES = (10, 11, 14, 15, 19, 20, 29, 30, 3, 0, 21)


def cleanup(pin_dir: Path, cgroup_path: str | None = None, timeout_s: float = 5.0) -> list[str]:
    """Unpin everything under ``pin_dir``; a link goes with its last reference. The kernel
    releases a link asynchronously, so with ``cgroup_path`` this returns only once nothing is
    attached there any more."""
    removed = sorted(p.name for p in pin_dir.iterdir()) if pin_dir.exists() else []
    shutil.rmtree(pin_dir, ignore_errors=True)
    try:
        pin_dir.parent.rmdir()
    except OSError:
        pass
    if cgroup_path:
        wait_detached(cgroup_path, timeout_s)
    return removed


def wait_detached(cgroup_path: str, timeout_s: float = 5.0) -> None:
    """Returns once none of our program types is attached to ``cgroup_path`` (or it is gone)."""
    if not os.path.isdir(cgroup_path):
        return
    deadline = time.monotonic() + timeout_s
    while (left := sum(libbpf.attached_count(cgroup_path, t) for t in ATTACH_TYPES)) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"clean up datapath: {left} programs still attached to {cgroup_path} "
                               f"after {timeout_s}s (another process holds their links?)")
        time.sleep(0.01)
