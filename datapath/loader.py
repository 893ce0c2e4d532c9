"""Loads the socket programs, attaches them to a cgroup and keeps their maps in sync."""

from __future__ import annotations

import struct
from pathlib import Path

from datapath import libbpf
from datapath.maps import COUNTER_KEY, LAYOUT, DatapathState, FlowEvent, Reason, check_layout

OBJECT_PATH = Path(__file__).parent / "bpf" / "sock.bpf.o"
PROGRAMS = ("webb_sock4_connect", "webb_sock4_sendmsg", "webb_sock4_recvmsg", "webb_sock4_getpeername")
# make-before-break: a service entry is written after its backends and removed before them
_WRITE_ORDER = ("webb_backends", "webb_endpoints", "webb_cgroups", "webb_policy", "webb_services")


class Datapath:
    """Owns one loaded copy of the socket programs attached to ``cgroup_path``."""

    def __init__(self, cgroup_path: str, object_path: Path = OBJECT_PATH) -> None:
        if not object_path.exists():
            raise FileNotFoundError(f"load datapath: {object_path} is missing; build it with 'make bpf'")
        self.cgroup_path = cgroup_path
        self._obj = libbpf.BpfObject(str(object_path))
        self._links: list[libbpf.Link] = []
        self._ring: libbpf.RingBuffer | None = None
        self._pending: list[FlowEvent] = []
        try:
            self._obj.load()
            check_layout(self._obj)
            self.maps = {name: self._obj.map(name) for name in LAYOUT}
            for prog in PROGRAMS:
                self._links.append(self._obj.program(prog).attach_cgroup(cgroup_path))
            self._ring = libbpf.RingBuffer(self._obj.map("webb_events"), self._on_event)
        except BaseException:
            self.close()
            raise

    def _on_event(self, raw: bytes) -> None:
        self._pending.append(FlowEvent.decode(raw))

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

    def reason_counts(self) -> dict[Reason, int]:
        m = self.maps["webb_reason_counts"]
        out: dict[Reason, int] = {}
        for reason in Reason:
            raw = m.lookup(COUNTER_KEY.pack(int(reason))) or b""
            out[reason] = sum(v for (v,) in struct.iter_unpack("=Q", raw))
        return out

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for link in self._links:
            link.destroy()
        self._links.clear()
        self._obj.close()
