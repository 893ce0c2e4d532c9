"""The datapath suite and the mTLS end-to-end test again, under Debian's 6.1 LTS kernel in qemu
(two kernels in every run; the guest has kTLS, this host does not)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.root, pytest.mark.vm]


def _pytest_in_guest(target: str) -> None:
    """``pytest target`` in the guest: it must pass there, on a 6.1 kernel."""
    r = subprocess.run([sys.executable, "-m", "tests.vm.run", "--timeout", "900", "--",
                        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target],
                       cwd=ROOT, capture_output=True, text=True, timeout=1000)
    tail = "\n".join(r.stdout.splitlines()[-25:])
    assert r.returncode == 0, tail
    assert "kernel 6.1." in r.stdout and " passed" in r.stdout, tail


def test_datapath_suite_passes_on_debian_6_1() -> None:
    _pytest_in_guest("tests/datapath")


def test_mtls_between_two_nodes_with_ktls_on_debian_6_1() -> None:
    """Two agents on a wire in the guest: the tunnel's records are the kernel's (kTLS), L4 and L7
    (Envoy-originated TLS into a kTLS receiver), STRICT and PERMISSIVE (tests/e2e/test_mtls.py)."""
    _pytest_in_guest("tests/e2e/test_mtls.py")
