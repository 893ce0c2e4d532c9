"""Same-node sockmap acceleration: the self-test passes on this kernel, really goes through the
sockhash, and switching it off returns traffic to the normal path."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from datapath.loader import Datapath, pin_dir_for
from datapath.maps import DatapathState
from mesh.agent.accel import FULL, Accelerator, Load
from mesh.runtime.local import LocalNode
from tests.conftest import SLOW

pytestmark = [pytest.mark.root, pytest.mark.bpf]


@pytest.fixture
def accel(node: LocalNode) -> Iterator[Accelerator]:
    dp = Datapath(str(node.config.pods_cgroup), pin_dir_for(node.config.name))
    a = Accelerator(node, dp, Load(FULL.pairs, FULL.sizes, FULL.timeout_s * SLOW))
    try:
        dp.apply(DatapathState(endpoints=a.start_pods()))
        yield a
    finally:
        a.stop()
        dp.close(unpin=True)


def _self_test_passes(accel: Accelerator) -> None:
    """The self-test must pass. One exception, in the Debian 6.1 guest only: its sockmap once
    delivered a 1 MiB stream altered under emulation (a kernel defect; 6.18 on the host never
    did). There the gate must have held — acceleration off, the reason naming the bad bytes —
    and the test is an expected failure that says so, not a pass."""
    st = accel.self_test()
    if not st.enabled and os.environ.get("WEBB_IN_VM") and "other bytes than were sent" in st.reason:
        assert not accel.dp.acceleration, "the self-test failed but acceleration stayed on"
        pytest.xfail(f"6.1 guest: sockmap altered a stream, acceleration kept off: {st.reason}")
    assert st.enabled, st.reason


def test_self_test_passes_and_engages(accel: Accelerator) -> None:
    _self_test_passes(accel)
    assert accel.dp.acceleration
    counts = accel.dp.accel_counts()
    assert counts["redirected"] > 1000 and counts["sockets"] >= 2 * 16 * 8
    assert accel.canary().enabled


def test_switched_off_traffic_takes_the_normal_path(accel: Accelerator) -> None:
    _self_test_passes(accel)
    accel.dp.set_acceleration(False)
    before = accel.dp.accel_counts()
    # every byte arrives and checks out, but no new socket joins the hash and nothing is redirected
    why = accel._run(Load(2, (1, 65536), 5.0 * SLOW))
    assert why is not None and why.startswith("vacuous"), why
    after = accel.dp.accel_counts()
    assert after["redirected"] == before["redirected"] and after["sockets"] == before["sockets"]
