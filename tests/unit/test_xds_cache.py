import pytest

from xds import model as xm
from xds import resources as r
from xds.cache import InconsistentSnapshotError, Snapshot, SnapshotCache

SVC = xm.HttpService("default/web:80", "10.244.0.1", 15001, (("10.244.0.2", 80),),
                    (xm.RbacPolicy("default/p#ingress[0]", ("10.244.0.3",), (xm.HttpRule("GET", "/.*"),)),))
L7 = r.l7_listener_name(*SVC.listen_key)  # its listener (one per proxy address)


def test_versions_are_content_hashes() -> None:
    a = Snapshot.of(r.build([SVC], "/tmp/a.log"))
    b = Snapshot.of(r.build([SVC], "/tmp/a.log"))
    assert a.versions == b.versions
    other = xm.HttpService(SVC.name, SVC.listen_ip, SVC.listen_port, (("10.244.0.9", 80),), SVC.policies)
    c = Snapshot.of(r.build([other], "/tmp/a.log"))
    assert c.versions[r.ENDPOINT] != a.versions[r.ENDPOINT]  # backends live in EDS
    assert all(c.versions[t] == a.versions[t] for t in (r.CLUSTER, r.LISTENER, r.ROUTE))


def test_wait_acked_sees_nack() -> None:
    cache = SnapshotCache()
    snap = Snapshot.of(r.build([SVC], "/tmp/a.log"))
    cache.set_snapshot("n", snap)
    for t in (r.CLUSTER, r.ENDPOINT, r.ROUTE):
        cache.record("n", t, acked=snap.versions[t])
    cache.record("n", r.LISTENER, nacked=snap.versions[r.LISTENER], error="bad regex")
    assert cache.wait_acked("n", snap, 0.1) is False
    assert cache.status("n")[r.LISTENER].error == "bad regex"
    cache.record("n", r.LISTENER, acked=snap.versions[r.LISTENER])
    assert cache.wait_acked("n", snap, 0.1) is True
    assert cache.status("n")[r.LISTENER].error == ""


def test_inconsistent_snapshot_is_refused_and_the_last_stays() -> None:
    cache = SnapshotCache()
    good = Snapshot.of(r.build([SVC], "/tmp/a.log"))
    cache.set_snapshot("n", good)
    res = r.build([SVC], "/tmp/a.log")
    del res[r.ROUTE][SVC.name]  # LDS names an RDS config that is not there
    with pytest.raises(InconsistentSnapshotError, match="Listener l7:10.244.0.1:15001 needs RouteConfiguration default/web:80"):
        cache.set_snapshot("n", Snapshot.of(res))
    assert cache.snapshot("n") is good


def test_one_service_change_touches_only_its_resources() -> None:
    other = xm.HttpService("default/api:80", "10.244.0.1", 15002, (("10.244.0.5", 80),), None)
    a = Snapshot.of(r.build([SVC, other], "/tmp/a.log"))
    moved = xm.HttpService(other.name, other.listen_ip, other.listen_port, (("10.244.0.6", 80),), None)
    b = Snapshot.of(r.build([SVC, moved], "/tmp/a.log"))
    changed = {(t, n) for t in r.TYPE_ORDER for n in b.resource_versions[t]
               if a.resource_versions[t].get(n) != b.resource_versions[t][n]}
    assert changed == {(r.ENDPOINT, other.name)}


def test_rbac_denies_with_cilium_body() -> None:
    lst = r.l7_chain(SVC, "/tmp/a.log")
    assert b"Access denied" in lst.SerializeToString()


def test_snapshot_reuses_unchanged_resources_of_the_previous_one() -> None:
    other = xm.HttpService("default/api:80", "10.244.0.1", 15002, (("10.244.0.5", 80),), None)
    res = r.build([SVC, other], "/tmp/a.log")
    a = Snapshot.of(res)
    res2 = {t: dict(items) for t, items in res.items()}
    res2[r.ENDPOINT][other.name] = r.endpoints(xm.Upstream(other.name, (("10.244.0.6", 80),)))
    b = Snapshot.of(res2, previous=a)
    assert b.entries[r.LISTENER][L7] is a.entries[r.LISTENER][L7]  # shared, not hashed again
    assert b.entries[r.ENDPOINT][other.name] is not a.entries[r.ENDPOINT][other.name]
    assert b.versions == Snapshot.of(res2).versions  # the same versions as built from scratch
    # the agent's case: every sync builds new objects; equal bytes are shared all the same
    c = Snapshot.of(r.build([SVC, other], "/tmp/a.log"), previous=a)
    assert all(c.entries[t][n] is a.entries[t][n] for t in c.entries for n in c.entries[t])
    # only bytes are kept; a resource is parsed back on demand
    assert not hasattr(c, "resources") and c.resource(r.LISTENER, L7) == res[r.LISTENER][L7]


def test_updated_snapshot_equals_one_built_from_scratch_and_stays_consistent() -> None:
    other = xm.HttpService("default/api:80", "10.244.0.1", 15002, (("10.244.0.5", 80),), None)
    a = Snapshot.of(r.build([SVC, other], "/tmp/a.log"))
    moved = xm.HttpService(other.name, other.listen_ip, other.listen_port, (("10.244.0.6", 80),), None)
    full = r.build([SVC, moved], "/tmp/a.log")
    b = a.updated({r.ENDPOINT: {other.name: full[r.ENDPOINT][other.name]}})
    assert b.versions == Snapshot.of(full).versions and not b.missing
    assert b.changed == {r.ENDPOINT: frozenset({other.name})}
    gap = a.updated({r.ROUTE: {other.name: None}})  # its listener still names it
    assert gap.problems() == [f"Listener {r.l7_listener_name(*other.listen_key)} needs RouteConfiguration {other.name}"]
    with pytest.raises(InconsistentSnapshotError):
        SnapshotCache().set_snapshot("n", gap)
    assert not gap.updated({r.ROUTE: {other.name: full[r.ROUTE][other.name]}}).missing  # filled again
