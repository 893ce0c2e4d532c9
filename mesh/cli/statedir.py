"""Which node(s) a ``--state-dir`` names, which manifest directory their agent reads, and waiting
for them to apply it (with progress).

`webb agent --state-dir D` writes ``D/status.json`` and, by default, reads ``D/manifests``; `webb
wire up` gives every node ``<root>/<node>`` and one ``<root>/manifests`` they share (their
``--manifests``). So `webb apply` takes:

* a node's state dir (``status.json`` in it): that node; its manifests are ``D/manifests``, or the
  parent's ``manifests`` when only that exists (a wire node);
* the directory above the nodes: with a ``manifests`` directory of its own, that one and every node
  under it (a wire root); else, when exactly one node is under it, that node (and it says so);
* a directory with neither (the agent has not started yet): ``D/manifests``.

What does not fit (several nodes and no shared manifests, or a directory inside a node's state
dir) is refused saying what was found, never "is `webb agent` running?" when it runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from mesh.cli.common import err
from mesh.cli.status import liveness
from mesh.source import directory_version
from mesh.status import STATUS_FILE, AgentStatus

POLL_S = 0.05


class StateDirError(Exception):
    """The state dir does not name a node here; the message says what was found."""


@dataclass(frozen=True)
class Target:
    manifests: Path
    nodes: tuple[Path, ...]  # node state dirs to wait for (one, with no status.json yet, before the agent starts)
    note: str = ""  # what was picked, when it was not the directory given


def node_name(d: Path) -> str:
    """The node's name as its agent reported it (else the directory's name)."""
    st = AgentStatus.read(d)
    return st.node if st is not None and st.node else d.name


def _is_node(d: Path) -> bool:
    return (d / STATUS_FILE).is_file()


def _children(d: Path) -> list[Path]:
    try:
        return sorted(c for c in d.iterdir() if c.is_dir() and _is_node(c))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _manifests_of(node: Path) -> Path:
    """The node's manifest directory: its own, or the parent's one its wire shares; when both exist,
    the one whose version the agent last applied."""
    own, shared = node / "manifests", node.parent / "manifests"
    if not shared.is_dir():
        return own
    if not own.is_dir():
        return shared
    st = AgentStatus.read(node)
    applied = st.applied_manifests() if st is not None else ""
    return shared if applied and applied == directory_version(shared) != directory_version(own) else own


def resolve(state_dir: Path) -> Target:
    d = state_dir
    if _is_node(d):
        return Target(_manifests_of(d), (d,))
    nodes = _children(d)
    if nodes and (d / "manifests").is_dir():
        mine = tuple(n for n in nodes if _manifests_of(n) == d / "manifests")
        if mine:
            names = ", ".join(node_name(n) for n in mine)
            return Target(d / "manifests", mine, f"{d}/manifests, read by node(s) {names}")
    if len(nodes) == 1:
        node = nodes[0]
        name = node_name(node)
        return Target(_manifests_of(node), (node,), f"node {name}: {node} (the only node state dir in {d})")
    if nodes:
        listed = ", ".join(n.name for n in nodes)
        raise StateDirError(f"{d} holds the state dirs of {len(nodes)} nodes ({listed}) and no manifests directory "
                            f"they share: give one, e.g. --state-dir {nodes[0]}")
    if d.name == "manifests" and any(d.glob("*.y*ml")):
        raise StateDirError(f"{d} is a manifests directory (manifest files, no {STATUS_FILE}): give the agent's "
                            "state dir, the directory above it")
    for up in list(d.resolve().parents)[:3]:
        if _is_node(up):
            raise StateDirError(f"{d} is inside the state dir of node {node_name(up)} ({up} holds its "
                                f"{STATUS_FILE}): use --state-dir {up}")
    return Target(d / "manifests", (d,))


# ---- waiting for the agents ----
def _why_not(node: Path, want: str, waited: float, first: dict[Path, str]) -> str:
    st = AgentStatus.read(node)
    if st is None:
        return f"no agent status in {node} after {waited:.1f}s: is `webb agent --state-dir {node}` running?"
    why = liveness(st, time.time())
    if why:
        return f"node {st.node} ({node}): {why}"
    have = st.applied_manifests() or "none"
    stuck = first.get(node) == st.applied.source_version
    hint = " (its version did not move while we waited: does it read another --manifests directory?)" if stuck else ""
    return (f"node {st.node} (pid {st.pid}) is running but has applied manifests version {have}, not {want}, "
            f"after {waited:.1f}s{hint}; see {node / STATUS_FILE}")


def wait_applied(target: Target, timeout_s: float) -> dict[Path, AgentStatus]:
    """Until every node of ``target`` reports the manifest directory's current version as applied; their
    status. A spinner on stderr while it waits (a terminal only) and a line when done; TimeoutError naming
    what each node that did not get there shows."""
    want = directory_version(target.manifests)
    start = time.monotonic()
    deadline = start + timeout_s
    first = {n: st.applied.source_version for n in target.nodes if (st := AgentStatus.read(n)) is not None}
    done: dict[Path, AgentStatus] = {}
    status = err.status(escape(f"waiting for the agent to apply manifests {want}"), spinner="dots") if err.is_terminal else None
    if status is not None:
        status.start()
    try:
        while True:
            for n in target.nodes:
                st = AgentStatus.read(n)
                if st is not None and st.applied_manifests() == want:
                    done[n] = st
            left = [n for n in target.nodes if n not in done]
            if not left:
                break
            waited = time.monotonic() - start
            if time.monotonic() >= deadline:
                raise TimeoutError("; ".join(_why_not(n, want, waited, first) for n in left))
            if status is not None:
                names = ", ".join(node_name(n) for n in left)
                status.update(escape(f"waiting for node {names} to apply manifests {want} ({waited:.1f}s of {timeout_s:g}s)"))
            time.sleep(POLL_S)
    finally:
        if status is not None:
            status.stop()
    names = ", ".join(st.node or n.name for n, st in done.items())
    err.print(escape(f"node {names} applied manifests {want} ({time.monotonic() - start:.2f}s)"), highlight=False)
    return done


def node_of(state_dir: Path, node: str | None) -> tuple[str, Path]:
    """(node name, its state dir) for a command run on one node (`webb exec`): the node ``state_dir``
    names (its status.json says which), or the one under it; ``node`` picks among several, or is
    checked against the one named. No agent status anywhere: ``node`` (default node1) in ``state_dir``."""
    if _is_node(state_dir):
        have = node_name(state_dir)
        if node and node != have:
            raise StateDirError(f"{state_dir} is the state dir of node {have}, not {node}: drop --node, or give "
                                f"that node's state dir")
        return have, state_dir
    nodes = _children(state_dir)
    if node:
        for n in nodes:
            if node in (node_name(n), n.name):
                return node, n
        if nodes:
            raise StateDirError(f"no node {node} in {state_dir}; its nodes: {', '.join(node_name(n) for n in nodes)}")
        return node, state_dir
    if len(nodes) == 1:
        return node_name(nodes[0]), nodes[0]
    if nodes:
        raise StateDirError(f"{state_dir} holds {len(nodes)} nodes ({', '.join(node_name(n) for n in nodes)}): "
                            f"give --node, or --state-dir {nodes[0]}")
    return "node1", state_dir
