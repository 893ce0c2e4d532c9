"""Incremental xDS against the real Envoy: only what changed travels, removals arrive, and a
reconnect (an agent restart) resends nothing Envoy already holds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from xds import model as xm
from xds import resources as r
from xds.cache import Snapshot
from xds.server import XdsServer

from .conftest import NODE, Plane, call, free_port

pytestmark = pytest.mark.envoy


def _services(backend: int, ports: list[int], extra_backend: bool = False) -> list[xm.HttpService]:
    out = []
    for i, port in enumerate(ports):
        backends = (("127.0.0.1", backend),) + ((("127.0.0.2", backend),) if extra_backend and i == 0 else ())
        out.append(xm.HttpService(f"default/svc{i}:80", "127.0.0.1", port, backends, None))
    return out


def _sent(plane: Plane) -> int:
    return plane.server.counts[f"{'delta' if plane.delta else 'sotw'}_resources"]


def _listeners(plane: Plane) -> set[str]:
    return {entry["name"] for entry in json.loads(plane.envoy.admin("/listeners?format=json"))["listener_statuses"]}


def test_one_endpoint_change_sends_one_resource(plane: Plane, backend: int, tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    log = str(tmp_path / "access.jsonl")
    snap = Snapshot.of(r.build(_services(backend, ports), log))
    plane.cache.set_snapshot(NODE, snap)
    assert plane.cache.wait_acked(NODE, snap, 10)
    assert all(call(p, "GET", "/")[0] == 200 for p in ports)
    before = _sent(plane)
    full = r.build(_services(backend, ports, extra_backend=True), log)
    changed = snap.updated({r.ENDPOINT: {"default/svc0:80": full[r.ENDPOINT]["default/svc0:80"]}})
    assert changed.versions == Snapshot.of(full).versions
    assert [t for t in r.TYPE_ORDER if changed.versions[t] != snap.versions[t]] == [r.ENDPOINT]
    plane.cache.set_snapshot(NODE, changed)
    assert plane.cache.wait_acked(NODE, changed, 10)
    # delta sends the one changed ClusterLoadAssignment; state of the world all three
    assert _sent(plane) - before == (1 if plane.delta else 3)
    before = _sent(plane)
    back = changed.updated({r.ENDPOINT: {"default/svc0:80": snap.resource(r.ENDPOINT, "default/svc0:80")}})
    plane.cache.set_snapshot(NODE, back)
    assert back.versions == snap.versions and plane.cache.wait_acked(NODE, back, 10)
    assert _sent(plane) - before == (1 if plane.delta else 3)
    assert all(call(p, "GET", "/")[0] == 200 for p in ports)


def test_removed_service_leaves_envoy(plane: Plane, backend: int, tmp_path: Path) -> None:
    ports = [free_port() for _ in range(2)]
    log = str(tmp_path / "access.jsonl")
    both = Snapshot.of(r.build(_services(backend, ports), log))
    plane.cache.set_snapshot(NODE, both)
    assert plane.cache.wait_acked(NODE, both, 10)
    names = [r.l7_listener_name("127.0.0.1", p) for p in ports]  # one per proxy address: a port each here
    assert _listeners(plane) == set(names)
    one = Snapshot.of(r.build(_services(backend, ports[:1]), log))
    plane.cache.set_snapshot(NODE, one)
    assert plane.cache.wait_acked(NODE, one, 10)
    deadline = time.monotonic() + 5
    while _listeners(plane) != {names[0]}:
        assert time.monotonic() < deadline, _listeners(plane)
        time.sleep(0.05)
    assert call(ports[0], "GET", "/")[0] == 200


def test_reconnect_resends_nothing_envoy_holds(plane: Plane, backend: int, tmp_path: Path) -> None:
    """The agent restarts (new xDS server, same socket, same snapshot): a delta Envoy reports the
    versions it holds and gets nothing again; state of the world must resend everything."""
    ports = [free_port() for _ in range(3)]
    snap = Snapshot.of(r.build(_services(backend, ports), str(tmp_path / "access.jsonl")))
    plane.cache.set_snapshot(NODE, snap)
    assert plane.cache.wait_acked(NODE, snap, 10)
    directory = plane.server.dir
    plane.server.stop(grace_s=0)
    plane.server = XdsServer(plane.cache, directory)  # the socket Envoy's bootstrap names
    assert plane.server.path == plane.envoy.cfg.xds_socket
    plane.server.start()
    deadline = time.monotonic() + 15
    kind = "delta" if plane.delta else "sotw"
    while plane.server.counts[f"{kind}_responses"] < 2:  # Envoy has reconnected and subscribed
        assert time.monotonic() < deadline, "Envoy did not reconnect"
        time.sleep(0.05)
    time.sleep(0.5)
    assert _sent(plane) == (0 if plane.delta else 12)
    assert all(call(p, "GET", "/")[0] == 200 for p in ports)
