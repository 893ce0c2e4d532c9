"""`make bench`: every benchmark, one table, figures merged into bench/results.json."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import datapath, operator, xds

RESULTS = Path(__file__).resolve().parent / "results.json"


def main() -> None:
    console = Console()
    t0 = time.monotonic()
    results: dict[str, float | str] = {"meta.kernel": platform.release(), "meta.time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                                     time.gmtime())}
    figures, rows = datapath.run()
    results.update(figures)
    table = Table(title=f"datapath on {platform.release()} (ratio = mesh path / direct, same run)")
    for col in ("measure", "direct (no hook)", "mesh path (VIP)", "ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    console.print(table)
    figures, xds_rows = xds.run()
    results.update(figures)
    table = Table(title="xDS: 10,000 services into a real Envoy (ratio = delta / state of the world, same run)")
    for col in ("measure", "state of the world", "delta", "ratio"):
        table.add_column(col)
    for row in xds_rows:
        table.add_row(*row)
    console.print(table)
    figures, op_rows = operator.run()
    results.update(figures)
    table = Table(title="operator: MeshPolicy on a real kube-apiserver → agent --kube (BPF + Envoy) converged, one node")
    for col in ("measure", "p50", "p99", "note"):
        table.add_column(col)
    for row in op_rows:
        table.add_row(*row)
    console.print(table)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    console.print(f"wrote {RESULTS} ({len(results)} figures) in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
