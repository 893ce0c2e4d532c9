"""Flow events: every counted decision reaches the agent's consumer at the 10,000 connects/s
the datapath promises, sustained for 5 s (50,000 events: far more than the ring buffer holds).
Faster rates, and what is lost there, are make bench's (datapath.storm_*)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bench import workload
from datapath.loader import Datapath, pin_dir_for
from datapath.maps import DatapathState
from datapath.types import Reason, ServiceEntry
from mesh.agent.flows import FlowLog, Names, from_event
from mesh.runtime.local import LocalNode
from tests.conftest import SLOW

pytestmark = [pytest.mark.root, pytest.mark.bpf]
VIP = "10.96.202.10"
RATE = 10000
# the emulated qemu guest checks the ring buffer's semantics on 6.1, not the rate: a count the
# ring holds whole (its CPU runs client and consumer ~10x slower)
COUNT = 10000 if os.environ.get("WEBB_IN_VM") else 50000
# Refused connects (the service has no backend): each one is a counted, reported decision.
# bench.workload's connect storm, paced (in steps of 100) so the rate holds on a fast host
# (unpaced it reaches ~200,000/s); stopped by its time limit if the rate cannot be held at all.
LIMIT_S = 60 * SLOW


def test_no_event_lost_under_a_connect_storm(node: LocalNode, tmp_path: Path) -> None:
    cli = node.ensure_pod("default/storm", ["sleep", "60"])
    dp = Datapath(str(node.config.pods_cgroup), pin_dir_for(node.config.name))
    try:
        dp.apply(DatapathState(services=[ServiceEntry(VIP, 80, 3, ())]))
        log = FlowLog(tmp_path / "flows.jsonl")
        names = Names(pod_by_cgroup={cli.cgroup_id: cli.key})
        got: list[int] = []
        stop = threading.Event()

        def consume() -> None:  # what the agent does with each event
            while not stop.is_set():
                flows = [from_event(e, names) for e in dp.poll_events(50)]
                log.write(flows)
                got.append(len(flows))

        t = threading.Thread(target=consume)
        t.start()
        p = node.spawn(cli, workload.argv("storm", VIP, 80, COUNT, RATE, LIMIT_S), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=LIMIT_S + 60)
        deadline = time.monotonic() + 10 * SLOW
        while dp.events_lost() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        t.join(timeout=15 * SLOW)
        assert not t.is_alive()
        assert p.returncode == 0, err.decode()[-500:]
        storm = workload.Storm.parse(out)
        rate = storm.per_s
        print(f"storm: {rate:.0f} connects/s")
        assert storm.connects == COUNT, f"the storm stopped at its time limit ({LIMIT_S:.0f} s)"
        assert storm.refused == COUNT
        if not os.environ.get("WEBB_IN_VM"):  # the qemu guest is emulated (~2,500/s): loss only
            assert rate >= 0.9 * RATE, "the client could not reach the rate under test"
        assert dp.reason_counts()[Reason.NO_BACKEND] == COUNT
        assert sum(got) == COUNT and dp.events_lost() == 0
        # every flow was written: the current file and the one rotation keeps (8 MiB each)
        assert sum(1 for f in tmp_path.glob("flows.jsonl*") for _ in open(f)) == COUNT
    finally:
        dp.close(unpin=True)
