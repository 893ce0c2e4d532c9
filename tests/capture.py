"""A bounded packet capture for the tests (AF_PACKET): what crossed an interface, as raw frames."""

from __future__ import annotations

import socket
import threading
import time

from pyroute2 import netns

ETH_P_ALL = 0x0003


class Capture:
    """Frames on one interface of a netns (AF_PACKET, from a thread that entered the netns; ``ns``
    None: this process's own); bounded in time and frames."""

    def __init__(self, ns: str | None, ifname: str, timeout_s: float = 60, max_frames: int = 20000) -> None:
        self.ns, self.ifname, self.timeout_s, self.max_frames = ns, ifname, timeout_s, max_frames
        self.frames: list[bytes] = []
        self.failure: list[BaseException] = []
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capture-{ifname}", daemon=True)

    def _run(self) -> None:
        try:
            if self.ns is not None:
                netns.setns(self.ns, flags=0, fork=False)  # this thread only
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
                s.bind((self.ifname, 0))
                s.settimeout(0.05)
                self._ready.set()
                deadline = time.monotonic() + self.timeout_s
                while not self._stop.is_set() and time.monotonic() < deadline and len(self.frames) < self.max_frames:
                    try:
                        self.frames.append(s.recv(1 << 18))
                    except TimeoutError:
                        continue
                # what the kernel queued before the stop is part of the capture (a slow machine, e.g.
                # the emulated 6.1 guest, may not have read it yet)
                s.setblocking(False)
                while len(self.frames) < self.max_frames:
                    try:
                        self.frames.append(s.recv(1 << 18))
                    except BlockingIOError:
                        break
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.failure.append(e)
        finally:
            self._ready.set()

    def __enter__(self) -> Capture:
        self._thread.start()
        assert self._ready.wait(10), "capture did not start"
        if self.failure:
            raise self.failure[0]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.failure:
            raise self.failure[0]
