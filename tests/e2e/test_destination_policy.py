"""Policy holds on every path into a pod (issue 13), shown from the Star Wars pods against rule1:
before, each of these got through, since policy was checked only at the sender's connect().

- tiefighter (allowed only POST /v1/request-landing, through the Service) straight to a deathstar
  pod IP: refused at its connect() (l7-bypass: the L7 rules apply only through the node proxy);
- xwing (denied) to a deathstar's IPv6 link-local address: the SYN is dropped where it arrives (the
  receiving pod is found by its socket's cgroup, whatever address was used);
- a hand-made SYN from a raw socket in xwing's network namespace (as a pod with NET_RAW could send
  in a cluster): no SYN-ACK comes back, and the drop is a flow naming xwing."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import pytest

from mesh.runtime.local import call_in_netns
from tests.conftest import ROOT, leftovers
from tests.e2e.l7_support import agent, apply, curl, in_pod, status

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]
STARWARS = ROOT / "examples/starwars"


def _flows(state: Path) -> list[dict[str, object]]:
    p = state / "flows.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _wait_flow(state: Path, match: object, timeout_s: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [f for f in _flows(state) if match(f)]  # type: ignore[operator]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, _flows(state)[-10:]
        time.sleep(0.1)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _raw_syn(src: str, dst: str, dport: int, wait_s: float = 2.0) -> bool:
    """Send one SYN by hand from ``src`` (in the caller's netns); True if a SYN-ACK came back."""
    sport = 40000 + int(time.time()) % 20000
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 12345, 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
        s.bind((src, 0))
        s.settimeout(0.2)
        s.sendto(tcp, (dst, 0))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                pkt = s.recv(65535)
            except TimeoutError:
                continue
            ihl = (pkt[0] & 0xF) * 4
            got_src = socket.inet_ntoa(pkt[12:16])
            sp, dp, _, _, _, flags = struct.unpack("!HHIIBB", pkt[ihl:ihl + 14])
            if got_src == dst and sp == dport and dp == sport and flags & 0x12 == 0x12:
                return True
    return False


def _link_local(netns: str) -> str:
    from pyroute2 import IPRoute

    def read() -> str:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname="eth0")[0]
            return next(str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=socket.AF_INET6, index=idx)
                        if str(a.get_attr("IFA_ADDRESS")).startswith("fe80:"))
    deadline = time.monotonic() + 10  # the kernel makes it when eth0 comes up
    while True:
        try:
            return call_in_netns(netns, read)
        except StopIteration:
            assert time.monotonic() < deadline, "no link-local address on the deathstar's eth0"
            time.sleep(0.2)


def test_policy_holds_on_every_path_into_the_pod(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent(state):
        apply(state, STARWARS / "01-app.yaml")
        apply(state, STARWARS / "policy.yaml")
        pods = status(state)["pods"]
        ds, xwing = pods["default/deathstar-1"], pods["default/xwing"]
        assert curl(state, "tiefighter", "http://deathstar.default.svc.cluster.local/v1/request-landing", "-X", "POST")[0] == 200

        # 1. the pod IP instead of the Service: refused at connect(), named
        code, said = curl(state, "tiefighter", f"http://{ds['ip']}/v1/exhaust-port", "-X", "PUT")
        assert code == 0 and "Panic" not in said, said
        denied = _wait_flow(state, lambda f: f.get("reason") == "l7-bypass")
        assert denied["verdict"] == "denied" and denied["src"] == "default/tiefighter", denied
        assert "only the node proxy" in str(denied["why"]), denied

        # 2. an IPv6 link-local address: the SYN is dropped in the deathstar's kernel
        ll = _link_local(ds["netns"])
        r = in_pod(state, "xwing", ["curl", "-sS", "-g", "--max-time", "3", "-X", "POST",
                                    f"http://[{ll}%eth0]/v1/request-landing"])
        assert r.returncode != 0 and "Ship landed" not in r.stdout, r.stdout + r.stderr
        dropped = _wait_flow(state, lambda f: f.get("verdict") == "dropped" and f.get("reason") == "policy-denied"
                             and str(f.get("dst", "")).startswith(ll))
        assert dropped["dst_pod"] == "default/deathstar-1" and "checked where it arrived" in str(dropped["why"]), dropped

        # 3. a raw-socket SYN (no connect(), no sendmsg() hook): no SYN-ACK
        assert not call_in_netns(xwing["netns"], lambda: _raw_syn(xwing["ip"], ds["ip"], 80))
        raw = _wait_flow(state, lambda f: f.get("verdict") == "dropped" and f.get("src") == "default/xwing"
                         and f.get("dst") == f"{ds['ip']}:80")
        assert raw["reason"] == "policy-denied", raw
        # the same SYN from tiefighter's address is allowed at L4... but port 80 has L7 rules: only the proxy
        tie = pods["default/tiefighter"]
        assert not call_in_netns(tie["netns"], lambda: _raw_syn(tie["ip"], ds["ip"], 80))
        _wait_flow(state, lambda f: f.get("verdict") == "dropped" and f.get("reason") == "l7-bypass")

        # the Service path still works as before
        assert curl(state, "tiefighter", "http://deathstar.default.svc.cluster.local/v1/request-landing", "-X", "POST")[0] == 200
    assert leftovers("webb-node1-") == []
