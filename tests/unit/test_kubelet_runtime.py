"""The kubelet pod runtime finds pods' cgroups where kubelet makes them (a directory tree here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mesh.model import Pod
from mesh.runtime.kubelet import KubeletRuntime

UID = "0b7e6f0e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"


def _pod(name: str, uid: str, qos: str) -> Pod:
    return Pod("shop", name, ip="10.120.0.5", node="kn1", uid=uid, qos=qos)


def test_cgroupfs_layout_by_qos_class(tmp_path: Path) -> None:
    rt = KubeletRuntime("kn1", tmp_path)
    burst = tmp_path / "kubepods" / "burstable" / f"pod{UID}"
    guaranteed = tmp_path / "kubepods" / "pod1111"
    for d in (burst, guaranteed, burst / "ctr-pause", burst / "ctr-app"):
        d.mkdir(parents=True)
    rt.setup()
    v0 = rt.version()
    pods = (_pod("web", UID, "Burstable"), _pod("db", "1111", "Guaranteed"), _pod("new", "2222", "BestEffort"))
    assert rt.run(pods) == pods  # kubelet runs them; nothing is started
    found = rt.cgroups()
    assert found == {os.stat(burst).st_ino: "shop/web", os.stat(guaranteed).st_ino: "shop/db"}  # the pod level, not a container
    assert rt.status()["shop/new"].cgroup == ""  # not made yet: no identity (fail closed)
    (tmp_path / "kubepods" / "besteffort" / "pod2222").mkdir(parents=True)
    assert rt.version() != v0  # kubelet made a pod cgroup: the agent syncs again
    assert "shop/new" in rt.cgroups().values()


def test_systemd_layout(tmp_path: Path) -> None:
    rt = KubeletRuntime("kn1", tmp_path, driver="systemd")
    d = tmp_path / "kubepods.slice" / "kubepods-burstable.slice" / f"kubepods-burstable-pod{UID.replace('-', '_')}.slice"
    d.mkdir(parents=True)
    rt.run((_pod("web", UID, ""),))  # no QoS class known yet: every class is tried
    assert rt.cgroups() == {os.stat(d).st_ino: "shop/web"}


def test_missing_kubelet_cgroup_is_named(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="kubepods does not exist: is kubelet running"):
        KubeletRuntime("kn1", tmp_path).setup()
    with pytest.raises(ValueError, match="--cgroup-driver 'cgroupv1'"):
        KubeletRuntime("kn1", tmp_path, driver="cgroupv1")


@pytest.mark.root
def test_the_service_cidr_is_blackholed_kept_for_an_upgrade_and_only_webbs_is_removed(tmp_path: Path) -> None:
    from pyroute2 import IPRoute

    from mesh.runtime.kubelet import _blackholes

    (tmp_path / "kubepods").mkdir()
    mine, theirs = "10.199.77.0/24", "10.199.78.0/24"
    with IPRoute() as ipr:
        ipr.route("add", dst=theirs, type="blackhole")  # someone else's (the node's installer, a test harness)
        try:
            rt = KubeletRuntime("kn1", tmp_path, service_cidrs=[mine, theirs])
            rt.setup()
            assert _blackholes(ipr, mine) and _blackholes(ipr, theirs)
            rt.teardown(keep=True)  # an upgrade: the next agent finds the node as it was
            assert _blackholes(ipr, mine) and _blackholes(ipr, theirs)
            nxt = KubeletRuntime("kn1", tmp_path, service_cidrs=[mine, theirs])
            nxt.setup()  # adopts: adds nothing
            assert len(_blackholes(ipr, mine)) == 1
            nxt.teardown()  # Webb leaves the node: its route goes, even though this agent did not add it
            assert not _blackholes(ipr, mine) and _blackholes(ipr, theirs)
        finally:
            for cidr in (mine, theirs):
                for proto in _blackholes(ipr, cidr):
                    ipr.route("del", dst=cidr, type="blackhole", proto=proto)
    assert rt.proxy_cgroups() == ()  # this test runs outside kubelet's pods
