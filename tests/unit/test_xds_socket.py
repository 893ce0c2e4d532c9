"""The xDS server is reachable only by its own user (issue 13): a unix socket (0600) in a 0700
directory, no TCP port; a directory with other rights is refused; a stream whose Envoy does not
read is closed at a bounded queue instead of growing."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from xds.cache import SnapshotCache
from xds.server import _STOP, OUT_QUEUE, XdsServer, _Stream

CONNECT = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')"


@pytest.mark.root
def test_only_the_servers_user_can_connect() -> None:
    server = XdsServer(SnapshotCache())
    server.start()
    try:
        assert stat.S_IMODE(server.dir.stat().st_mode) == 0o700 and stat.S_IMODE(server.path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(server.path.stat().st_mode)
        mine = subprocess.run([sys.executable, "-c", CONNECT, str(server.path)], capture_output=True, text=True, timeout=30)
        assert mine.stdout.strip() == "connected", mine.stderr
        other = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c", CONNECT,
                                str(server.path)], capture_output=True, text=True, timeout=30)
        assert other.returncode != 0 and "Permission denied" in other.stderr, other.stdout + other.stderr
    finally:
        server.stop()
    assert not server.dir.exists()


def test_a_directory_others_can_enter_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "xds"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)  # noqa: S103 - the careless setup this test refuses
    with pytest.raises(OSError, match="it must be 0700"):
        XdsServer(SnapshotCache(), d)


def test_a_stream_envoy_does_not_read_is_closed_not_grown() -> None:
    stream = _Stream(SnapshotCache(), Counter())
    for i in range(OUT_QUEUE + 10):
        stream._emit(f"response {i}", "sotw", 1)  # noqa: SLF001 - what the protocols call
    assert stream.overflowed and stream.out.qsize() == 1 and stream.out.get_nowait() is _STOP
