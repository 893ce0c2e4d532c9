"""A headless Chromium of our own, driven over the DevTools protocol: the UI's end-to-end test reads the DOM
through it, and `webb demo --screenshot` takes the README's picture with it.

The browser runs under ``timeout -s KILL <lifetime>`` in a process group of its own, with a fresh profile
directory that is also its HOME and TMPDIR (so its crash handler and singleton socket are there too); ``close()`` kills the group by its
id, then any process still naming the profile (the crash handler starts a session of its own), and removes
the profile. Even if this process is killed first, the browser does not outlive its lifetime. It resolves
no name but localhost and uses no proxy: the page under test may reach 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BINARIES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")  # Debian's first: no shell wrapper
FLAGS = ("--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
         "--disable-client-side-phishing-detection", "--disable-domain-reliability", "--no-pings", "--mute-audio",
         "--hide-scrollbars", "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


def find_chromium() -> str | None:
    """The Chromium binary to run, or None (Debian: apt-get install chromium)."""
    for b in BINARIES:
        path = b if os.path.isabs(b) and os.access(b, os.X_OK) else shutil.which(b)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Chromium:
    """``with Chromium() as b: page = b.page(); page.navigate(url)``"""

    def __init__(self, binary: str | None = None, lifetime_s: float = 120.0, width: int = 1400, height: int = 900) -> None:
        found = binary or find_chromium()
        if found is None:
            raise BrowserError("no Chromium found (Debian: apt-get install chromium)")
        self.binary = found
        self.lifetime_s = lifetime_s
        self.size = (width, height)
        self.profile: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> Chromium:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def start(self, timeout_s: float = 30.0) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="webb-chromium-"))
        tmp = self.profile / "tmp"  # its singleton socket dir too: a killed browser leaves it, removed with the profile
        tmp.mkdir()
        env = {**os.environ, "HOME": str(self.profile), "XDG_CONFIG_HOME": str(self.profile / "config"),
               "XDG_CACHE_HOME": str(self.profile / "cache"), "TMPDIR": str(tmp)}
        args = [self.binary, *FLAGS, f"--user-data-dir={self.profile / 'profile'}", f"--window-size={self.size[0]},{self.size[1]}"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        with open(self.profile / "chromium.log", "wb") as log:
            self.proc = subprocess.Popen(["timeout", "-s", "KILL", str(self.lifetime_s), *args, "about:blank"], env=env,
                                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=log)
        active = self.profile / "profile" / "DevToolsActivePort"  # Chromium writes its port there (--remote-debugging-port=0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"start {self.binary}: exited with {self.proc.returncode}: {self.log_tail()}")
            lines = active.read_text().splitlines() if active.exists() else []
            if len(lines) >= 2 and lines[0].isdigit():
                self.port = int(lines[0])
                return
            time.sleep(0.05)
        raise BrowserError(f"start {self.binary}: no DevTools port after {timeout_s}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return " | ".join((self.profile / "chromium.log").read_text(errors="replace").splitlines()[-5:]) if self.profile else ""
        except OSError:
            return ""

    def page(self) -> Page:
        """The browser's first tab."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:  # noqa: S310 - our own port
            targets = json.load(r)
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError("Chromium has no page open")
        return Page(pages[0]["webSocketDebuggerUrl"], self.size)

    def close(self) -> None:
        """Kill the browser (its process group, by the id of the process we started), what else runs with its
        profile, and remove the profile."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            self.proc = None
        if self.profile is not None:
            deadline = time.monotonic() + 10
            while (left := _naming(str(self.profile))) and time.monotonic() < deadline:
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None


def _naming(profile: str) -> list[int]:
    """Live processes whose command line names the profile directory (ours by construction)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if profile.encode() in (d / "cmdline").read_bytes() and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(d.name))
        except (OSError, IndexError):
            continue
    return out


class Page:
    """One tab, over its DevTools websocket: commands answered in order, events kept (``requests``: every URL the
    page asked for, once Network is enabled)."""

    def __init__(self, ws_url: str, size: tuple[int, int]) -> None:
        try:
            from websockets.sync.client import connect
        except ImportError:
            raise BrowserError("the Python package websockets is needed to drive Chromium (pip install websockets)") from None
        self._stack = contextlib.ExitStack()
        self._ws = self._stack.enter_context(connect(ws_url, max_size=None, open_timeout=10))
        self._id = 0
        self.size = size
        self.requests: list[str] = []
        self.console: list[str] = []

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *_: object) -> None:
        self._stack.close()

    def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer after {timeout_s}s")
            try:
                msg = json.loads(self._ws.recv(timeout=left))
            except TimeoutError:
                continue
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error'].get('message')}")
                return dict(msg.get("result") or {})
            self._event(msg)

    def _event(self, msg: dict[str, Any]) -> None:
        p = msg.get("params") or {}
        if msg.get("method") == "Network.requestWillBeSent":
            self.requests.append(str(p.get("request", {}).get("url", "")))
        elif msg.get("method") == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif msg.get("method") == "Runtime.exceptionThrown":
            self.console.append(str(p.get("exceptionDetails", {}).get("exception", {}).get("description", "exception")))

    def navigate(self, url: str) -> None:
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1], deviceScaleFactor=1,
                  mobile=False)
        r = self.call("Page.navigate", url=url)
        if r.get("errorText"):
            raise BrowserError(f"open {url}: {r['errorText']}")

    def evaluate(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(f"evaluate {expression[:80]!r}: {d.get('exception', {}).get('description') or d.get('text')}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 20.0) -> Any:
        """The value of ``expression`` once it is truthy (polled every 0.1 s; an exception is "not yet": the page
        may still be loading). Values come back as JSON: a DOM element is ``{}``, falsy here; test it with ``!!``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value, why = self.evaluate(expression), "false"
            except BrowserError as e:
                value, why = None, str(e)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"waited {timeout_s}s for {expression!r} ({why}); the page's console: {self.console[-5:]}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> int:
        """A PNG of the whole page (as tall as its content, up to 3000 px); returns its size in bytes."""
        height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)") or self.size[1])
        self.call("Emulation.setDeviceMetricsOverride", width=self.size[0], height=min(max(height, 200), 3000),
                  deviceScaleFactor=1, mobile=False)
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return len(data)
