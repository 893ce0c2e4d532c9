"""`webb certs` (identities of a node, from <state-dir>/certs) and `webb certs ca` (the CA), with
typer's CliRunner: table and JSON, expired/overdue marked (exit 1), the key mode checked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from certs.ca import CertificateAuthority
from certs.store import IdentityStore
from mesh.cli.main import app
from tests.unit.test_certs import make_intermediate

TD = "webb.test"
runner = CliRunner()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A node state dir whose store holds two identities, issued an hour ago with a 3 h life:
    renew at 2 h, expire at 3 h from issue (the clock of the test is the real one)."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    issued = time.time() - 3600
    store = IdentityStore(ca, tmp_path / "certs", ttl_s=3 * 3600, clock=lambda: issued)
    store.get("shop", "web")
    store.get("shop", "db")
    return tmp_path


def test_certs_lists_identities_table_and_json(state: Path) -> None:
    res = runner.invoke(app, ["certs", "--state-dir", str(state)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    for col in ("SPIFFE ID", "SERIAL", "NOT BEFORE", "NOT AFTER", "RENEW AT", "TIME LEFT", "STATE"):
        assert col in out
    assert f"spiffe://{TD}/ns/shop/sa/web" in out and f"spiffe://{TD}/ns/shop/sa/db" in out
    assert out.count(" ok") == 2 and ("1h 59m" in out or "2h 0m" in out)

    res = runner.invoke(app, ["certs", "--state-dir", str(state), "-o", "json"])
    rows = json.loads(res.output)
    assert [r["spiffe_id"] for r in rows] == [f"spiffe://{TD}/ns/shop/sa/db", f"spiffe://{TD}/ns/shop/sa/web"]
    r = rows[0]
    assert set(r) == {"spiffe_id", "serial", "not_before", "not_after", "renew_at", "time_left_s", "state"}
    assert r["state"] == "ok" and 7000 < r["time_left_s"] <= 7200
    assert abs(r["renew_at"] - (r["not_before"] + 2 / 3 * (r["not_after"] - r["not_before"]))) < 1e-3
    assert "PRIVATE KEY" not in res.output


def _age(state: Path, seconds: float) -> None:
    """Move every identity of the index ``seconds`` into the past."""
    index = state / "certs" / "identities.json"
    rows = json.loads(index.read_text())
    for r in rows:
        for k in ("not_before", "not_after", "renew_at"):
            r[k] -= seconds
    index.write_text(json.dumps(rows))


@pytest.mark.parametrize(("age_s", "state_name", "mark"), [(1.5 * 3600, "overdue", "OVERDUE"), (2.5 * 3600, "expired", "EXPIRED")])
def test_certs_marks_overdue_and_expired_and_exits_1(state: Path, age_s: float, state_name: str, mark: str) -> None:
    _age(state, age_s)
    res = runner.invoke(app, ["certs", "--state-dir", str(state)])
    assert res.exit_code == 1 and res.output.count(mark) == 2, res.output
    if state_name == "expired":
        assert "expired 30m" in res.output
    rows = json.loads(runner.invoke(app, ["certs", "--state-dir", str(state), "-o", "json"]).output)
    assert {r["state"] for r in rows} == {state_name}


def test_certs_without_identities(tmp_path: Path) -> None:
    res = runner.invoke(app, ["certs", "--state-dir", str(tmp_path)])
    assert res.exit_code == 0 and "no identities in" in res.output
    assert json.loads(runner.invoke(app, ["certs", "--state-dir", str(tmp_path), "-o", "json"]).output) == []


def test_certs_ca_own_root(state: Path) -> None:
    res = runner.invoke(app, ["certs", "ca", "--dir", str(state / "ca")])
    assert res.exit_code == 0, res.output
    assert f"CN=webb root CA {TD}" in res.output and "own root" in res.output and "mode 0600" in res.output
    facts = json.loads(runner.invoke(app, ["certs", "ca", "--state-dir", str(state), "-o", "json"]).output)  # default dir
    assert facts["kind"] == "own root" and facts["key_mode"] == "0600" and facts["problems"] == []
    assert 3640 * 86400 < facts["time_left_s"] <= 3650 * 86400


def test_certs_ca_user_intermediate_and_bad_key_mode(tmp_path: Path) -> None:
    d = make_intermediate(tmp_path / "ca")
    res = runner.invoke(app, ["certs", "ca", "--dir", str(d), "-o", "json"])
    facts = json.loads(res.output)
    assert res.exit_code == 0 and facts["kind"] == "intermediate (user-supplied)"
    assert facts["subject"] == "CN=corp mesh intermediate" and facts["roots"] == ["CN=corp root"]

    (d / "ca.key").chmod(0o644)
    res = runner.invoke(app, ["certs", "ca", "--dir", str(d)])
    assert res.exit_code == 1
    assert "mode 0644" in res.output and f"(fix: chmod 600 {d / 'ca.key'})" in res.output, res.output


def test_certs_ca_missing(tmp_path: Path) -> None:
    res = runner.invoke(app, ["certs", "ca", "--dir", str(tmp_path / "none")])
    assert res.exit_code == 1 and "no CA in" in res.output
    assert not (tmp_path / "none").exists()  # read-only: nothing was created
