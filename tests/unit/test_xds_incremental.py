"""The incremental translator makes what the builders make, and builds again only what changed."""

from __future__ import annotations

from dataclasses import replace

from xds import model as xm
from xds import resources as r
from xds.cache import Snapshot
from xds.incremental import Translator

LOG = "/tmp/a.log"


def _services(n: int) -> list[xm.HttpService]:
    pol = (xm.RbacPolicy("default/p#ingress[0]", ("10.244.0.3",), (xm.HttpRule("GET", "/.*"),)),)
    return [xm.HttpService(f"default/s{i}:80", "10.244.0.1", 15001, ((f"10.244.1.{i}", 8080),), pol if i % 2 else None,
                           listen_ip6="fd00::1" if i == 3 else "", match_ips=(f"10.96.0.{i + 1}",), match_port=80)
            for i in range(n)]


def _upstreams(svcs: list[xm.HttpService]) -> list[xm.Upstream]:
    return [xm.Upstream(s.name, s.backends) for s in svcs]


def _same(a: Snapshot, b: Snapshot) -> None:
    """The same resources (compared as messages: the listener's field order differs on the wire)."""
    assert {t: set(v) for t, v in a.entries.items()} == {t: set(v) for t, v in b.entries.items()}
    for t, names in a.entries.items():
        for n in names:
            assert a.resource(t, n) == b.resource(t, n), (t, n)
    assert not a.missing and not b.missing


def test_translator_makes_what_the_builders_make() -> None:
    svcs = _services(6)
    tr = Translator(LOG)
    snap = tr.snapshot(svcs, _upstreams(svcs))
    _same(snap, Snapshot.of(r.build(svcs, LOG, _upstreams(svcs))))
    (name,) = snap.entries[r.LISTENER]
    assert snap.entries[r.LISTENER][name].needs == ((r.ROUTE, frozenset(s.name for s in svcs)),)


def test_a_change_builds_only_what_it_changes() -> None:
    svcs = _services(50)
    tr = Translator(LOG)
    first = tr.snapshot(svcs, _upstreams(svcs))
    assert tr.built == 50 * 3 + 1  # clusters, endpoints, routes, and the one listener
    again = tr.snapshot(svcs, _upstreams(svcs))
    assert tr.built == 0 and again.versions == first.versions
    # one service's RBAC rule: its route only (the rules ride with the routes)
    p = (xm.RbacPolicy("default/p#ingress[0]", ("10.244.0.3",), (xm.HttpRule("POST", "/x"),)),)
    changed = [replace(s, policies=p) if s.name == "default/s7:80" else s for s in svcs]
    snap = tr.snapshot(changed, _upstreams(changed))
    assert tr.built == 1
    assert [t for t in r.TYPE_ORDER if snap.versions[t] != first.versions[t]] == [r.ROUTE]
    _same(snap, Snapshot.of(r.build(changed, LOG, _upstreams(changed))))
    # one service's backends: its cluster and endpoints (the whole Upstream is the key)
    ups = [replace(u, backends=(("10.244.9.9", 8080),)) if u.name == "default/s3:80" else u for u in _upstreams(changed)]
    tr.snapshot(changed, ups)
    assert tr.built == 2
    # a new service: its resources, and the listener with one more chain (the others' bytes reused)
    more = [*changed, *_services(51)[50:]]
    snap = tr.snapshot(more, [*ups, *_upstreams(more)[50:]])
    assert tr.built == 4
    _same(snap, Snapshot.of(r.build(more, LOG, [*ups, *_upstreams(more)[50:]])))
