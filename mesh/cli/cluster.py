"""``webb status --kube``: every node's state, from the reports the agents publish
(ConfigMaps ``webb-system/webb-node-<node>``, written by ``mesh.kube.watch.NodeReporter``)."""

from __future__ import annotations

import json
from typing import Any

from rich.markup import escape
from rich.table import Table

from mesh.cli.common import console, dump, err
from mesh.kube.client import api_client
from mesh.kube.translate import Resource
from mesh.kube.watch import REPORT_LABEL, api_path, request
from mesh.model import SYSTEM_NAMESPACE

CONFIGMAPS = Resource("", "v1", "configmaps")
NODES = Resource("", "v1", "nodes")


def reports(api: Any) -> dict[str, dict[str, Any]]:
    """node -> its last report (an unreadable one is shown as such, not skipped)."""
    listed = request(api, "GET", api_path(CONFIGMAPS, SYSTEM_NAMESPACE), query={"labelSelector": REPORT_LABEL})
    out: dict[str, dict[str, Any]] = {}
    for cm in listed.get("items") or []:
        node = str((cm.get("metadata") or {}).get("labels", {}).get(REPORT_LABEL, "?"))
        try:
            out[node] = dict(json.loads((cm.get("data") or {}).get("report") or "{}"))
        except json.JSONDecodeError as e:
            out[node] = {"errors": [f"unreadable report: {e}"]}
    return out


def cluster_status(kube: str, output: str) -> int:
    """Print every node (with an agent report or not); 1 when a node has no running agent,
    Envoy rejected its config, or it reports errors."""
    api = api_client(None if kube == "in-cluster" else kube)
    try:
        nodes = sorted(str(n["metadata"]["name"]) for n in request(api, "GET", api_path(NODES)).get("items") or [])
        got = reports(api)
    except Exception as e:  # noqa: BLE001 - the API's answer, said in one line
        err.print(f"[red]error:[/] read the cluster: {escape(str(e))}")
        return 1
    if output in ("json", "yaml"):
        dump({n: got.get(n) for n in sorted(set(nodes) | set(got))}, output, sort_keys=True)
    else:
        table = Table(title=f"Webb on {len(nodes)} node(s)")
        for col in ("node", "agent", "plan (datapath)", "Envoy config", "rejected by Envoy", "errors"):
            table.add_column(col)
        for n in sorted(set(nodes) | set(got)):
            r = got.get(n)
            if r is None:
                table.add_row(escape(n), "[red]no report[/]", "-", "-", "-", "-")
                continue
            rejected = "; ".join([*(f"{t}: {e}" for t, e in (r.get("envoyRejected") or {}).items()),
                                  *(f"{o} (quarantined): {e}" for o, e in (r.get("quarantined") or {}).items())])
            table.add_row(escape(n), "running" if r.get("running") else "[red]stopped[/]", escape(str(r.get("datapathVersion") or "-")),
                          escape(str(r.get("envoyVersion") or "-")), f"[red]{escape(rejected)}[/]" if rejected else "-",
                          escape("; ".join(r.get("errors") or [])) or "-")
        console.print(table)
    bad = [n for n in nodes if not (got.get(n) or {}).get("running") or (got.get(n) or {}).get("envoyRejected")
           or (got.get(n) or {}).get("quarantined") or (got.get(n) or {}).get("errors")]
    return 1 if bad else 0


