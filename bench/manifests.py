"""Manifest bench (issue 13): a 1 MB MeshPolicy validated, and applied to enforced.

``manifests.parse_1mb_s``: the policy's text through ``read_documents`` and ``parse_object``
(every key checked, every regex compiled by RE2, names and labels checked), best of 3. Baseline,
same run: the same text through PyYAML's C loader alone (no checks).

``apply.policy_1mb_s``: ``webb apply -f`` of the policy to a running agent (embedded mode, the
Star Wars pods), until the agent reports the manifests applied (Envoy ACKed, datapath synced);
the policy is then checked in force (an unlisted path is denied). Baseline, same run: the
5-line rule1 applied the same way.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mesh.cli.demo import request
from mesh.manifests import parse_object, read_documents
from mesh.runtime.local import NodeConfig
from mesh.status import AgentStatus

ROOT = Path(__file__).resolve().parents[1]
STARWARS = ROOT / "examples" / "starwars"
TARGET_BYTES = 1 << 20
AGENT_START_S = 60.0
APPLY_TIMEOUT_S = 300.0


def big_policy(target: int = TARGET_BYTES) -> str:
    """rule1 with HTTP rules added until the text is ``target`` bytes: one path regex each."""
    head = (STARWARS / "policy.yaml").read_text()
    lines = [head.rstrip("\n")]
    size, i = len(head), 0
    while size < target:
        rule = f'        - method: "GET"\n          path: "/v1/resource-{i:06d}/[a-z0-9-]+"'
        lines.append(rule)
        size += len(rule) + 1
        i += 1
    return "\n".join(lines) + "\n"


def _parse(path: Path) -> float:
    t0 = time.perf_counter()
    for f, doc in read_documents(path):
        parse_object(doc, base_dir=f.parent)
    return time.perf_counter() - t0


def _bare(path: Path) -> float:
    t0 = time.perf_counter()
    list(yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader))  # noqa: S506 - the C *safe* loader
    return time.perf_counter() - t0


def _webb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=APPLY_TIMEOUT_S + 30)


def _apply(state: Path, path: Path) -> float:
    t0 = time.perf_counter()
    r = _webb("apply", "-f", str(path), "--state-dir", str(state), "--wait", str(APPLY_TIMEOUT_S))
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"bench manifests: webb apply {path.name}: exit {r.returncode}: {r.stderr[-2000:]}")
    return dt


def _start_agent(state: Path) -> subprocess.Popen[bytes]:
    agent = subprocess.Popen([sys.executable, "-m", "mesh.cli", "agent", "--state-dir", str(state), "--lifetime", "900"],
                             cwd=ROOT, stdout=open(state / "agent.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    deadline = time.monotonic() + AGENT_START_S
    while True:
        st = AgentStatus.read(state)
        if st is not None and st.pid == agent.pid and st.running:
            return agent
        if agent.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"bench manifests: the agent did not start: {(state / 'agent.log').read_text()[-2000:]}")
        time.sleep(0.05)


def run() -> tuple[dict[str, float], list[list[str]]]:
    tmp = Path(tempfile.mkdtemp(prefix="webb-bench-manifests-"))
    try:
        big = tmp / "policy.yaml"
        big.write_text(big_policy())
        size_mb = big.stat().st_size / 1e6
        rules = big.read_text().count("method:")
        parse_s = min(_parse(big) for _ in range(3))
        bare_s = min(_bare(big) for _ in range(3))

        state = tmp / "state"
        state.mkdir()
        agent = _start_agent(state)
        try:
            _apply(state, STARWARS / "01-app.yaml")
            small_s = _apply(state, STARWARS / "policy.yaml")
            _webb("delete", "-f", str(STARWARS / "policy.yaml"), "--state-dir", str(state))
            big_s = _apply(state, big)
            node = NodeConfig(state_dir=state)
            denied = request(node, "tiefighter", "PUT", "/v1/exhaust-port").body.strip()
            allowed = request(node, "tiefighter", "GET", "/v1/resource-000007/x").status
            if denied != "Access denied" or allowed == 403:
                raise RuntimeError(f"bench manifests: the 1 MB policy is not in force (PUT: {denied!r}, GET: {allowed})")
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {"manifests.parse_1mb_s": round(parse_s, 3), "manifests.yaml_c_1mb_s": round(bare_s, 3),
               "manifests.parse_ratio": round(parse_s / bare_s, 2),
               "apply.policy_1mb_s": round(big_s, 3), "apply.policy_small_s": round(small_s, 3),
               "apply.policy_ratio": round(big_s / small_s, 2)}
    return figures, [
        ["parse + validate 1 MB MeshPolicy (goal < 0.5 s)", f"{bare_s:.3f} s", f"{parse_s:.3f} s", f"{parse_s / bare_s:.1f}"],
        ["webb apply → enforced (goal < 2 s)", f"{small_s:.3f} s", f"{big_s:.3f} s", f"{big_s / small_s:.1f}"],
        [f"({size_mb:.2f} MB, {rules} HTTP rules; baselines: C YAML load / 5-line rule1)", "", "", ""],
    ]


if __name__ == "__main__":
    figs, rows = run()
    for row in rows:
        print(*row, sep="\t")
