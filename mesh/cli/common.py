"""What several `webb` commands (and the demo) share: the consoles, waiting for the agent, printing flows."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from mesh.source import directory_version
from mesh.status import AgentStatus

console = Console()
err = Console(stderr=True)


def wait_converged(state_dir: Path, manifests: Path, timeout_s: float) -> AgentStatus:
    want = directory_version(manifests)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = AgentStatus.read(state_dir)
        if st is not None and st.applied_manifests() == want:
            return st
        time.sleep(0.05)
    raise TimeoutError(f"wait for agent: manifests version {want} not applied after {timeout_s}s "
                       f"(is `webb agent` running? see {state_dir}/status.json)")


def print_flows(flows: list[dict[str, Any]], output: str, header: bool = True) -> None:
    """One flow per line, like hubble observe: time src -> dst layer VERDICT reason [http] why."""
    if output == "json":
        for f in flows:
            print(json.dumps(f, sort_keys=True))
        return
    for f in flows:
        dst = f.get("service") or f.get("dst") or ""
        if f.get("dst_pod"):
            dst += f" ({f['dst_pod']})"
        colour = {"denied": "red", "dropped": "yellow"}.get(str(f.get("verdict")), "green")
        line = (f"{time.strftime('%H:%M:%S', time.localtime(float(f.get('time', 0))))} {f.get('src')} -> {dst} "
                f"{f.get('layer')} [{colour}]{str(f.get('verdict')).upper()}[/] {f.get('reason')}")
        if f.get("layer") == "L7":
            line += f" {f.get('method')} {f.get('path')} {f.get('status')}"
        if f.get("why"):
            line += f" — {f['why']}"
        console.print(line, soft_wrap=True, highlight=False)
