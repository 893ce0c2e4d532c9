"""`webb status`: what the agent applied, what Envoy accepted, every error, and whether the agent
lives.

Exit 1 when Envoy refused config (a NACK not accepted since, or objects quarantined after one),
when the agent reports errors, or when the agent is not alive: it said it stopped, its pid is gone
(or a zombie), or it has not rewritten ``status.json`` for ``STALE_S`` seconds though it does every
0.5 s. The pid is looked up in this PID namespace: run `webb status` where the agent runs (on the
host, or `kubectl exec` into the agent's pod).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mesh.cli.common import STATE, StateOpt, TextFormat, console, dump, err, output_option
from mesh.status import AgentStatus

STALE_S = 30.0  # the agent rewrites status.json every 0.5 s (mesh.agent.loop.STATUS_INTERVAL_S)


def _ago(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s"
    m = int(s) // 60
    return f"{m}m {int(s) % 60}s" if m < 60 else f"{m // 60}h {m % 60}m"


def pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs (a zombie does not); None when there is no pid to check."""
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def liveness(st: AgentStatus, now: float) -> str | None:
    """None when the agent lives; else why it does not, and what told."""
    written = f"status.json last written {_ago(now - st.updated)} ago"
    if not st.running:
        return f"the agent has stopped (it said so as it stopped; {written})"
    alive = pid_alive(st.pid)
    if alive is False:
        return f"the agent is gone: pid {st.pid} is not running ({written}); it ended without stopping cleanly"
    if now - st.updated > STALE_S:
        who = f"pid {st.pid} is running" if alive else "no pid to check"
        return f"the agent is not responding: {who}, but {written} (it rewrites it every 0.5 s)"
    return None


def problems(st: AgentStatus, now: float) -> list[str]:
    """Why `webb status` exits 1; empty when all is well."""
    out = [why] if (why := liveness(st, now)) else []
    out += [f"Envoy rejected the {t} config (NACK): {e}" for t, e in st.rejected().items()]
    if st.quarantined:
        out.append(f"Envoy rejected {len(st.quarantined)} object(s), held at their last accepted version: "
                   + ", ".join(st.quarantined))
    if st.errors:
        out.append(f"the agent reports {len(st.errors)} error(s)")
    return out


def print_text(st: AgentStatus, now: float, alive: bool) -> None:
    state = "running" if alive else "[red]stopped[/]" if not st.running else "[red]NOT ALIVE[/]"
    console.print(f"node {escape(st.node)}: {state} (pid {st.pid}, status written {_ago(now - st.updated)} ago)")
    a = st.applied
    console.print(f"applied plan {escape(a.plan_version or '-')} (datapath), Envoy config {escape(a.envoy_version or '-')}")
    for t, s in st.envoy.items():
        line = f"  Envoy {escape(t)}: sent {escape(s.sent or '-')} acked {escape(s.acked or '-')}"
        if s.nacked:
            line += f" [red]REJECTED {escape(s.nacked)}: {escape(s.error)}[/]"
        console.print(line)
    for k, p in st.pods.items():
        console.print(f"  pod {escape(k)} {escape(p.ip)}")
    sm = st.sockmap
    console.print(f"  sockmap acceleration: {'on' if sm.get('enabled') else 'off'} ({escape(str(sm.get('reason', '-')))})")
    if st.reason_counts:
        console.print("  datapath: " + escape(", ".join(f"{k}={v}" for k, v in st.reason_counts.items())))
    if mt := st.mtls:
        where = "the kernel (kTLS)" if mt["records"] == "ktls" else "user space"
        console.print(f"  mTLS: records in {where}: {escape(str(mt['why']).split(': ', 1)[-1])}")
        modes = ", ".join(f"{ns}={m}" for ns, m in (mt.get("namespaces") or {}).items() if m != "DISABLE")
        console.print(escape(f"  mTLS: {len(mt['identities'])} identities ({mt['trust_domain']}, CA {mt['ca']}), "
                             f"tunnels {mt['tunnels']}, namespaces: {modes or 'none'}"))
    for e in st.errors:
        console.print(f"[yellow]  error: {escape(e)}[/]")


def status(state_dir: StateOpt = STATE,
           output: Annotated[TextFormat, output_option("text, json or yaml")] = TextFormat.text,
           kube: Annotated[str | None, typer.Option(help="every node of a cluster, from their reports: a kubeconfig, "
                                                         "or in-cluster")] = None) -> None:
    """What the agent applied, what Envoy accepted, and every error (--kube: every node of the cluster).
    Exit 1 when Envoy rejected config, the agent reports errors, or the agent is not alive."""
    if kube:
        from mesh.cli.cluster import cluster_status

        raise typer.Exit(cluster_status(kube, output.value))
    st = AgentStatus.read(state_dir)
    if st is None:
        err.print(f"no agent status in {escape(str(state_dir))}: is `webb agent` running?")
        raise typer.Exit(1)
    now = time.time()
    found = problems(st, now)
    if output is TextFormat.text:
        print_text(st, now, alive=liveness(st, now) is None)
    else:
        dump(st.to_dict(), output.value)
    for p in found:
        err.print(f"[red]unhealthy:[/] {escape(p)}", highlight=False, soft_wrap=True)
    if found:
        raise typer.Exit(1)
