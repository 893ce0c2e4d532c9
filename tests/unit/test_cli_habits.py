"""What a user expects of any CLI, on `webb`: --version, shell completion, -o refusing what is not
implemented, markup in what others wrote printed literally, and `webb status` failing (exit 1) when
Envoy refused config, the agent reports errors, or the agent is not alive (a status.json made here,
as the agent writes it: mesh.status.AgentStatus)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mesh.cli import common
from mesh.cli.main import app
from mesh.status import AgentStatus, EnvoyTypeStatus, PodStatus

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def plain(out: str) -> str:
    """Output as one line: typer's error box (its borders, where it wrapped) taken away."""
    return " ".join(out.translate(str.maketrans("", "", "│╭╮╰╯─")).split())


def webb(*args: str, **kw: Any) -> Any:
    return runner.invoke(app, list(args), **kw)


# ---- --version ----
def test_version() -> None:
    res = webb("--version")
    assert res.exit_code == 0, res.output
    assert res.stdout == f"webb {metadata.version('webb')}\n"
    r = subprocess.run([sys.executable, "-m", "mesh.cli", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == res.stdout


def test_version_from_pyproject_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(common.metadata, "version", not_installed)  # the environment, not the code under test
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert webb("--version").stdout == f"webb {want}\n"


# ---- shell completion ----
def test_completion_is_on() -> None:
    assert "--install-completion" in webb("--help").stdout
    res = webb("--show-completion", "bash", prog_name="webb")
    assert res.exit_code == 0 and "_WEBB_COMPLETE=complete_bash" in res.stdout


@pytest.mark.parametrize(("words", "want"), [
    ("webb obs", ["observe"]),
    ("webb observe --verdict ", ["forwarded", "denied", "dropped", "audit", "failed"]),
    ("webb observe -o ", ["table", "wide", "json", "yaml"]),
    ("webb status -o ", ["text", "json", "yaml"]),
])
def test_completion_answers(words: str, want: list[str]) -> None:
    env = {"_WEBB_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
    res = webb(prog_name="webb", env=env)
    assert res.exit_code == 0 and res.stdout.split() == want, res.output


# ---- -o: only what is implemented ----
@pytest.mark.parametrize(("cmd", "bad", "choices"), [
    (["status"], "wide", "'text', 'json', 'yaml'"),
    (["status"], "table", "'text', 'json', 'yaml'"),
    (["status", "--kube", "in-cluster"], "wide", "'text', 'json', 'yaml'"),
    (["doctor"], "wide", "'table', 'json', 'yaml'"),
    (["certs"], "wide", "'table', 'json', 'yaml'"),
    (["certs", "ca"], "csv", "'table', 'json', 'yaml'"),
    (["observe"], "yml", "'table', 'wide', 'json', 'yaml'"),
])
def test_unimplemented_output_is_refused(tmp_path: Path, cmd: list[str], bad: str, choices: str) -> None:
    state = [] if cmd[0] == "doctor" else ["--state-dir", str(tmp_path)]
    res = webb(*cmd, *state, "-o", bad)
    assert res.exit_code == 2, res.output
    text = plain(res.stderr)
    assert f"'{bad}' is not one of {choices}" in text and "--output" in text
    assert res.stdout == ""


def test_certs_yaml(tmp_path: Path) -> None:
    from certs.ca import CertificateAuthority
    from certs.store import IdentityStore

    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "webb.test")
    IdentityStore(ca, tmp_path / "certs", ttl_s=3600).get("shop", "web")
    res = webb("certs", "--state-dir", str(tmp_path), "-o", "yaml")
    assert res.exit_code == 0, res.output
    assert [r["spiffe_id"] for r in yaml.safe_load(res.stdout)] == ["spiffe://webb.test/ns/shop/sa/web"]
    res = webb("certs", "ca", "--state-dir", str(tmp_path), "--output", "YAML")
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.stdout)["kind"] == "own root"


def test_certs_ca_error_is_literal(tmp_path: Path) -> None:
    res = webb("certs", "ca", "--dir", str(tmp_path / "[/red]x"))
    assert res.exit_code == 1 and "[/red]x" in plain(res.stderr)


# ---- webb status ----
def write_status(state: Path, **kw: Any) -> AgentStatus:
    st = AgentStatus(node="n1", running=True, pid=os.getpid(), updated=time.time(),
                     envoy={"Listener": EnvoyTypeStatus(sent="v2", acked="v2"), "Cluster": EnvoyTypeStatus(sent="v2", acked="v2")},
                     pods={"default/tiefighter": PodStatus(ip="10.244.0.2")})
    st.applied.plan_version, st.applied.envoy_version = "p1", "v2"
    for k, v in kw.items():
        setattr(st, k, v)
    st.write(state)
    return st


def status(state: Path, *args: str) -> Any:
    return webb("status", "--state-dir", str(state), *args)


def test_status_well_exits_0(tmp_path: Path) -> None:
    write_status(tmp_path)
    res = status(tmp_path)
    assert res.exit_code == 0, res.output
    out = plain(res.stdout)
    assert f"node n1: running (pid {os.getpid()}, status written" in out
    assert "Envoy Listener: sent v2 acked v2" in out and "pod default/tiefighter 10.244.0.2" in out
    assert res.stderr == ""


def test_status_nack_exits_1_and_shows_envoys_words_literally(tmp_path: Path) -> None:
    write_status(tmp_path, envoy={"Listener": EnvoyTypeStatus(sent="v3", acked="v2", nacked="v3",
                                                              error="listener [/red] :smile: [bold]bad")})
    res = status(tmp_path)
    assert res.exit_code == 1, res.output
    assert "REJECTED v3: listener [/red] :smile: [bold]bad" in plain(res.stdout)
    assert "unhealthy: Envoy rejected the Listener config (NACK): listener [/red] :smile: [bold]bad" in plain(res.stderr)


def test_status_a_nack_accepted_since_is_well(tmp_path: Path) -> None:
    write_status(tmp_path, envoy={"Listener": EnvoyTypeStatus(sent="v3", acked="v3", nacked="v3", error="old")})
    assert status(tmp_path).exit_code == 0


def test_status_errors_and_quarantine_exit_1(tmp_path: Path) -> None:
    write_status(tmp_path, errors=["Service default/[b]x[/b]: no backend"])
    res = status(tmp_path)
    assert res.exit_code == 1 and "error: Service default/[b]x[/b]: no backend" in plain(res.stdout)
    assert "the agent reports 1 error(s)" in plain(res.stderr)
    write_status(tmp_path, quarantined={"MeshPolicy default/rule1": "Envoy said no"})
    res = status(tmp_path)
    assert res.exit_code == 1 and "held at their last accepted version: MeshPolicy default/rule1" in plain(res.stderr)


def test_status_stopped_agent_exits_1(tmp_path: Path) -> None:
    write_status(tmp_path, running=False)
    res = status(tmp_path)
    assert res.exit_code == 1
    assert "node n1: stopped" in plain(res.stdout) and "the agent has stopped" in plain(res.stderr)


def test_status_dead_pid_exits_1(tmp_path: Path) -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    write_status(tmp_path, pid=p.pid)
    res = status(tmp_path)
    assert res.exit_code == 1
    assert "NOT ALIVE" in res.stdout
    assert f"the agent is gone: pid {p.pid} is not running" in plain(res.stderr)


def test_status_zombie_pid_is_not_alive(tmp_path: Path) -> None:
    p = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        write_status(tmp_path, pid=p.pid)
        res = status(tmp_path)
        assert res.exit_code == 1 and f"pid {p.pid} is not running" in plain(res.stderr)
    finally:
        p.wait()


def test_status_stale_file_exits_1(tmp_path: Path) -> None:
    write_status(tmp_path, updated=time.time() - 125)
    res = status(tmp_path)
    assert res.exit_code == 1
    assert f"the agent is not responding: pid {os.getpid()} is running, but status.json last written 2m 5s ago" in plain(res.stderr)


def test_status_json_and_yaml_stay_parseable_and_keep_the_exit_code(tmp_path: Path) -> None:
    write_status(tmp_path)
    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load), ("JSON", json.loads)):
        res = status(tmp_path, "-o", fmt)
        assert res.exit_code == 0, res.output
        assert load(res.stdout)["node"] == "n1"
    write_status(tmp_path, errors=["boom"])
    res = status(tmp_path, "--output", "yaml")
    assert res.exit_code == 1 and yaml.safe_load(res.stdout)["errors"] == ["boom"]
    assert "unhealthy" in res.stderr


def test_status_without_agent(tmp_path: Path) -> None:
    res = status(tmp_path / "[/red]")
    assert res.exit_code == 1 and "no agent status in" in res.stderr and "[/red]" in res.stderr


def test_status_node_name_is_literal(tmp_path: Path) -> None:
    write_status(tmp_path, node="[/red]n:smile:")
    res = status(tmp_path)
    assert res.exit_code == 0 and "node [/red]n:smile:: running" in res.stdout


# ---- errors of other commands: what a manifest says, printed literally ----
def test_apply_error_is_literal(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: 'x[/red]'}\nspec: {ports: [{port: 'no[/b]'}]}\n")
    res = webb("apply", "--dry-run", "-f", str(f))
    assert res.exit_code == 1
    assert "[/red]" in res.stderr and "Traceback" not in res.output
