"""The guest run starts as soon as collection ends, in the background, so that its emulated CPU
(TCG: one host core, tens of minutes) overlaps the host's own tests instead of following them;
``tests/vm/test_second_kernel.py`` waits for its result. One boot runs every guest target: the
interpreter's imports over 9p cost minutes per boot."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

TARGETS = ("tests/datapath", "tests/e2e/test_mtls.py")
GUEST_TIMEOUT_S = 3300  # the whole guest run; the test waits a little longer for qemu's own exit


class GuestRun:
    """One qemu run of ``pytest TARGETS`` in the 6.1 guest, its console in a log file."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="webb-vm-", suffix=".log")
        self.log = Path(name)
        argv = [sys.executable, "-m", "tests.vm.run", "--timeout", str(GUEST_TIMEOUT_S), "--",
                sys.executable, "-m", "pytest", "-v", "-rfEp", "-p", "no:cacheprovider",
                "--durations=12", "-o", "faulthandler_timeout=600", *TARGETS]
        with os.fdopen(fd, "w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=GUEST_TIMEOUT_S + 120)
        except subprocess.TimeoutExpired:
            self.stop()
            rc = -1
        return rc, self.log.read_text(errors="replace")

    def stop(self) -> None:
        """The runner kills only the qemu it started; a runner still alive here is ours to kill."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_run: GuestRun | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _run
    wanted = [i for i in session.items if i.get_closest_marker("vm") and Path(str(i.path)).parent == Path(__file__).parent]
    if wanted and _run is None and os.geteuid() == 0 and not session.config.option.collectonly:
        _run = GuestRun()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _run is not None:
        _run.stop()
        if _run.proc.returncode == 0:  # a failed run's console stays for reading (the test names its path)
            _run.log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def guest_run() -> GuestRun:
    global _run
    if _run is None:  # selected some other way (e.g. a plugin reordered collection): start it now
        _run = GuestRun()
    return _run
