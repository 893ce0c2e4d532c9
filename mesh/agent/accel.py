"""Same-node sockmap acceleration: switched on only after a stress self-test on this kernel,
switched off again when a periodic canary stalls.

Cilium removed this feature in 1.14 ("broken for a while"); others report stalls on 6.12. So
the agent proves it on the running kernel first: many concurrent pod pairs, sizes from 1 byte
to 4 MiB written in uneven chunks, half-close, every byte checked for loss and order, every
operation bounded in time; and the test must actually have gone through the sockhash.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from datapath.loader import Datapath
from mesh.model import SYSTEM_NAMESPACE
from mesh.runtime.local import LocalNode, Sandbox

WORKLOAD = Path(__file__).resolve().parent / "accel_workload.py"
PODS = (f"{SYSTEM_NAMESPACE}/accel-a", f"{SYSTEM_NAMESPACE}/accel-b")
PORT = 7000
IDENTITY = 3  # reserved: the node's own self-test pods


@dataclass(frozen=True)
class Load:
    pairs: int  # concurrent connections
    sizes: tuple[int, ...]  # bytes each pair sends (and gets back) per connection, in turn
    timeout_s: float  # longest any socket operation may block: beyond it is a stall


FULL = Load(16, (1, 7, 100, 1460, 4096, 65536, 1 << 20, 4 << 20), 10.0)
CANARY = Load(2, (1, 65536, 1 << 20), 5.0)


@dataclass
class AccelStatus:
    enabled: bool = False
    reason: str = "not requested (opt-in: --sockmap)"
    checked_at: float = 0.0
    last_run_s: float = 0.0


class Accelerator:
    """Owns the self-test pods; ``endpoints`` must be part of the datapath state while it runs."""

    def __init__(self, node: LocalNode, dp: Datapath, load: Load = FULL) -> None:
        self.node, self.dp, self.load = node, dp, load
        self.status = AccelStatus()
        self.server: Sandbox | None = None
        self.client: Sandbox | None = None

    def start_pods(self) -> dict[str, tuple[int, int]]:
        self.server = self.node.ensure_pod(PODS[0], [sys.executable, str(WORKLOAD), "server", str(PORT), "86400"])
        self.client = self.node.ensure_pod(PODS[1], ["sleep", "86400"])
        return self.endpoints()

    def endpoints(self) -> dict[str, tuple[int, int]]:
        return {sb.ip: (IDENTITY, 0) for sb in (self.server, self.client) if sb is not None}

    def _run(self, load: Load) -> str | None:
        """None if the workload passed through the sockhash, else why not."""
        pairs, sizes, timeout_s = load.pairs, load.sizes, load.timeout_s
        assert self.server is not None and self.client is not None
        before = self.dp.accel_counts()
        p = self.node.spawn(self.client, [sys.executable, str(WORKLOAD), "client", self.server.ip, str(PORT), str(pairs),
                                          ",".join(map(str, sizes)), str(timeout_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(timeout=timeout_s * len(sizes) + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            return "the workload stalled past its deadline"
        if p.returncode != 0:
            return f"the workload failed: {err.decode()[-300:]}"
        result = json.loads(out)
        if result["errors"]:
            return "; ".join(result["errors"])
        after = self.dp.accel_counts()
        if after["redirected"] <= before["redirected"] or after["sockets"] - before["sockets"] < 2 * pairs:
            return "vacuous: traffic did not go through the sockhash (acceleration did not engage)"
        return None

    def _wait_server(self, timeout_s: float = 10.0) -> None:
        assert self.server is not None and self.client is not None
        deadline = time.monotonic() + timeout_s
        while self._run(Load(1, (1,), 2.0)) is not None and time.monotonic() < deadline:
            time.sleep(0.1)

    def self_test(self) -> AccelStatus:
        """Turn acceleration on for the test; keep it on only if everything held."""
        t0 = time.monotonic()
        self.dp.set_acceleration(True)
        self._wait_server()
        why = self._run(self.load)
        self.dp.set_acceleration(why is None)
        self.status = AccelStatus(why is None, "self-test passed" if why is None else f"self-test failed: {why}",
                                  time.time(), round(time.monotonic() - t0, 2))
        return self.status

    def canary(self) -> AccelStatus:
        """A small run through the accelerated path; a stall or a bad byte switches it off."""
        if not self.status.enabled:
            return self.status
        t0 = time.monotonic()
        why = self._run(CANARY)
        if why is not None:
            self.dp.set_acceleration(False)
            self.status = AccelStatus(False, f"switched off: canary failed: {why}", time.time())
        else:
            self.status.checked_at, self.status.last_run_s = time.time(), round(time.monotonic() - t0, 2)
        return self.status

    def stop(self) -> None:
        self.dp.set_acceleration(False)
        if self.status.enabled:
            self.status = AccelStatus(False, "off: the agent stopped", time.time())
        for key in PODS:
            self.node.remove_pod(key)
        self.server = self.client = None
