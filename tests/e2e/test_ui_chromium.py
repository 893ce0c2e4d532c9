"""`webb ui` in a real headless Chromium, on the flows of a real Star Wars run (agent, BPF, Envoy): the
xwing -> deathstar edge is red and a click on it says why (MeshPolicy default/rule1, layer L4), the
tiefighter -> deathstar edge is green, the filters narrow map and table, a flow appended to the log appears
live, and a hostile request path is shown literally (no element made from it, nothing fetched). The page
fetches nothing but the UI server's own URLs.

Chromium (mesh.ui.browser) runs under ``timeout -s KILL``, is killed by its process group's id in a finally
and its profile removed; `webb ui` runs with --lifetime and is stopped by its PID."""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.cli.demo import run_starwars
from mesh.ui.browser import Chromium, Page, find_chromium
from mesh.ui.screenshot import LOADED, click_edge, edge_query
from tests.conftest import ROOT

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]

RED, GREEN = "rgb(198, 40, 40)", "rgb(46, 125, 50)"
HOSTILE_PATH = "/a<script>x</script>[/red]"
HOSTILE_WHY = '<img src="/pwned" onerror="window.pwned=1"> [bold]not bold[/bold]'


@pytest.fixture(scope="module")
def starwars_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state dir of one Star Wars run, as test_starwars makes it: xwing denied at connect (L4), tiefighter
    forwarded (and its PUT denied by Envoy, L7); the agent has stopped, its flows and status stay."""
    state = tmp_path_factory.mktemp("starwars") / "state"
    assert run_starwars(ROOT / "examples/starwars", state) == 0
    return state


@pytest.fixture
def ui_url(starwars_state: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`webb ui` (the real command) on a copy of the run's flow log and status, on a free port; its URL and the
    copied flow log (a test may append to it)."""
    state = tmp_path / "ui-state"
    state.mkdir()
    for name in ("flows.jsonl", "status.json"):
        shutil.copyfile(starwars_state / name, state / name)
    proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "ui", "--state-dir", str(state), "--port", "0",
                             "--lifetime", "180"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        url, deadline = "", time.monotonic() + 30
        while not url and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                url = next((w for w in proc.stdout.readline().split() if w.startswith("http://127.0.0.1:")), "")
        assert url, f"webb ui printed no URL (exit {proc.poll()}): {proc.stderr.read() if proc.poll() is not None else ''}"
        yield url, state / "flows.jsonl"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def page(ui_url: tuple[str, Path]) -> Iterator[Page]:
    binary = find_chromium()
    assert binary, "no Chromium: `make deps` installs Debian's chromium (APT_PKGS)"
    with Chromium(binary, lifetime_s=120) as browser, browser.page() as p:
        p.navigate(ui_url[0])
        p.wait_for(f"{LOADED} && document.querySelectorAll('.edge').length > 0")
        yield p
        profile = browser.profile
    assert profile is not None and not profile.exists(), "the browser's profile was left behind"


def _stroke(page: Page, src: str, dst: str, verdict: str) -> str:
    return str(page.evaluate(f"(() => {{ const e = {edge_query(src, dst, verdict)}; "
                             "return e ? getComputedStyle(e).stroke : 'no such edge'; })()"))


def _details(page: Page) -> dict[str, str]:
    return dict(page.evaluate("Object.fromEntries([...document.querySelectorAll('#details-body dd')]"
                              ".map(d => [d.dataset.key, d.textContent]))"))


def test_denied_edge_is_red_and_a_click_names_the_policy_and_layer(page: Page, ui_url: tuple[str, Path]) -> None:
    assert _stroke(page, "default/xwing", "default/deathstar", "denied") == RED
    assert _stroke(page, "default/tiefighter", "default/deathstar", "forwarded") == GREEN

    click_edge(page, "default/xwing", "default/deathstar", "denied")  # a real mouse click, hit-tested by Chromium
    page.wait_for("!!document.querySelector('#details-body dd.why')")
    d = _details(page)
    assert d["edge"] == "denied" and d["layer"] == "L4" and d["policy"] == "default/rule1", d
    assert d["reason"] == "policy-denied" and "MeshPolicy default/rule1" in d["why"] and "default/xwing" in d["why"], d
    assert page.evaluate("getComputedStyle(document.querySelector('#details-body dd.why')).display") != "none"

    # the same denial from the table: the newest xwing row that was denied
    page.evaluate("[...document.querySelectorAll('#flows tbody tr')].find(r => r.className === 'v-denied' && "
                  "r.querySelector('td.src').textContent === 'default/xwing').click()")
    d = _details(page)
    assert (d["policy"], d["layer"], d["verdict"]) == ("default/rule1", "L4", "denied") and "default/rule1" in d["why"], d
    # and the tiefighter's PUT, refused by Envoy: layer L7, the HTTP rule named
    page.evaluate("[...document.querySelectorAll('#flows tbody tr')].find(r => "
                  "r.querySelector('td.request').textContent === 'PUT /v1/exhaust-port').click()")
    d = _details(page)
    assert d["layer"] == "L7" and d["status"] == "403" and "default/rule1" in d["policy"], d
    assert "POST /v1/request-landing" in d["why"], d

    base = ui_url[0]
    assert page.requests and all(u.startswith(base) for u in page.requests), page.requests
    assert not page.console, page.console


def test_filters_narrow_the_map_and_the_table(page: Page) -> None:
    page.evaluate("document.querySelector('select[name=verdict]').value = 'denied';"
                  "document.querySelector('input[name=pod]').value = 'xwing';"
                  "document.getElementById('filters').requestSubmit()")
    page.wait_for("location.search === '?verdict=denied&pod=xwing' && document.querySelectorAll('#flows tbody tr').length > 0"
                  " && [...document.querySelectorAll('.edge')].every(e => e.dataset.verdict === 'denied')")
    rows = page.evaluate("[...document.querySelectorAll('#flows tbody tr')].map(r => [r.querySelector('td.src').textContent,"
                         " r.querySelector('td.verdict').textContent])")
    assert rows and all(r == ["default/xwing", "DENIED"] for r in rows), rows
    edges = page.evaluate("[...document.querySelectorAll('.edge')].map(e => [e.dataset.src, e.dataset.dst])")
    assert edges == [["default/xwing", "default/deathstar"]], edges

    # a filter the server refuses: its message shown, as text
    page.evaluate("document.querySelector('input[name=status]').value = '<b>9</b>';"
                  "document.getElementById('filters').requestSubmit()")
    err = page.wait_for("!document.getElementById('error').hidden && document.getElementById('error').textContent")
    assert "status '<b>9</b>'" in err and "100-599" in err, err
    assert page.evaluate("document.querySelectorAll('#error *').length") == 0


def test_a_hostile_path_appears_live_and_literally(page: Page, ui_url: tuple[str, Path]) -> None:
    flow = {"time": time.time(), "layer": "L7", "protocol": "HTTP/1.1", "src": "default/xwing",
            "service": "default/deathstar:80", "dst_pod": None, "method": "GET", "path": HOSTILE_PATH, "status": 403,
            "verdict": "denied", "reason": "l7-policy-denied", "policy": "default/rule1#ingress[0]", "why": HOSTILE_WHY}
    with open(ui_url[1], "a") as f:  # as the agent appends (mesh.agent.flows.FlowLog)
        f.write(json.dumps(flow, sort_keys=True) + "\n")
    cell = "[...document.querySelectorAll('#flows td.request')].find(t => t.textContent.includes('script'))"
    assert page.wait_for(f"{cell} && {cell}.textContent") == f"GET {HOSTILE_PATH}"
    assert page.evaluate(f"{cell}.childElementCount") == 0  # text, not elements
    page.evaluate(f"{cell}.parentElement.click()")
    d = _details(page)
    assert d["path"] == HOSTILE_PATH and d["why"] == HOSTILE_WHY, d
    assert page.evaluate("document.querySelectorAll('#details-body img, #flows img, script').length") == 1  # app.js only
    time.sleep(0.5)  # an <img> made from the flow would have asked for /pwned by now
    assert page.evaluate("window.pwned === undefined")
    assert not [u for u in page.requests if "pwned" in u], page.requests
