"""Timings and memory of the one-node cluster, for docs/testing.md: ``python -m tests.cluster.measure [--runs N]``.

Per run: node start to Ready (and its steps), one busybox pod and one python pod from ``kubectl apply``
to Ready, ten pods at once, the RSS of each daemon, and the stop; then the leftover check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from tests.cluster.node import KubeNode


def _pod(name: str, image: str, command: list[str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"m": "1"}},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never", "command": command}]}}


def _ready_s(node: KubeNode, *docs: dict[str, Any]) -> float:
    t0 = time.monotonic()
    node.apply(*docs)
    node.kubectl("wait", "--for=condition=Ready", *(f"pod/{d['metadata']['name']}" for d in docs), "--timeout=120s", timeout_s=130)
    return time.monotonic() - t0


def one_run() -> dict[str, Any]:
    node = KubeNode()
    t0 = time.monotonic()
    node.start()
    out: dict[str, Any] = {"up_s": round(time.monotonic() - t0, 2), "steps": dict(node.timings)}
    try:
        out["busybox_pod_ready_s"] = round(_ready_s(node, _pod("bb", "webb.local/busybox:1", ["sleep", "3600"])), 2)
        out["python_pod_ready_s"] = round(_ready_s(node, _pod("py", "webb.local/python:1",
                                                              ["python3", "-m", "http.server", "8080"])), 2)
        out["ten_pods_ready_s"] = round(_ready_s(node, *(_pod(f"p{i}", "webb.local/busybox:1", ["sleep", "3600"])
                                                         for i in range(10))), 2)
        time.sleep(5)  # let the start-up churn settle before reading memory
        out["rss_mib"] = {k: round(v / 1024, 1) for k, v in node.rss_kib().items()}
        out["rss_total_mib"] = round(sum(out["rss_mib"].values()), 1)
    finally:
        notes = node.stop()
    out["stop_s"] = node.timings["stop"]
    out["stop_notes"] = notes
    out["left"] = node.leftovers()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        r = one_run()
        runs.append(r)
        print(f"run {i + 1}: {json.dumps(r)}", flush=True)
    for key in ("up_s", "busybox_pod_ready_s", "python_pod_ready_s", "ten_pods_ready_s", "rss_total_mib", "stop_s"):
        vals = [r[key] for r in runs]
        print(f"{key:22} min {min(vals):7.2f}  median {statistics.median(vals):7.2f}  max {max(vals):7.2f}")
    return 1 if any(r["left"] for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
