"""List+watch of the API server into an ``Indexer`` (the kubernetes client, no kopf), and the
node's report back: the agent's source in a cluster.

``KubeSource`` has the standalone source's surface (``load()``, ``version()``, ``errors``), so
the agent runs unchanged on top of it. One thread per kind lists, then watches from the
list's resourceVersion in bounded rounds (``WATCH_ROUND_S``), re-listing when the server says
the version is gone (410); every thread stops within a round of ``stop()``.

``NodeReporter`` publishes the node's applied state (read from the agent's ``status.json``)
as ConfigMap ``webb-system/webb-node-<node>`` for the operator to put into CR status.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.kube.indexer import Indexer
from mesh.kube.translate import RESOURCES, Resource
from mesh.model import SYSTEM_NAMESPACE, ClusterState
from mesh.status import AgentStatus

log = logging.getLogger("webb.kube")
WATCH_ROUND_S = 5  # a watch request ends after this; the loop checks its stop flag in between
RETRY_S = 1.0
OPTIONAL_RETRY_S = 10.0  # a CRD not installed (Gateway API): how often to look for it again
REPORT_LABEL = "webb.io/node-report"
CR_KINDS = ("MeshPolicy", "MeshRoute", "MeshTLS", "NetworkPolicy")


def report_name(node: str) -> str:
    return f"webb-node-{node}"


def api_path(res: Resource, namespace: str = "", name: str = "", sub: str = "") -> str:
    base = f"/api/{res.version}" if not res.group else f"/apis/{res.group}/{res.version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    return f"{base}{ns}/{res.plural}" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


def _send(api: Any, method: str, path: str, query: dict[str, Any] | None, body: Any, content_type: str,
          timeout_s: float) -> Any:
    """One call through the client's connection pool and credentials; the raw urllib3 response."""
    _, url, headers, _, _ = api.param_serialize(method, path, query_params=list((query or {}).items()),
                                                header_params={"Accept": "application/json", "Content-Type": content_type},
                                                auth_settings=["BearerToken"])
    # the client serializes JSON content types itself; others (apply-patch+yaml) go as text (JSON is YAML)
    data = json.dumps(body) if body is not None and "json" not in content_type else body
    resp = api.call_api(method, url, header_params=headers, body=data, _request_timeout=timeout_s).response
    if resp.status >= 300:
        text = resp.data.decode(errors="replace")[:500]
        resp.release_conn()
        raise ApiError(resp.status, f"{method} {path}: HTTP {resp.status}: {text}")
    return resp


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def request(api: Any, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
            content_type: str = "application/json", timeout_s: float = 30.0) -> Any:
    """The JSON answer as dicts (no model classes)."""
    data = _send(api, method, path, query, body, content_type, timeout_s).data
    return json.loads(data) if data else None


def watch_kind(api: Any, kind: str, on_event: Callable[[str, dict[str, Any]], None], stop: threading.Event,
               synced: threading.Event | None = None) -> None:
    """List, then watch, until ``stop``; ``on_event(type, object)`` with type ADDED/MODIFIED/DELETED/SYNC."""
    watch_resource(api, RESOURCES[kind], on_event, stop, synced)


def watch_resource(api: Any, res: Resource, on_event: Callable[[str, dict[str, Any]], None], stop: threading.Event,
                   synced: threading.Event | None = None, namespace: str = "", label_selector: str = "") -> None:
    """``watch_kind`` for any resource, in one namespace ("" = all) and with a label selector."""
    kind = f"{res.plural} in {namespace}" if namespace else res.plural
    selector = {"labelSelector": label_selector} if label_selector else {}
    while not stop.is_set():
        try:
            try:
                listed = request(api, "GET", api_path(res, namespace), query=selector or None)
            except ApiError as e:
                if not (res.optional and e.status == 404):
                    raise
                on_event("SYNC", {"seen": set()})  # the CRD is not installed: no objects; look again later
                if synced is not None:
                    synced.set()
                stop.wait(OPTIONAL_RETRY_S)
                continue
            seen = set()
            for item in listed.get("items") or []:
                on_event("ADDED", item)
                meta = item.get("metadata") or {}
                seen.add((str(meta.get("namespace") or ""), str(meta.get("name"))))
            on_event("SYNC", {"seen": seen})
            if synced is not None:
                synced.set()
            rv = str(listed["metadata"].get("resourceVersion", ""))
            while not stop.is_set():
                rv = _watch_round(api, res, rv, on_event, namespace, selector)
        except _GoneError:
            continue
        except Exception as e:  # noqa: BLE001 - a watch must outlive an API server hiccup; it says why
            log.warning("watch %s: %s; retrying in %.0f s", kind, e, RETRY_S)
            stop.wait(RETRY_S)


class _GoneError(Exception):
    pass


def _watch_round(api: Any, res: Resource, rv: str, on_event: Callable[[str, dict[str, Any]], None], namespace: str = "",
                 selector: dict[str, str] | None = None) -> str:
    resp = _send(api, "GET", api_path(res, namespace), {"watch": "true", "resourceVersion": rv, "timeoutSeconds": WATCH_ROUND_S,
                                                        "allowWatchBookmarks": "true", **(selector or {})},
                 None, "application/json", WATCH_ROUND_S + 10)
    buf = b""
    try:
        for chunk in resp.stream(decode_content=True):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                if raw.strip():
                    rv = _on_line(json.loads(raw), res, rv, on_event)
    finally:
        resp.release_conn()
    return rv


def _on_line(ev: dict[str, Any], res: Resource, rv: str, on_event: Callable[[str, dict[str, Any]], None]) -> str:
    obj = ev.get("object") or {}
    if ev.get("type") == "ERROR":
        if obj.get("code") == 410:
            raise _GoneError()
        raise RuntimeError(f"watch {res.plural}: {obj.get('message')}")
    if ev.get("type") != "BOOKMARK":
        on_event(str(ev.get("type")), obj)
    return str((obj.get("metadata") or {}).get("resourceVersion", rv))


@dataclass
class KubeSource:
    """The agent's source in a cluster: every kind Webb reads, watched into one indexer."""

    api: Any  # kubernetes.client.ApiClient
    indexer: Indexer = field(default_factory=Indexer)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _asked: str = ""
    applied_generations: dict[str, dict[str, int]] = field(default_factory=dict)  # version -> CR generations

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the watches; return once every kind was listed once (or raise after ``timeout_s``)."""
        synced = []
        for kind in RESOURCES:
            ev = threading.Event()
            synced.append(ev)
            t = threading.Thread(target=watch_kind, args=(self.api, kind, self._handler(kind), self._stop, ev),
                                 name=f"watch-{kind}", daemon=True)
            t.start()
            self._threads.append(t)
        deadline = time.monotonic() + timeout_s
        for ev, kind in zip(synced, RESOURCES, strict=True):
            if not ev.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"list {kind}: not done after {timeout_s:.0f} s")

    def _handler(self, kind: str) -> Callable[[str, dict[str, Any]], None]:
        def on_event(kind_of_event: str, obj: dict[str, Any]) -> None:
            if kind_of_event == "SYNC":  # objects deleted while no watch ran
                for key in self.indexer.keys(kind):
                    if (key[1], key[2]) not in obj["seen"]:
                        self.indexer.delete(kind, {"metadata": {"namespace": key[1], "name": key[2]}})
            elif kind_of_event == "DELETED":
                self.indexer.delete(kind, obj)
            else:
                self.indexer.upsert(kind, obj)
        return on_event

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(WATCH_ROUND_S + 15)

    def version(self) -> str:
        self._asked = self.indexer.version()
        return self._asked

    def load(self) -> ClusterState:
        state, generations = self.indexer.snapshot(*CR_KINDS)
        self.applied_generations[self._asked] = generations
        while len(self.applied_generations) > 64:
            del self.applied_generations[next(iter(self.applied_generations))]
        self.errors = list(state.errors)
        return state


@dataclass
class NodeReporter:
    """Every ``interval_s``: the agent's ``status.json`` → the node's report ConfigMap (when it
    changed). Runs until ``stop()``."""

    api: Any
    node: str
    state_dir: Path
    source: KubeSource
    interval_s: float = 0.1
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _last: str = ""
    _audit: dict[str, int] = field(default_factory=dict)
    _flows_offset: int = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="node-reporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.report_once()
            except Exception as e:  # noqa: BLE001 - the API may be briefly away; the next round retries
                log.warning("node report: %s", e)

    def report_once(self) -> None:
        st = AgentStatus.read(self.state_dir)
        if st is None:
            return
        self._count_audit()
        report = node_report(st, self.source.applied_generations, self._audit)
        text = json.dumps(report, sort_keys=True)
        if text != self._last:
            self._publish(text)
            self._last = text

    def _count_audit(self) -> None:
        """Would-deny flows per policy, from the flow log (read on from where the last round stopped)."""
        path = self.state_dir / "flows.jsonl"
        try:
            with open(path, "rb") as f:
                f.seek(self._flows_offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self._flows_offset += end
        for line in data[:end].splitlines():
            try:
                flow = json.loads(line)
            except json.JSONDecodeError:
                continue
            if flow.get("verdict") == "audit":
                for pol in str(flow.get("policy") or "").split(","):
                    if pol:
                        self._audit[pol] = self._audit.get(pol, 0) + 1

    def _publish(self, text: str) -> None:
        name = report_name(self.node)
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": {REPORT_LABEL: self.node}},
                "data": {"report": text}}
        res = Resource("", "v1", "configmaps")
        request(self.api, "PATCH", api_path(res, SYSTEM_NAMESPACE, name), body,
                content_type="application/apply-patch+yaml", query={"fieldManager": f"webb-agent-{self.node}", "force": "true"})


def node_report(st: AgentStatus, generations: dict[str, dict[str, int]], audit: dict[str, int]) -> dict[str, Any]:
    """What a node applied, from its agent's status: plan, datapath and Envoy versions, the
    generations of the CRs in that plan, Envoy's rejections (of the plan, and of objects it
    quarantined: their previous versions are in force), would-deny counts of audit policies."""
    a = st.applied
    return {
        "node": st.node, "running": st.running,
        "planVersion": a.plan_version, "datapathVersion": a.datapath_version, "envoyVersion": a.envoy_version,
        # the generations of the source version the datapath and Envoy last applied
        # (several nodes: the agent's version is "<source>+<peers>"; the generations are the source's)
        "generations": generations.get((a.applied_source_version or a.source_version).split("+")[0], {}) if a.plan_version else {},
        "envoyRejected": st.rejected(), "quarantined": dict(st.quarantined), "errors": list(st.errors),
        "auditWouldDeny": dict(audit), "gatewayStatus": dict(st.gateway_status),
    }
