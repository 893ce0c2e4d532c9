"""The datapath suite again, under Debian's 6.1 LTS kernel in qemu: two kernels in every run."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.root, pytest.mark.vm]


def test_datapath_suite_passes_on_debian_6_1() -> None:
    r = subprocess.run([sys.executable, "-m", "tests.vm.run", "--timeout", "900", "--",
                        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/datapath"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1000)
    tail = "\n".join(r.stdout.splitlines()[-25:])
    assert r.returncode == 0, tail
    assert "kernel 6.1." in r.stdout and " passed" in r.stdout, tail
