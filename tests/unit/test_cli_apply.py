"""`webb apply` / `webb delete` keyed on objects (kind, namespace, name), --dry-run, `webb get`, the
state dir levels, and a manifest directory left by the previous `webb` (one file per applied file).

Real CLI invocations (typer's CliRunner) on temporary state dirs; what the agent would load is
read with the agent's own source (mesh.source.StandaloneSource). A status.json, where one is
needed, is written as the agent writes it (mesh.status.AgentStatus)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mesh.cli.main import app
from mesh.cli.manifests_store import ManifestStore, file_name
from mesh.cli.statedir import node_of
from mesh.source import StandaloneSource, directory_version
from mesh.status import AgentStatus, PodStatus, ServiceStatus

ROOT = Path(__file__).resolve().parents[2]
STARWARS, L7 = ROOT / "examples/starwars/01-app.yaml", ROOT / "examples/l7/01-app.yaml"
POLICY = ROOT / "examples/starwars/policy.yaml"
runner = CliRunner()


def webb(*args: str) -> Any:
    return runner.invoke(app, list(args), env={"COLUMNS": "250"})


def flat(text: str) -> str:
    return " ".join(text.split())


def loaded(manifests: Path) -> set[str]:
    """What the agent would run: every object its source loads from the directory, "Kind ns/name"."""
    src = StandaloneSource(manifests, "10.96.0.0/16")
    st = src.load()
    assert src.errors == [], src.errors
    return ({f"Pod {p.key}" for p in st.pods} | {f"Service {s.key}" for s in st.services}
            | {f"MeshPolicy {p.key}" for p in st.policies})


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.is_dir() else {}


def write_status(state: Path, **kw: Any) -> AgentStatus:
    state.mkdir(parents=True, exist_ok=True)
    st = AgentStatus(node="n1", running=True, pid=os.getpid(), updated=time.time())
    for k, v in kw.items():
        setattr(st, k, v)
    st.write(state)
    return st


STARWARS_OBJECTS = {"Service default/deathstar", "Pod default/deathstar-1", "Pod default/deathstar-2",
                    "Pod default/tiefighter", "Pod default/xwing"}
L7_OBJECTS = {"Service default/web", "Service default/web-v1", "Service default/web-v2", "Pod default/web-v1",
              "Pod default/web-v2", "Pod default/client"}


# ---- one file per object ----
def test_two_files_of_one_name_both_survive(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = webb("apply", "-f", str(STARWARS), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 0, r.output
    assert "Pod default/deathstar-1 created" in r.stdout
    r = webb("apply", "-f", str(L7), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 0, r.output
    assert "Pod default/web-v1 created" in r.stdout and "deathstar" not in r.stdout
    manifests = state / "manifests"
    assert loaded(manifests) == STARWARS_OBJECTS | L7_OBJECTS  # the Death Star is still there
    assert not (manifests / "01-app.yaml").exists()
    assert (manifests / "Pod_default_deathstar-1.yaml").is_file()
    # a Pod's ./app.py is made absolute: the stored object runs from the example's directory
    pod = yaml.safe_load((manifests / "Pod_default_deathstar-1.yaml").read_text())
    assert pod["spec"]["containers"][0]["command"][1] == str(ROOT / "examples/starwars/app.py")


def test_delete_removes_exactly_the_files_objects(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for f in (STARWARS, L7, POLICY):
        assert webb("apply", "-f", str(f), "--state-dir", str(state), "--wait", "0").exit_code == 0
    r = webb("delete", "-f", str(L7), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 0, r.output
    assert sorted(line.rsplit(" ", 1)[0] for line in r.stdout.splitlines()) == sorted(L7_OBJECTS)
    assert all(line.endswith(" deleted") for line in r.stdout.splitlines())
    assert loaded(state / "manifests") == STARWARS_OBJECTS | {"MeshPolicy default/rule1"}
    # again: nothing of it is there any more; kubectl's NotFound, unless --ignore-not-found
    r = webb("delete", "-f", str(L7), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 1 and "error: Pod default/client not found" in r.stderr
    r = webb("delete", "-f", str(L7), "--state-dir", str(state), "--wait", "0", "--ignore-not-found")
    assert r.exit_code == 0, r.output
    assert loaded(state / "manifests") == STARWARS_OBJECTS | {"MeshPolicy default/rule1"}


def test_delete_of_a_file_gone_since_deletes_what_was_applied_from_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    mine = tmp_path / "policy.yaml"
    shutil.copyfile(POLICY, mine)
    for f in (STARWARS, mine):
        assert webb("apply", "-f", str(f), "--state-dir", str(state), "--wait", "0").exit_code == 0
    mine.unlink()
    r = webb("delete", "-f", str(mine), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 0 and r.stdout == "MeshPolicy default/rule1 deleted\n", r.output
    assert loaded(state / "manifests") == STARWARS_OBJECTS
    r = webb("delete", "-f", str(mine), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 1 and "no such file, and no object was applied from it" in flat(r.stderr)


def test_apply_updates_an_object_whatever_file_it_came_from(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert webb("apply", "-f", str(STARWARS), "--state-dir", str(state), "--wait", "0").exit_code == 0
    other = tmp_path / "copy.yaml"
    other.write_text(STARWARS.read_text().replace("port: 80\n", "port: 8080\n", 1))
    shutil.copyfile(ROOT / "examples/starwars/app.py", tmp_path / "app.py")
    r = webb("apply", "-f", str(other), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert f"Service default/deathstar configured (it was applied from {STARWARS})" in lines
    # the deathstar pods' commands now name tmp_path/app.py: they changed too; the others did not
    assert "Pod default/deathstar-2 configured (it was applied from" in r.stdout
    assert lines[3:] == ["Pod default/tiefighter unchanged", "Pod default/xwing unchanged"]
    svc = StandaloneSource(state / "manifests", "10.96.0.0/16").load().services
    assert [p.port for s in svc for p in s.ports] == [8080]
    r = webb("apply", "-f", str(other), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 0 and r.stdout.count(" unchanged") == 5, r.output


def test_one_object_twice_in_one_apply_is_an_error_and_nothing_is_written(tmp_path: Path) -> None:
    state = tmp_path / "state"
    twice = tmp_path / "twice.yaml"
    twice.write_text(POLICY.read_text() + "\n---\n" + POLICY.read_text())
    r = webb("apply", "-f", str(twice), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 1 and "MeshPolicy default/rule1 (twice.yaml)" in flat(r.stderr)
    assert "only one would be kept" in flat(r.stderr)
    assert snapshot(state / "manifests") == {}


def test_file_names_are_escaped_never_paths() -> None:
    assert file_name(("Pod", "default", "web-1")) == "Pod_default_web-1.yaml"
    assert file_name(("Namespace", "", "team-a")) == "Namespace__team-a.yaml"
    evil = file_name(("Pod", "../..", "../../etc/passwd"))
    assert "/" not in evil and evil.startswith("Pod_") and evil.endswith(".yaml")
    assert file_name(("Pod", "a_b", "c")) != file_name(("Pod", "a", "b_c"))  # "_" is escaped: one name, one key
    long = file_name(("HTTPRoute", "default", "a." * 126 + "b"))
    assert len(long.encode()) <= 200 and long != file_name(("HTTPRoute", "default", "a." * 126 + "c"))


# ---- --dry-run ----
def test_dry_run_says_what_would_change_and_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert webb("apply", "-f", str(STARWARS), "--state-dir", str(state), "--wait", "0").exit_code == 0
    before = snapshot(state / "manifests")
    changed = tmp_path / "changed.yaml"
    changed.write_text(POLICY.read_text() + "---\n" + STARWARS.read_text().split("---")[0].replace("port: 80\n", "port: 81\n", 1))
    r = webb("apply", "--dry-run", "-f", str(changed), "--state-dir", str(state))
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[:2] == ["MeshPolicy default/rule1 created (dry run)",
                                         f"Service default/deathstar configured (it was applied from {STARWARS}) (dry run)"]
    assert "2 object(s) valid (dry run: nothing applied)" in r.stdout
    r = webb("apply", "--dry-run", "-f", str(STARWARS), "--state-dir", str(state))
    assert r.exit_code == 0 and r.stdout.count("unchanged (dry run)") == 5, r.output
    r = webb("delete", "--dry-run", "-f", str(STARWARS), "--state-dir", str(state))
    assert r.exit_code == 0 and r.stdout.count("deleted (dry run)") == 5, r.output
    assert snapshot(state / "manifests") == before


def test_dry_run_without_state_creates_nothing(tmp_path: Path) -> None:
    r = webb("apply", "--dry-run", "-f", str(STARWARS), "--state-dir", str(tmp_path / "nothing"))
    assert r.exit_code == 0 and r.stdout.count("created (dry run)") == 5, r.output
    assert not (tmp_path / "nothing").exists()


# ---- a directory left by the previous webb ----
def _old_layout(manifests: Path) -> None:
    """As the previous `webb apply` stored files: under their own name, Pod paths made absolute."""
    manifests.mkdir(parents=True)
    docs = list(yaml.safe_load_all(STARWARS.read_text()))
    for d in docs:
        if d["kind"] == "Pod":
            c = d["spec"]["containers"][0]
            c["command"] = [str(ROOT / "examples/starwars" / a[2:]) if a.startswith("./") else a for a in c["command"]]
    (manifests / "01-app.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    shutil.copyfile(POLICY, manifests / "policy.yaml")


def test_old_layout_is_read_then_migrated_keeping_every_object(tmp_path: Path) -> None:
    state = tmp_path / "state"
    manifests = state / "manifests"
    _old_layout(manifests)
    write_status(state, applied=AgentStatus("n1").applied, pods={"default/deathstar-1": PodStatus(ip="10.244.0.9")})
    agent_saw = loaded(manifests)
    assert agent_saw == STARWARS_OBJECTS | {"MeshPolicy default/rule1"}
    # read-only commands read it as it is
    before = snapshot(manifests)
    r = webb("get", "pods", "--state-dir", str(state))
    assert r.exit_code == 0 and "deathstar-1" in r.stdout and "10.244.0.9" in r.stdout, r.output
    r = webb("apply", "--dry-run", "-f", str(STARWARS), "--state-dir", str(state))
    assert r.exit_code == 0 and r.stdout.count("unchanged (dry run)") == 5, r.output
    assert "would be migrated" in flat(r.stderr)
    assert snapshot(manifests) == before
    # the first change migrates: every object to a file of its own; the old files go
    r = webb("apply", "-f", str(L7), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 0, r.output
    assert "migrated 6 object(s) of 2 file(s) stored by file name (01-app.yaml, policy.yaml)" in flat(r.stderr)
    assert loaded(manifests) == agent_saw | L7_OBJECTS
    assert not (manifests / "01-app.yaml").exists() and not (manifests / "policy.yaml").exists()
    objs, legacy, warnings = ManifestStore(manifests).read()
    assert legacy == [] and warnings == [] and len(objs) == 12
    # and the old files' objects are deleted by the files they came from
    r = webb("delete", "-f", str(POLICY), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 0 and r.stdout == "MeshPolicy default/rule1 deleted\n", r.output
    assert loaded(manifests) == STARWARS_OBJECTS | L7_OBJECTS


def test_old_layout_later_file_wins_as_in_the_agent_and_broken_files_stay(tmp_path: Path) -> None:
    manifests = tmp_path / "state" / "manifests"
    _old_layout(manifests)
    (manifests / "zz-policy.yaml").write_text(POLICY.read_text().replace('"/v1/request-landing"', '"/v1/other"'))
    (manifests / "broken.yaml").write_text("kind: [unclosed\n")
    src = StandaloneSource(manifests, "10.96.0.0/16")
    want = src.load().policies
    r = webb("apply", "-f", str(L7), "--state-dir", str(tmp_path / "state"), "--wait", "0")
    assert r.exit_code == 0, r.output
    assert "broken.yaml cannot be read, left as it is" in flat(r.stderr)
    assert (manifests / "broken.yaml").exists() and not (manifests / "zz-policy.yaml").exists()
    src = StandaloneSource(manifests, "10.96.0.0/16")
    assert src.load().policies == want  # rule1 as the agent had it: the later file's version
    assert len(src.errors) == 1 and "broken.yaml" in src.errors[0]


# ---- the agent never sees half of a change ----
def test_the_agents_source_waits_for_a_change_in_progress(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    store = ManifestStore(manifests)
    store.write(("MeshPolicy", "default", "rule1"), POLICY.read_text())
    src = StandaloneSource(manifests, "10.96.0.0/16")
    v0 = src.version()
    with store.lock():
        store.write(("MeshPolicy", "default", "rule2"), POLICY.read_text().replace("rule1", "rule2"))
        assert src.version() == v0  # mid-change: the version before
    assert src.version() == directory_version(manifests) != v0


# ---- webb get ----
def test_get_prints_headers_states_and_agent_facts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for f in (STARWARS, POLICY):
        assert webb("apply", "-f", str(f), "--state-dir", str(state), "--wait", "0").exit_code == 0
    st = StandaloneSource(state / "manifests", "10.96.0.0/16").load()
    vip = next(s.cluster_ip for s in st.services if s.name == "deathstar")
    applied = AgentStatus("n1").applied
    applied.source_version = directory_version(state / "manifests")
    write_status(state, applied=applied, pods={"default/tiefighter": PodStatus(ip="10.244.0.2")},
                 services=[ServiceStatus(vip, 80, 2)])
    r = webb("get", "pods", "--state-dir", str(state))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "IP", "NODE"]
    assert lines[1].split() == ["deathstar-1", "Pending", "<none>", "-"]
    assert [ln.split() for ln in lines if ln.startswith("tiefighter")] == [["tiefighter", "Running", "10.244.0.2", "n1"]]
    r = webb("get", "svc", "--state-dir", str(state))
    assert r.stdout.splitlines()[0].split() == ["NAME", "CLUSTER-IP", "PORT(S)", "BACKENDS", "STATUS"]
    assert r.stdout.splitlines()[1].split() == ["deathstar", vip, "80/TCP", "2", "Applied"]
    r = webb("get", "policies", "--state-dir", str(state), "-o", "wide")
    assert r.stdout.splitlines()[0].split() == ["NAME", "MODE", "SELECTOR", "RULES", "STATUS", "L7", "MESSAGE", "FROM"]
    assert r.stdout.splitlines()[1].split() == ["rule1", "enforce", "class=deathstar,org=empire", "1", "Applied", "yes", "-",
                                                str(POLICY)]
    # -n, -A
    assert "No pods found in namespace other." in flat(webb("get", "pods", "-n", "other", "--state-dir", str(state)).stderr)
    r = webb("get", "pods", "-A", "--state-dir", str(state))
    assert r.stdout.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"] and len(r.stdout.splitlines()) == 5
    # -o json / yaml: a List of the stored objects, with what Webb reports as their status
    doc = json.loads(webb("get", "pods", "-o", "json", "--state-dir", str(state)).stdout)
    assert doc["kind"] == "List" and [i["metadata"]["name"] for i in doc["items"]][-2:] == ["tiefighter", "xwing"]
    assert doc["items"][2]["status"]["ip"] == "10.244.0.2"
    assert yaml.safe_load(webb("get", "routes", "-o", "yaml", "--state-dir", str(state)).stdout)["items"] == []


def test_get_is_markup_safe_and_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    state = tmp_path / "state"
    odd = tmp_path / "[red]x:smile:"
    odd.mkdir()
    shutil.copyfile(POLICY, odd / "p.yaml")
    assert webb("apply", "-f", str(odd / "p.yaml"), "--state-dir", str(state), "--wait", "0").exit_code == 0
    # a refused policy, with a message from Envoy carrying markup
    write_status(state, quarantined={"MeshPolicy default/rule1": "Envoy said [/bold] [link=x]no[/link]"},
                 refused=["MeshPolicy default/rule1"])
    r = webb("get", "mp", "-o", "wide", "--state-dir", str(state))
    assert r.exit_code == 0, r.output
    assert "Quarantined" in r.stdout and "Envoy said [/bold] [link=x]no[/link]" in r.stdout
    assert f"{odd}/p.yaml" in r.stdout and ":smile:" in r.stdout
    # an invalid object written by hand into the directory
    (state / "manifests" / "hand.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: hand}\nspec: {}\n")
    r = webb("get", "pods", "-o", "wide", "--state-dir", str(state))
    assert "hand" in r.stdout and "Invalid" in r.stdout and "spec.containers" in r.stdout
    r = webb("get", "pods", "-o", "bogus", "--state-dir", str(state))
    assert r.exit_code == 2 and "bogus" in r.stderr
    r = webb("get", "deployments", "--state-dir", str(state))
    assert r.exit_code == 2 and "pods, services, policies, routes" in flat(r.stderr)


# ---- which state dir ----
def test_parent_dir_of_one_node_is_taken_and_named(tmp_path: Path) -> None:
    write_status(tmp_path / "n1")
    r = webb("apply", "-f", str(POLICY), "--state-dir", str(tmp_path), "--wait", "0")
    assert r.exit_code == 0, r.output
    assert f"using node n1: {tmp_path / 'n1'} (the only node state dir in {tmp_path})" in flat(r.stderr)
    assert loaded(tmp_path / "n1" / "manifests") == {"MeshPolicy default/rule1"}


def test_wire_root_applies_to_the_shared_directory(tmp_path: Path) -> None:
    (tmp_path / "manifests").mkdir()
    write_status(tmp_path / "n1", node="n1")
    write_status(tmp_path / "n2", node="n2")
    r = webb("apply", "-f", str(POLICY), "--state-dir", str(tmp_path), "--wait", "0")
    assert r.exit_code == 0, r.output
    assert "read by node(s) n1, n2" in flat(r.stderr)
    assert loaded(tmp_path / "manifests") == {"MeshPolicy default/rule1"}
    # a node's own state dir finds the shared directory too
    r = webb("get", "policies", "--state-dir", str(tmp_path / "n2"))
    assert "rule1" in r.stdout, r.output


def test_wrong_levels_say_what_was_found(tmp_path: Path) -> None:
    write_status(tmp_path / "n1")
    write_status(tmp_path / "n2", node="n2")
    r = webb("apply", "-f", str(POLICY), "--state-dir", str(tmp_path))
    assert r.exit_code == 1
    assert "holds the state dirs of 2 nodes (n1, n2)" in flat(r.stderr) and "is `webb agent` running" not in r.stderr
    (tmp_path / "n1" / "manifests").mkdir()
    shutil.copyfile(POLICY, tmp_path / "n1" / "manifests" / "x.yaml")
    r = webb("apply", "-f", str(POLICY), "--state-dir", str(tmp_path / "n1" / "manifests"))
    assert r.exit_code == 1 and "is a manifests directory" in flat(r.stderr), r.output
    r = webb("get", "pods", "--state-dir", str(tmp_path / "n1" / "certs"))
    assert r.exit_code == 1 and f"use --state-dir {tmp_path / 'n1'}" in flat(r.stderr), r.output


def test_wait_names_what_the_running_agent_shows(tmp_path: Path) -> None:
    """An agent that lives (this pid, status just written) but never reaches the version: the error
    says so, not "is `webb agent` running?"."""
    write_status(tmp_path / "n1")
    r = webb("apply", "-f", str(POLICY), "--state-dir", str(tmp_path), "--wait", "0.5")
    assert r.exit_code == 1
    said = flat(r.stderr)
    assert f"node n1 (pid {os.getpid()}) is running but has applied manifests version none, not" in said, said
    assert "is `webb agent" not in said
    write_status(tmp_path / "n1", running=False)
    r = webb("apply", "-f", str(POLICY), "--state-dir", str(tmp_path / "n1"), "--wait", "0.3")
    assert r.exit_code == 1 and "the agent has stopped" in flat(r.stderr), r.output
    r = webb("apply", "-f", str(POLICY), "--state-dir", str(tmp_path / "fresh"), "--wait", "0.3")
    assert r.exit_code == 1 and "is `webb agent --state-dir" in flat(r.stderr), r.output


def test_exec_takes_the_node_from_the_state_dir(tmp_path: Path) -> None:
    write_status(tmp_path / "a", node="n7")
    assert node_of(tmp_path / "a", None) == ("n7", tmp_path / "a")
    assert node_of(tmp_path, None) == ("n7", tmp_path / "a")
    assert node_of(tmp_path / "none", None) == ("node1", tmp_path / "none")
    r = webb("exec", "ghost", "--state-dir", str(tmp_path / "a"), "--", "true")
    assert r.exit_code == 1 and "find pod default/ghost: not running on node n7" in flat(r.stderr), r.output
    r = webb("exec", "ghost", "--node", "n8", "--state-dir", str(tmp_path / "a"), "--", "true")
    assert r.exit_code == 1 and "is the state dir of node n7, not n8" in flat(r.stderr), r.output
    r = webb("exec", "ghost", "--state-dir", str(tmp_path / "a"))
    assert r.exit_code == 2 and "give the command to run after --" in flat(r.stderr)


@pytest.mark.parametrize("cmd", ["apply", "delete"])
def test_help_names_dry_run(cmd: str) -> None:
    assert "--dry-run" in webb(cmd, "--help").stdout


def test_a_one_object_file_is_stored_as_written_and_compared_as_an_object(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert webb("apply", "-f", str(POLICY), "--state-dir", str(state), "--wait", "0").exit_code == 0
    stored = (state / "manifests" / "MeshPolicy_default_rule1.yaml").read_text()
    assert stored.endswith(POLICY.read_text())  # its comments too
    assert stored.splitlines()[1:3] == ['# webb-object: ["MeshPolicy", "default", "rule1"]', f'# webb-source: "{POLICY}"']
    # the same object, written otherwise: unchanged (kubectl compares objects, not text)
    other = tmp_path / "flow.yaml"
    other.write_text("# a comment\n" + json.dumps(yaml.safe_load(POLICY.read_text())) + "\n")
    r = webb("apply", "-f", str(other), "--state-dir", str(state), "--wait", "0")
    assert r.exit_code == 0 and r.stdout == "MeshPolicy default/rule1 unchanged\n", r.output
    assert (state / "manifests" / "MeshPolicy_default_rule1.yaml").read_text() == stored


def test_header_holds_any_name_on_one_line(tmp_path: Path) -> None:
    """A name from an old hand-written file (never valid, but migrated as it was): newlines and quotes
    stay inside the header's JSON, the file name is escaped, and it reads back as the same key."""
    store = ManifestStore(tmp_path)
    key = ("Pod", "default", 'x\n# webb-object: ["Pod", "default", "y"]\n"')
    path = store.write(key, "apiVersion: v1\nkind: Pod\n")
    assert path.parent == tmp_path and "\n" not in path.name and "/" not in path.name
    objs, legacy, warnings = store.read()
    assert list(objs) == [key] and legacy == [] and warnings == []
    assert objs[key].body == "apiVersion: v1\nkind: Pod\n"
