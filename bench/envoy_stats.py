"""What Envoy's stats cost: the node Envoy's memory with the agent's stats matcher before the RED
stats (config plane and server only), with them (the default: each L7 service's
downstream_rq_* counters and request time histogram, xds/envoy.py), and with every stat.

N L7 services as bench/xds.py makes them (one MeshPolicy with an HTTP rule: every service L7),
pushed by our xDS server to a fresh Envoy per variant, measured after a stats flush. Not part of
`make bench` (a figure for docs/metrics.md): ``python3 -m bench.envoy_stats 300``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.xds import NODE, _rss_mb, _state
from mesh.plan.node import NodeSpec, plan_node
from xds import resources as r
from xds.cache import Snapshot, SnapshotCache
from xds.envoy import Envoy, EnvoyConfig
from xds.server import XdsServer

VARIANTS = ("before", "red", "all")


def one(n: int, variant: str) -> dict[str, float | str]:
    plan = plan_node(_state(n), NodeSpec(NODE, proxy_ip="127.0.0.2"))
    with tempfile.TemporaryDirectory(prefix="webb-bench-stats-") as tmp:
        snap = Snapshot.stream(r.build_items(list(plan.http), str(Path(tmp) / "access.jsonl"), upstreams=list(plan.upstreams)))
        cache = SnapshotCache()
        cache.set_snapshot(NODE, Snapshot.of({}))
        server = XdsServer(cache)
        server.start()
        cfg = EnvoyConfig(NODE, server.path, 0, Path(tmp))
        cfg = {"before": replace(cfg, stats_regexes=()), "red": cfg, "all": replace(cfg, stats_prefixes=())}[variant]
        envoy = Envoy(cfg)
        try:
            envoy.start()
            envoy.wait_ready(timeout_s=30)
            t0 = time.perf_counter()
            cache.set_snapshot(NODE, snap)
            if not cache.wait_acked(NODE, snap, 120):
                raise RuntimeError(f"snapshot not ACKed: {cache.status(NODE)}")
            ack_s = time.perf_counter() - t0
            time.sleep(6)  # one stats flush (5 s): histograms are made
            allocated = int(json.loads(envoy.admin("/memory", timeout_s=10))["allocated"])
            stats = envoy.admin("/stats", timeout_s=30).count("\n")
            return {"variant": variant, "services": float(n), "push_ack_s": round(ack_s, 3), "stats": float(stats),
                    "envoy_allocated_mb": round(allocated / 2**20, 1),
                    "envoy_rss_mb": round(_rss_mb(envoy.proc.pid), 1) if envoy.proc else 0.0}
        finally:
            envoy.stop()
            server.stop()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    for v in sys.argv[2:] or VARIANTS:
        print(json.dumps(one(n, v)), flush=True)
