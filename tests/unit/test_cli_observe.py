"""`webb observe` on flows files made here, as the agent writes them (``<state-dir>/flows.jsonl``,
rotated to ``flows.jsonl.1``: mesh.agent.flows.FlowLog): what a flow holds printed literally (never
as rich markup), --verdict/--layer in any case and checked, -o only what is implemented, and -f
following a file that grows, is rotated and is truncated (a real ``python -m mesh.cli`` process,
stopped with Ctrl-C)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from mesh.cli.main import app
from mesh.cli.observe import FlowFile

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0
runner = CliRunner()


def flow(n: int, **kw: Any) -> dict[str, Any]:
    f: dict[str, Any] = {"time": T0 + n, "layer": "L4", "protocol": "TCP", "src": "default/tiefighter",
                         "dst": "10.96.0.10:80", "service": "deathstar.default", "dst_pod": "default/deathstar",
                         "verdict": "forwarded", "reason": "service-lb", "n": n}
    f.update(kw)
    return f


def l7(n: int, path: str, **kw: Any) -> dict[str, Any]:
    return flow(n, **{"layer": "L7", "method": "GET", "path": path, "status": 200, "reason": "l7-forwarded", **kw})


def write(path: Path, flows: list[dict[str, Any]], mode: str = "a") -> None:
    with open(path, mode) as f:
        f.write("".join(json.dumps(x, sort_keys=True) + "\n" for x in flows))


@pytest.fixture
def state(tmp_path: Path) -> Path:
    write(tmp_path / "flows.jsonl.1", [flow(0, verdict="dropped", reason="no-backend", why="no backend")])
    write(tmp_path / "flows.jsonl", [
        l7(1, "/a[blink]b"),
        l7(2, "[/red]", verdict="denied", status=403, reason="l7-policy-denied", policy="default/rule1",
           why="no HTTP rule allows GET [/red]: [bold]rule1 :smile: allows POST /v1/[x]"),
        flow(3, src="default/xwing", verdict="DENIED", reason="policy-denied", why="xwing [red]not allowed"),
        flow(4, src="default/[i]odd[/i]", verdict="audit", reason="audit", policy="default/rule1"),
        l7(5, "/v1/request-landing", src="default/tiefighter"),
    ])
    return tmp_path


def observe(state: Path, *args: str) -> Any:
    return runner.invoke(app, ["observe", "--state-dir", str(state), *args])


def plain(out: str) -> str:
    """An error as one line: typer's box (its borders, where it wrapped) taken away."""
    return " ".join(out.translate(str.maketrans("", "", "│╭╮╰╯─")).split())


def lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.strip()]


# ---- markup-safe ----
def test_user_text_is_printed_literally_never_as_markup(state: Path) -> None:
    res = observe(state)
    assert res.exit_code == 0, res.output
    out = lines(res.stdout)
    assert len(out) == 6
    assert "GET /a[blink]b 200" in out[1]
    assert "GET [/red] 403" in out[2]  # was: rich.errors.MarkupError (closing tag with nothing to close)
    assert "no HTTP rule allows GET [/red]: [bold]rule1 :smile: allows POST /v1/[x]" in out[2]
    assert "xwing [red]not allowed" in out[3] and "DENIED" in out[3]
    assert "default/[i]odd[/i] -> deathstar.default (default/deathstar) L4 AUDIT audit" in out[4]
    assert "😄" not in res.stdout


def test_wide_shows_date_and_the_other_fields_literally(state: Path) -> None:
    res = observe(state, "-o", "wide", "--last", "3")
    assert res.exit_code == 0, res.output
    out = lines(res.stdout)
    assert len(out) == 3
    day = time.strftime("%Y-%m-%d", time.localtime(T0 + 3))
    assert out[0].startswith(day) and " protocol=TCP" in out[0]
    assert "policy=default/rule1" in out[1] and "default/[i]odd[/i]" in out[1]


# ---- filters ----
@pytest.mark.parametrize(("given", "want"), [("forwarded", [1, 5]), ("FORWARDED", [1, 5]), ("Dropped", [0]),
                                             ("denied", [2, 3]), ("DENIED", [2, 3]), ("audit", [4]), ("Failed", [])])
def test_verdict_in_any_case(state: Path, given: str, want: list[int]) -> None:
    res = observe(state, "--verdict", given, "-o", "json")
    assert res.exit_code == 0, res.output
    assert [json.loads(ln)["n"] for ln in lines(res.stdout)] == want


def test_unknown_verdict_is_refused_with_the_choices(state: Path) -> None:
    res = observe(state, "--verdict", "allowed")
    assert res.exit_code == 2
    text = plain(res.stderr)
    assert "--verdict" in text and "'allowed' is not one of" in text
    for v in ("forwarded", "denied", "dropped", "audit", "failed"):
        assert f"'{v}'" in text
    assert res.stdout == ""


def test_unknown_verdict_with_markup_is_shown_literally(state: Path) -> None:
    res = observe(state, "--verdict", "[/red]")
    assert res.exit_code == 2 and "'[/red]' is not one of" in plain(res.stderr)


def test_layer_and_pod_filters(state: Path) -> None:
    res = observe(state, "--layer", "l7", "-o", "json")
    assert [json.loads(ln)["n"] for ln in lines(res.stdout)] == [1, 2, 5]
    res = observe(state, "--pod", "xwing", "-o", "json")
    assert [json.loads(ln)["n"] for ln in lines(res.stdout)] == [3]
    assert observe(state, "--layer", "L5").exit_code == 2


def test_last(state: Path) -> None:
    assert [json.loads(ln)["n"] for ln in lines(observe(state, "--last", "2", "-o", "json").stdout)] == [4, 5]
    res = observe(state, "--last", "0")
    assert res.exit_code == 0 and res.stdout == ""
    assert observe(state, "--last", "-1").exit_code == 2


# ---- -o ----
def test_json_and_yaml_carry_every_flow_as_written(state: Path) -> None:
    want = [json.loads(ln) for p in ("flows.jsonl.1", "flows.jsonl") for ln in (state / p).read_text().splitlines()]
    res = observe(state, "-o", "json")
    assert [json.loads(ln) for ln in lines(res.stdout)] == want
    res = observe(state, "--output", "YAML")
    assert res.exit_code == 0, res.output
    assert list(yaml.safe_load_all(res.stdout)) == want


@pytest.mark.parametrize("bad", ["xml", "text", "csv", ""])
def test_unimplemented_output_is_refused(state: Path, bad: str) -> None:
    res = observe(state, "-o", bad)
    assert res.exit_code == 2
    text = plain(res.stderr)
    assert "'-o' / '--output'" in text and "'table', 'wide', 'json', 'yaml'" in text


def test_missing_state_dir_prints_nothing(tmp_path: Path) -> None:
    res = observe(tmp_path / "none")
    assert res.exit_code == 0 and res.stdout == ""


# ---- -f: the tail ----
def test_tail_reads_only_new_bytes(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    write(path, [flow(i, why="x" * 1000) for i in range(2000)])  # ~2 MB
    size = path.stat().st_size
    tail = FlowFile(path)
    assert len(tail.lines()) == 2000 and tail.bytes_read == size == tail.offset
    for _ in range(10):
        assert tail.lines() == []
    assert tail.bytes_read == size  # polling an unchanged file reads nothing
    one = json.dumps(flow(9999)) + "\n"
    with open(path, "a") as f:
        f.write(one[:20])  # half a line: held until its end comes
    assert tail.lines() == []
    with open(path, "a") as f:
        f.write(one[20:])
    assert [json.loads(ln)["n"] for ln in tail.lines()] == [9999]
    assert tail.bytes_read == size + len(one)
    tail.close()


def test_tail_follows_rotation_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    write(path, [flow(1, why="y" * 200)])
    tail = FlowFile(path)
    assert len(tail.lines()) == 1
    write(path, [flow(2)])  # written just before the rotation, not read yet
    os.replace(path, path.with_suffix(".jsonl.1"))
    write(path, [flow(3, why="z" * 300)])
    assert [json.loads(ln)["n"] for ln in tail.lines()] == [2, 3]
    write(path, [flow(4)], mode="w")  # truncated: shorter than what was read
    assert [json.loads(ln)["n"] for ln in tail.lines()] == [4]
    path.unlink()
    assert tail.lines() == []
    write(path, [flow(5)])
    assert [json.loads(ln)["n"] for ln in tail.lines()] == [5]
    tail.close()


class Proc:
    """`python -m mesh.cli observe -f ...` with its stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "mesh.cli", "observe", "-f", *args], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "300"})
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for ln in self.p.stdout:
            self.q.put(ln.rstrip("\n"))

    def take(self, n: int, timeout: float = 15.0) -> list[str]:
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.q.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"got {out}, wanted {n} lines; stderr: {self.stop()[1]}") from None
        return out

    def quiet(self, seconds: float) -> list[str]:
        time.sleep(seconds)
        out = []
        while not self.q.empty():
            out.append(self.q.get())
        return out

    def interrupt(self) -> tuple[int, str]:
        self.p.send_signal(signal.SIGINT)
        return self.stop()

    def stop(self) -> tuple[int, str]:
        try:
            _, errout = self.p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            _, errout = self.p.communicate()
        return self.p.returncode, errout


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for pr in started:
        if pr.p.poll() is None:
            pr.p.kill()
            pr.p.wait()


def test_follow_prints_new_flows_once_through_rotation_and_truncation(tmp_path: Path, procs: list[Proc]) -> None:
    path = tmp_path / "flows.jsonl"
    write(path.with_suffix(".jsonl.1"), [flow(0)])
    write(path, [flow(1)])
    pr = Proc("--state-dir", str(tmp_path), "-o", "json", "--verdict", "FORWARDED", "--follow-for", "60")
    procs.append(pr)
    got = [json.loads(ln)["n"] for ln in pr.take(2)]
    assert got == [0, 1]
    write(path, [flow(2), flow(3, verdict="denied")])  # the denied one is filtered out
    assert [json.loads(ln)["n"] for ln in pr.take(1)] == [2]
    write(path, [flow(4, why="w" * 500)])
    os.replace(path, path.with_suffix(".jsonl.1"))  # rotated as FlowLog does, maybe before a poll read flow 4
    write(path, [flow(5, why="v" * 500)])
    assert [json.loads(ln)["n"] for ln in pr.take(2)] == [4, 5]
    write(path, [flow(6)], mode="w")  # truncated to less than was read
    assert [json.loads(ln)["n"] for ln in pr.take(1)] == [6]
    assert pr.quiet(0.8) == []  # nothing printed twice
    code, errout = pr.interrupt()
    assert code == 0 and "Traceback" not in errout, errout


def test_follow_runs_until_ctrl_c_and_prints_literally(tmp_path: Path, procs: list[Proc]) -> None:
    path = tmp_path / "flows.jsonl"
    pr = Proc("--state-dir", str(tmp_path))  # no file yet, no bound: until Ctrl-C
    procs.append(pr)
    assert pr.quiet(1.0) == []
    write(path, [l7(1, "/a[blink]b", why="[/red] :smile:")])
    (out,) = pr.take(1)
    assert "GET /a[blink]b 200 — [/red] :smile:" in out
    assert pr.p.poll() is None
    code, errout = pr.interrupt()
    assert code == 0 and "Traceback" not in errout and "Aborted" not in errout, errout


def test_follow_has_no_default_bound() -> None:
    cmd = typer.main.get_command(app)
    obs = cmd.commands["observe"]  # type: ignore[attr-defined]
    params = {p.name: p for p in obs.params}
    assert params["follow_for"].default == 0 and params["follow_for"].hidden
    assert "-f" in params["follow"].opts


# ---- Hubble's filters (mesh.cli.flowquery, shared with webb ui) ----
@pytest.fixture
def rich_state(tmp_path: Path) -> Path:
    write(tmp_path / "flows.jsonl", [
        flow(0, protocol="UDP", dst="10.96.0.53:53", service="kube-system/dns", dst_pod="kube-system/dns-1"),
        l7(1, "/v1/request-landing", method="POST", protocol="HTTP/1.1"),
        l7(2, "/v1/exhaust-port", method="PUT", status=403, verdict="denied", reason="l7-policy-denied",
           protocol="HTTP/1.1", src="default/xwing"),
        l7(3, "/demo.Greeter/Denied", method="POST", protocol="HTTP/2", status=200, grpc_status=7,
           grpc_code="PERMISSION_DENIED", verdict="denied", src="empire/tie", dst_pod=None,
           service="empire/greeter:50051"),
        l7(4, "/x", status=503, verdict="dropped", reason="l7-no-upstream", protocol="HTTP/1.1",
           duration_ms=12, retries=2),
        flow(5, reason="mtls-accepted", src="empire/tie", dst_pod="empire/deathstar", service=None,
             peer="spiffe://cluster.local/ns/empire/sa/tie", tls="ktls", direction="ingress"),
    ])
    return tmp_path


def ns_of(res: Any) -> list[int]:
    assert res.exit_code == 0, res.output
    return [json.loads(ln)["n"] for ln in lines(res.stdout)]


@pytest.mark.parametrize(("args", "want"), [
    (["--from-pod", "xwing"], [2]),
    (["--from-pod", "empire/tie"], [3, 5]),
    (["--to-pod", "deathstar"], [1, 2, 4]),
    (["--to-pod", "kube-system/dns-1"], [0]),
    (["--from-pod", "tiefighter", "--to-pod", "deathstar"], [1, 4]),
    (["-n", "empire"], [3, 5]),
    (["--namespace", "kube-system"], [0]),
    (["--protocol", "udp"], [0]),
    (["--protocol", "TCP"], [5]),
    (["--protocol", "http"], [1, 2, 3, 4]),
    (["--protocol", "http/2"], [3]),
    (["--protocol", "grpc"], [3]),
    (["--http-status", "403"], [2]),
    (["--http-status", "5xx"], [4]),
    (["--http-status", "2XX"], [1, 3]),
    (["--http-method", "post"], [1, 3]),
    (["--http-method", "PUT", "--verdict", "denied"], [2]),
    (["--since", str(T0 + 4)], [4, 5]),
    (["--since", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(T0 + 3))], [3, 4, 5]),
    (["--since", time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(T0 + 5))], [5]),
    (["--since", "5m"], []),  # the flows are from 2023
    (["--pod", "empire/tie", "--layer", "L7"], [3]),
])
def test_hubble_filters(rich_state: Path, args: list[str], want: list[int]) -> None:
    assert ns_of(observe(rich_state, "-o", "json", *args)) == want


def test_since_a_duration_counts_back_from_now(tmp_path: Path) -> None:
    now = time.time()
    write(tmp_path / "flows.jsonl", [flow(1, time=now - 3600), flow(2, time=now - 60)])
    assert ns_of(observe(tmp_path, "-o", "json", "--since", "5m")) == [2]
    assert ns_of(observe(tmp_path, "-o", "json", "--since", "2h")) == [1, 2]


@pytest.mark.parametrize(("args", "says"), [
    (["--from-pod", "<script>"], "'--from-pod': from_pod '<script>': not a pod name"),
    (["--to-pod", "a/b/c"], "'--to-pod': to_pod 'a/b/c': not a pod name"),
    (["--pod", "Bad_Name"], "'--pod': pod 'Bad_Name': not a pod name"),
    (["-n", "Bad_NS"], "'--namespace': namespace 'Bad_NS': not a namespace name"),
    (["--protocol", "sctp"], "'--protocol': protocol 'sctp': use one of tcp, udp, http, grpc"),
    (["--http-status", "99"], "'--http-status': status '99': an HTTP status (100-599) or a class"),
    (["--http-status", "6xx"], "an HTTP status (100-599)"),
    (["--http-method", "GET /x"], "'--http-method': method 'GET /x': letters, digits"),
    (["--since", "yesterday"], "'--since': since 'yesterday': a duration (30s, 5m, 2h, 1d), a Unix time"),
    (["--since", "-5m"], "a duration"),
    (["--since", "[red]x[/red]"], "since '[red]x[/red]'"),
    (["--since", "\u00b2"], "a duration"),  # a digit to str.isdigit, not to float()
])
def test_bad_filter_values_are_refused_naming_the_option(rich_state: Path, args: list[str], says: str) -> None:
    res = observe(rich_state, *args)
    assert res.exit_code == 2 and res.stdout == ""
    assert says in plain(res.stderr), plain(res.stderr)


def test_table_shows_the_grpc_status_and_the_peer(rich_state: Path) -> None:
    res = observe(rich_state)
    assert res.exit_code == 0, res.output
    out = lines(res.stdout)
    assert "POST /demo.Greeter/Denied grpc PERMISSION_DENIED(7)" in out[3] and " 200" not in out[3]
    assert "PUT /v1/exhaust-port 403" in out[2]
    assert "MTLS-ACCEPTED" not in out[5] and "mtls-accepted peer spiffe://cluster.local/ns/empire/sa/tie" in out[5]
    assert "peer" not in out[1]


def test_wide_shows_duration_and_retries(rich_state: Path) -> None:
    res = observe(rich_state, "-o", "wide", "--http-status", "503")
    assert res.exit_code == 0, res.output
    (line,) = lines(res.stdout)
    assert "GET /x 503" in line and " duration_ms=12 retries=2" in line and "DROPPED l7-no-upstream" in line
    res = observe(rich_state, "-o", "wide", "--verdict", "forwarded", "--protocol", "tcp")
    (line,) = lines(res.stdout)
    assert line.count("spiffe://cluster.local/ns/empire/sa/tie") == 1 and "tls=ktls" in line
