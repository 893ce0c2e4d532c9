"""The datapath suite and the mTLS end-to-end test again, under Debian's 6.1 LTS kernel in qemu
(two kernels in every run; the guest has kTLS, this host does not). The guest run starts when
collection ends and overlaps the host's tests (tests/vm/conftest.py)."""

import re

import pytest

from tests.vm.conftest import TARGETS, GuestRun

pytestmark = [pytest.mark.root, pytest.mark.vm]


def test_datapath_suite_and_mtls_pass_on_debian_6_1(guest_run: GuestRun) -> None:
    """``pytest tests/datapath tests/e2e/test_mtls.py`` in the guest: every test passes there, on a 6.1
    kernel. The mTLS test runs two agents on a wire: the tunnel's records are the kernel's (kTLS), L4 and L7
    (Envoy-originated TLS into a kTLS receiver), STRICT and PERMISSIVE."""
    rc, out = guest_run.wait()
    lines = out.splitlines()
    failed = [ln for ln in lines if re.search(r"\b(FAILED|ERROR)\b", ln)]
    tail = "\n".join([*failed, *lines[-30:], f"(the whole console: {guest_run.log})"])
    assert rc == 0, tail
    assert "kernel 6.1." in out, tail
    summary = [ln for ln in lines if re.search(r"\d+ passed", ln)]
    assert summary and not re.search(r"failed|error", summary[-1]), tail
    for target in TARGETS:  # -rfEp lists every test's outcome: each target ran and passed there
        assert re.search(rf"^\s*vm\| PASSED {re.escape(target)}", out, re.M), f"no test of {target} passed\n{tail}"
