from xds import resources as r
from xds.cache import Snapshot, SnapshotCache

SVC = r.HttpService("default/web:80", "10.244.0.1", 15001, (("10.244.0.2", 80),),
                    (r.RbacPolicy("default/p#ingress[0]", ("10.244.0.3",), (r.HttpRule("GET", "/.*"),)),))


def test_versions_are_content_hashes() -> None:
    a = Snapshot.of(r.build([SVC], "/tmp/a.log"))
    b = Snapshot.of(r.build([SVC], "/tmp/a.log"))
    assert a.versions == b.versions
    other = r.HttpService(SVC.name, SVC.listen_ip, SVC.listen_port, (("10.244.0.9", 80),), SVC.policies)
    c = Snapshot.of(r.build([other], "/tmp/a.log"))
    assert c.versions[r.CLUSTER] != a.versions[r.CLUSTER]
    assert c.versions[r.LISTENER] == a.versions[r.LISTENER]


def test_wait_acked_sees_nack() -> None:
    cache = SnapshotCache()
    snap = Snapshot.of(r.build([SVC], "/tmp/a.log"))
    cache.set_snapshot("n", snap)
    cache.record("n", r.CLUSTER, acked=snap.versions[r.CLUSTER])
    cache.record("n", r.LISTENER, nacked=snap.versions[r.LISTENER], error="bad regex")
    assert cache.wait_acked("n", snap, 0.1) is False
    assert cache.status("n")[r.LISTENER].error == "bad regex"
    cache.record("n", r.LISTENER, acked=snap.versions[r.LISTENER])
    assert cache.wait_acked("n", snap, 0.1) is True
    assert cache.status("n")[r.LISTENER].error == ""


def test_rbac_denies_with_cilium_body() -> None:
    lst = r.listener(SVC, "/tmp/a.log")
    assert b"Access denied" in lst.SerializeToString()
