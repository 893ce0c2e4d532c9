"""The page as a user sees it, through a real browser: find and click an edge of the map (a real mouse click at
the edge's middle, hit-tested by Chromium), and a PNG of the page for the README (`webb demo --screenshot`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mesh.ui.browser import BrowserError, Chromium, Page
from mesh.ui.server import running

LOADED = "document.body.dataset.loaded === '1'"


def edge_query(src: str, dst: str, verdict: str) -> str:
    """A JS expression: the map's edge src -> dst of that verdict class (forwarded, denied, audit), or null."""
    sel = json.dumps(f'.edge[data-src={json.dumps(src)}][data-dst={json.dumps(dst)}][data-verdict={json.dumps(verdict)}]')
    return f"document.querySelector({sel})"


def click_edge(page: Page, src: str, dst: str, verdict: str) -> None:
    """Press and release the mouse at the middle of the edge, where the page says that edge is (not another on top)."""
    at: Any = page.wait_for(
        f"(() => {{ const p = {edge_query(src, dst, verdict)}; if (!p) return null;"
        " const m = p.getPointAtLength(p.getTotalLength() / 2).matrixTransform(p.getScreenCTM());"
        " return document.elementFromPoint(m.x, m.y) === p ? [m.x, m.y] : null; })()")
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=at[0], y=at[1], button="left", clickCount=1)


def take(state_dir: Path, path: Path, select: tuple[str, str] | None = ("default/xwing", "default/deathstar"),
         lifetime_s: float = 90.0) -> int:
    """Serve ``state_dir``'s flows, open the page in a headless Chromium, click the denied edge ``select`` (so the
    details show why), and write the page as a PNG to ``path``; returns its size in bytes."""
    with running(state_dir) as srv, Chromium(lifetime_s=lifetime_s) as browser, browser.page() as page:
        page.navigate(srv.url)
        page.wait_for(f"{LOADED} && document.querySelectorAll('.edge').length > 0")
        if select is not None:
            click_edge(page, *select, "denied")
            page.wait_for("!!document.querySelector('#details-body dd.why')")
        return page.screenshot(path)


__all__ = ["BrowserError", "LOADED", "click_edge", "edge_query", "take"]
