"""The flows `webb hubble serve` serves: every node's flow file (``<state-dir>/flows.jsonl``, and the
rotated ``flows.jsonl.1`` once at start), tailed into one ring buffer of flow.Flow, as a Hubble server
keeps one. Several state dirs make one view over several nodes, as Hubble Relay gives.

The files are followed as `webb observe -f` follows them (mesh.cli.observe.FlowFile): each poll reads
only the bytes added since the last, across rotation and truncation; nothing is re-read. Each record is
converted once, when read. Followers (GetFlows with follow) wait on a condition and take what came
after the last sequence number they saw; one that fell behind the ring is told how many it lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.cli.observe import FlowFile, first_flows, parse
from mesh.cli.status import liveness
from mesh.hubble.convert import to_flow
from mesh.status import AgentStatus

log = logging.getLogger(__name__)
MAX_FLOWS = 4095  # Hubble's default ring buffer (hubble-event-buffer-capacity)
POLL_S = 0.2


@dataclass
class Node:
    """One node's state dir and its flow file's tail."""

    name: str
    state_dir: Path
    tail: FlowFile
    seen: int = 0  # flows read from its files
    skipped: int = 0  # records that were not flows (torn, foreign, unconvertible)
    started: float = field(default_factory=time.time)

    def status(self) -> AgentStatus | None:
        return AgentStatus.read(self.state_dir)

    def available(self) -> bool:
        st = self.status()
        return st is not None and liveness(st, time.time()) is None


def node_names(state_dirs: list[Path]) -> list[str]:
    """Each dir's node as its agent named it (status.json), else the dir's name; unique."""
    out: list[str] = []
    for d in state_dirs:
        st = AgentStatus.read(d)
        name = (st.node if st and st.node else "") or d.resolve().name or "node"
        base, n = name, 2
        while name in out:
            name, n = f"{base}-{n}", n + 1
        out.append(name)
    return out


class Store:
    """A ring buffer of (sequence number, node, flow.Flow), fed by one polling thread."""

    def __init__(self, state_dirs: list[Path], max_flows: int = MAX_FLOWS, poll_s: float = POLL_S) -> None:
        if not state_dirs:
            raise ValueError("no state dir to read flows from")
        self.nodes = [Node(n, d, FlowFile(d / "flows.jsonl")) for n, d in zip(node_names(state_dirs), state_dirs, strict=True)]
        self.max_flows = max_flows
        self.poll_s = poll_s
        self.ring: deque[tuple[int, str, Any]] = deque(maxlen=max_flows)
        self.seq = 0  # flows ever taken in (Hubble's seen_flows)
        self.cond = threading.Condition()
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- reading ----
    def _convert(self, node: Node, docs: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        out = []
        for doc in docs:
            try:
                out.append((node.name, to_flow(doc, node.name)))
            except (ValueError, TypeError, AttributeError, OverflowError) as e:
                node.skipped += 1
                log.debug("%s: a record that is not a flow: %s", node.name, e)
        node.seen += len(out)
        return out

    def _add(self, flows: list[tuple[str, Any]]) -> None:
        if not flows:
            return
        with self.cond:
            for name, fl in flows:
                self.seq += 1
                self.ring.append((self.seq, name, fl))
            self.cond.notify_all()

    def load_history(self) -> None:
        """What the files hold now, oldest first across nodes (each tail is left at its file's end)."""
        history: list[tuple[str, Any]] = []
        for node in self.nodes:
            history += self._convert(node, first_flows(node.tail))
        history.sort(key=lambda nf: nf[1].time.ToNanoseconds())
        self._add(history[-self.max_flows:])

    def poll(self) -> int:
        """Read what every file gained since the last poll; how many flows came."""
        new: list[tuple[str, Any]] = []
        for node in self.nodes:
            new += self._convert(node, parse(node.tail.lines()))
        self._add(new)
        return len(new)

    def start(self) -> None:
        self.load_history()
        self._thread = threading.Thread(target=self._run, name="hubble-tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except OSError as e:  # a state dir gone or unreadable: keep serving what was read
                log.warning("reading flows: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for node in self.nodes:
            node.tail.close()
        with self.cond:
            self.cond.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ---- serving ----
    def snapshot(self) -> list[tuple[int, str, Any]]:
        with self.cond:
            return list(self.ring)

    def snapshot_at(self) -> tuple[list[tuple[int, str, Any]], int]:
        """The ring, and the sequence number of its last flow (taken together: a follower goes on from there)."""
        with self.cond:
            return list(self.ring), self.seq

    def after(self, seq: int, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> tuple[list[tuple[int, str, Any]], int]:
        """The flows that came after sequence number ``seq`` (waiting up to ``timeout_s`` for one),
        and how many of them the ring no longer holds (lost to a reader that fell behind)."""
        with self.cond:
            if self.seq <= seq and alive() and not self.stopped:
                self.cond.wait(timeout_s)
            if self.seq <= seq:
                return [], 0
            newer: list[tuple[int, str, Any]] = []
            for entry in reversed(self.ring):
                if entry[0] <= seq:
                    break
                newer.append(entry)
            newer.reverse()
            lost = (newer[0][0] - seq - 1) if newer else self.seq - seq
            return newer, lost

    def counts(self) -> tuple[int, int]:
        """(flows in the ring, flows ever seen)."""
        with self.cond:
            return len(self.ring), self.seq

    def uptime_ns(self) -> int:
        return int((time.monotonic() - self.started) * 1e9)
