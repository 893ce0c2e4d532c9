"""`make bench`: every benchmark, one table, figures merged into bench/results.json."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import datapath, kube, l7, manifests, operator, tunnel, xds

RESULTS = Path(__file__).resolve().parent / "results.json"


def _table(title: str, columns: tuple[str, ...], rows: Sequence[Sequence[str]]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table


def main() -> None:
    console = Console()
    t0 = time.monotonic()
    results: dict[str, float | str] = {"meta.kernel": platform.release(), "meta.time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                                     time.gmtime())}
    benches: list[tuple[Callable[[], tuple[dict[str, float], Sequence[Sequence[str]]]], str, tuple[str, ...]]] = [
        (datapath.run, f"datapath on {platform.release()} (ratio = mesh path / direct, same run)",
         ("measure", "direct (no hook)", "mesh path (VIP)", "ratio")),
        (xds.run, "xDS: 10,000 services into a real Envoy (ratio = delta / state of the world, same run)",
         ("measure", "state of the world", "delta", "ratio")),
        (tunnel.run, "mTLS tunnel between two nodes (netns) on a wire (ratio = tunnel / plaintext, same run)",
         ("measure", "plaintext", "tunnel", "ratio")),
        (l7.run, "L7: Webb's node Envoy vs two sidecar Envoys (fortio, same run; ratio = Webb / sidecars)",
         ("measure", "direct", "Webb", "sidecars", "ratio")),
        (manifests.run, "manifests: a 1 MB MeshPolicy (14,000 HTTP rules) validated, and applied to enforced (embedded agent)",
         ("measure", "baseline", "1 MB policy", "ratio")),
        (operator.run, "operator: MeshPolicy on a real kube-apiserver → agent --kube (BPF + Envoy) converged, one node",
         ("measure", "p50", "p99", "note")),
        (kube.run, "kubelet's pods under Webb: a real one-node cluster (tests/cluster), agent --kube",
         ("measure", "p50", "p99", "note")),
    ]
    for run, title, columns in benches:
        figures, rows = run()
        results.update(figures)
        console.print(_table(title, columns, rows))
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    console.print(f"wrote {RESULTS} ({len(results)} figures) in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
