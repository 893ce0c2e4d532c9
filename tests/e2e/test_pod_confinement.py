"""A pod of the embedded runtime is an attacker (issue 13): it holds no capability, sees the node's
files read-only, cannot leave its cgroup, cannot see or signal the node's processes, cannot open a
raw socket (so cannot hand-craft a SYN past the datapath's connect() checks) or forge a source
address; it can still bind a port below 1024 (the deathstar serves :80)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, leftovers
from tests.e2e.l7_support import agent, apply, in_pod, status

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]

PROBE = r'''
import json, os, socket, sys
state, agent_pid = sys.argv[1], int(sys.argv[2])
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ALLOWED"
    except OSError as e:
        out[name] = type(e).__name__ + ": " + (e.strerror or str(e))
attempt("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
attempt("packet_socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
def forge():
    s = socket.socket()
    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT: bind an address that is not the pod's
    s.bind(("10.244.0.99", 0))
attempt("forge_source", forge)
attempt("write_manifest", lambda: open(os.path.join(state, "manifests", "evil.yaml"), "w"))
attempt("write_etc", lambda: open("/etc/webb-evil", "w"))
attempt("leave_cgroup", lambda: open("/sys/fs/cgroup/cgroup.procs", "w").write(str(os.getpid())))
attempt("signal_agent", lambda: os.kill(agent_pid, 0))
attempt("bpf_pins", lambda: os.listdir("/sys/fs/bpf/webb"))
attempt("bind_80", lambda: socket.socket().bind(("0.0.0.0", 80)))
out["caps"] = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff"))
out["processes"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(json.dumps(out))
'''


def test_a_pod_cannot_reach_past_its_sandbox(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent(state) as proc:
        apply(state, ROOT / "examples/starwars/01-app.yaml")
        r = in_pod(state, "xwing", ["python3", "-c", PROBE, str(state), str(proc.pid)])
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["caps"] == "0000000000000000"
        for attack in ("raw_socket", "packet_socket", "forge_source", "write_manifest", "write_etc", "leave_cgroup",
                       "signal_agent"):
            assert got[attack] != "ALLOWED", (attack, got)
        assert "Read-only file system" in got["write_manifest"], got
        assert "No such process" in got["signal_agent"], got  # not visible in the pod's pid namespace
        assert got["bind_80"] == "ALLOWED", got
        assert len(got["processes"]) <= 2, got  # the probe (and its init), nothing of the node
        assert not (state / "manifests" / "evil.yaml").exists()
        assert status(state).get("running")
    assert leftovers("webb-node1-") == []
