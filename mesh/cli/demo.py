"""`webb demo`: the Star Wars scenario end to end, with its expected outcomes checked."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from mesh.agent.flows import read_flows
from mesh.cli.common import console, wait_converged
from mesh.cli.observe import print_flows
from mesh.runtime.local import LocalNode, NodeConfig, pod_sandbox
from mesh.status import AgentStatus

ROOT = Path(__file__).resolve().parent.parent
URL = "http://deathstar.default.svc.cluster.local"


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    status: int
    body: str

    @property
    def text(self) -> str:
        if self.exit_code == 0:
            return f"{self.body.strip()} (HTTP {self.status})"
        return f"refused at connect (curl exit {self.exit_code}: {self.body.strip()})"


def request(node: NodeConfig, pod: str, method: str, path: str, family: int = 0) -> Outcome:
    """curl from a pod to the deathstar by name; ``family`` 4 or 6 forces that address family."""
    sb = pod_sandbox(node, f"default/{pod}")
    force = [f"-{family}"] if family else []
    proc = LocalNode(node).spawn(
        sb, ["curl", "-sS", *force, "--max-time", "5", "-X", method, "-w", "\n%{http_code}", URL + path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, errout = proc.communicate(timeout=15)
    if proc.returncode != 0:
        return Outcome(proc.returncode, 0, errout.decode().strip().splitlines()[-1] if errout else "")
    body, _, code = out.decode().rpartition("\n")
    return Outcome(0, int(code or 0), body)


CASES = [
    ("tiefighter", "POST", "/v1/request-landing"),
    ("tiefighter", "PUT", "/v1/exhaust-port"),
    ("xwing", "POST", "/v1/request-landing"),
]


def expected(policy: bool) -> list[tuple[int, str]]:
    """(curl exit, body) per case."""
    if not policy:
        return [(0, "Ship landed"), (0, "Panic: deathstar exploded"), (0, "Ship landed")]
    return [(0, "Ship landed"), (0, "Access denied"), (7, "")]


def run_cases(node: NodeConfig, policy: bool) -> bool:
    ok = True
    for (pod, method, path), (want_exit, want_body) in zip(CASES, expected(policy), strict=True):
        o = request(node, pod, method, path)
        good = o.exit_code == want_exit and (want_exit != 0 or o.body.strip() == want_body)
        ok &= good
        mark = "[green]ok[/]" if good else "[red]UNEXPECTED[/]"
        console.print(f"  {pod:10} {method:4} {path:22} → {escape(o.text)}  {mark}")
    return ok


def _wait_reachable(node: NodeConfig, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if request(node, "tiefighter", "POST", "/v1/request-landing").exit_code == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"deathstar not reachable from tiefighter after {timeout_s}s")


def _apply(state_dir: Path, f: Path) -> None:
    subprocess.run([sys.executable, "-m", "mesh.cli", "apply", "-f", str(f), "--state-dir", str(state_dir)],
                   check=True, cwd=ROOT)


def take_screenshot(state_dir: Path, path: Path) -> bool:
    """The service map of this run (`webb ui`, the xwing's denial selected) as a PNG, for the README. Without
    Chromium it is skipped, saying why; a failure with Chromium there fails the demo."""
    from mesh.ui.browser import BrowserError, find_chromium

    if find_chromium() is None:
        console.print("[yellow]screenshot skipped: no Chromium on this machine (Debian: apt-get install chromium; "
                      "make deps installs it)[/]")
        return True
    if importlib.util.find_spec("websockets") is None:
        console.print("[yellow]screenshot skipped: the Python package websockets drives Chromium and is not installed "
                      "(pip install -e '.[test]')[/]")
        return True
    try:
        from mesh.ui.screenshot import take

        size = take(state_dir, path)
    except (BrowserError, OSError) as e:
        console.print(f"[red]screenshot of webb ui failed: {escape(str(e))}[/]", highlight=False)
        return False
    console.print(f"screenshot of webb ui: {escape(str(path))} ({size} bytes)", highlight=False)
    return True


def run_starwars(example: Path, state_dir: Path, lifetime_s: float = 300.0, agent_args: tuple[str, ...] = (),
                 screenshot: Path | None = None) -> int:
    example = example.resolve()
    manifests = state_dir / "manifests"
    manifests.mkdir(parents=True, exist_ok=True)
    for old in [*manifests.glob("*.y*ml"), state_dir / "flows.jsonl"]:
        old.unlink(missing_ok=True)
    node = NodeConfig(state_dir=state_dir)
    console.print("[bold]Starting the Webb agent (node1: bridge webb0, pods as network namespaces)[/]")
    agent = subprocess.Popen(
        ["setpriv", "--pdeathsig", "SIGTERM", "--", sys.executable, "-m", "mesh.cli", "agent",
         "--state-dir", str(state_dir), "--lifetime", str(lifetime_s), *agent_args],
        cwd=ROOT, stdout=open(state_dir / "agent.log", "ab"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while (st0 := AgentStatus.read(state_dir)) is None or st0.pid != agent.pid or not st0.running:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"start agent: failed; see {state_dir}/agent.log")
            time.sleep(0.1)
        _apply(state_dir, example / "01-app.yaml")
        _wait_reachable(node, 20)
        console.print("[bold]Without a policy: everyone may land, and anyone can blow up the Death Star[/]")
        ok = run_cases(node, policy=False)
        _apply(state_dir, example / "policy.yaml")
        st = wait_converged(state_dir, manifests, 30)
        console.print(f"[bold]With MeshPolicy default/rule1 (plan {escape(st.applied.plan_version)}):[/]")
        ok &= run_cases(node, policy=True)
        time.sleep(0.5)  # let the agent read the last access-log entries
        denied = [f for f in read_flows(state_dir / "flows.jsonl") if f.get("verdict") == "denied"]
        console.print("[bold]webb observe --verdict denied[/]")
        print_flows(denied[-5:], "table")
        layers = {f.get("layer") for f in denied}
        if layers != {"L4", "L7"}:
            console.print(f"[red]expected an L4 and an L7 denial in the flows, got {escape(str(sorted(map(str, layers))))}[/]")
            ok = False
        if screenshot is not None:
            ok &= take_screenshot(state_dir, screenshot)
        console.print("[green bold]PASS: the three outcomes match[/]" if ok else "[red bold]FAIL[/]")
        return 0 if ok else 1
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(timeout=10)
        if os.environ.get("WEBB_DEMO_DEBUG"):
            console.print(json.dumps((AgentStatus.read(state_dir) or AgentStatus("")).to_dict(), indent=1), markup=False)
