"""`webb doctor` on this kernel: everything the datapath needs is found (CI's kernel has it all)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from datapath import probes
from tests.conftest import ROOT

pytestmark = [pytest.mark.root, pytest.mark.bpf]


def test_required_features_present() -> None:
    results = {p.name: p for p in probes.run()}
    missing = [n for n, p in results.items() if p.required and not p.ok]
    assert missing == []
    assert results["cgroup v2 mount"].detail.startswith("/")


def test_ktls_probe_matches_the_kernel() -> None:
    # cross-check with sysfs: the probe's setsockopt loads the tls module when the kernel has it
    from mesh.cli.main import doctor_probes

    (p,) = [p for p in doctor_probes() if p.name.startswith("kTLS")]
    assert p.ok == Path("/sys/module/tls").exists(), p.detail


def test_doctor_exit_status_and_json() -> None:
    r = subprocess.run([sys.executable, "-m", "mesh.cli", "doctor", "-o", "json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert any(p["name"] == "map type ringbuf" and p["ok"] for p in json.loads(r.stdout))
