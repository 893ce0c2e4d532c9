"""MeshRoute end to end: real agent, kernel redirect to the node Envoy, curl from a pod.

Weighted splits are counted over a bounded number of requests; the 50/50 bound is loose
enough that a fair split fails it with probability < 1e-6 (binomial, n=200).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.l7_support import EXAMPLE, agent, apply, curl, eventually, flows, status

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]
URL = "http://web.default.svc.cluster.local"
N = 200


def _served_by(state: Path, n: int, path: str = "/") -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        code, body = curl(state, "client", URL + path)
        seen[body.split()[0] if code == 200 else f"HTTP {code}"] += 1
    return seen


def _with_weights(tmp: Path, v1: int, v2: int) -> Path:
    text = (EXAMPLE / "route.yaml").read_text()
    text = text.replace("{name: web-v1, port: 80, weight: 50}", f"{{name: web-v1, port: 80, weight: {v1}}}")
    text = text.replace("{name: web-v2, port: 80, weight: 50}", f"{{name: web-v2, port: 80, weight: {v2}}}")
    out = tmp / "route.yaml"  # same file name: applying it replaces the example's route
    out.write_text(text)
    return out


def test_meshroute_split_match_timeout_retry(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent(state):
        apply(state, EXAMPLE / "01-app.yaml")
        code, _ = eventually(lambda: curl(state, "client", URL + "/"), lambda r: r[0] == 200)
        assert code == 200
        assert not any(s["proxy_port"] for s in status(state)["services"])  # no route, no policy: L4 only

        apply(state, _with_weights(tmp_path, 100, 0))
        assert any(s["proxy_port"] for s in status(state)["services"])  # web:80 is now an Envoy listener
        assert _served_by(state, 50) == Counter({"web-v1": 50})

        apply(state, EXAMPLE / "route.yaml")  # 50/50
        seen = _served_by(state, N)
        assert set(seen) == {"web-v1", "web-v2"}, seen
        assert 60 <= seen["web-v1"] <= 140, seen

        # header match: the canary header goes to v2 only, whatever the split
        canary = Counter(curl(state, "client", URL + "/", "-H", "x-canary: 1")[1].split()[0] for _ in range(20))
        assert canary == Counter({"web-v2": 20})

        # timeout: /slow takes 3 s on web-v1, the route allows 1 s → Envoy answers 504
        code, body = curl(state, "client", URL + "/slow")
        assert code == 504 and "upstream request timeout" in body

        # retries: web-v1 fails the first two requests per key with 503; attempts: 2 → third try succeeds
        code, body = curl(state, "client", URL + "/flaky/a")
        assert (code, body.split()[0]) == (200, "web-v1")
        assert curl(state, "client", "http://web-v1.default.svc.cluster.local/count/a")[1].strip() == "3"

        log = eventually(lambda: [f for f in flows(state) if f.get("path") == "/flaky/a"], bool, 5)
        assert log and log[-1]["status"] == 200


def test_meshroute_without_valid_backend_warns_and_answers_500(tmp_path: Path) -> None:
    state = tmp_path / "state"
    route = tmp_path / "route.yaml"
    route.write_text((EXAMPLE / "route.yaml").read_text().replace("{name: web-v2, port: 80}", "{name: web-v3, port: 80}"))
    with agent(state):
        apply(state, EXAMPLE / "01-app.yaml")
        apply(state, route)
        code, body = eventually(lambda: curl(state, "client", URL + "/", "-H", "x-canary: 1"), lambda r: r[0] == 500)
        assert code == 500 and "no valid backend" in body
        errors = " ".join(status(state)["errors"])
        assert "HTTPRoute default/web: spec.rules[0].backendRefs[0]: Service default/web-v3 has no TCP port 80" in errors
        assert curl(state, "client", URL + "/slow")[0] == 504  # the other rules keep working
