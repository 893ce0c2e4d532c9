"""The real `hubble` CLI for the tests of `webb hubble serve` (tests/unit/test_hubble_server.py,
tests/e2e/test_hubble.py): built from github.com/cilium/cilium (tools/hubble/go.mod's release) once by
`make hubble-cli`, cached in /var/cache/webb/hubble/<release>; run with no config file of the user's."""

from __future__ import annotations

import subprocess
from functools import cache

from tests.conftest import ROOT

# no ~/.config/hubble, no HUBBLE_* of the caller's: the flags given are all it knows
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "HUBBLE_CONFIG": "/dev/null"}


@cache
def hubble_binary() -> str:
    """The binary's path (tools/hubble/build.sh cli: instant when built; else it builds it, minutes)."""
    r = subprocess.run(["bash", str(ROOT / "tools/hubble/build.sh"), "cli"], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"could not build the hubble CLI: {r.stderr[-3000:]}"
    return r.stdout.strip().splitlines()[-1]


def run_hubble(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([hubble_binary(), *args], capture_output=True, text=True, timeout=timeout_s, env=ENV)


def popen_hubble(*args: str) -> subprocess.Popen[str]:
    """A long-running hubble (observe --follow): the caller stops it by its pid."""
    return subprocess.Popen([hubble_binary(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
