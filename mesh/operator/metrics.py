"""The operator's Prometheus metrics: ``/metrics`` on 127.0.0.1:9963 by default (the agent has
9962; ``python -m mesh.operator --metrics-address`` or ``$WEBB_OPERATOR_METRICS_ADDRESS``,
``off`` for none). docs/metrics.md lists them.

Status writes are counted where they happen, at the API client (:class:`MeteredApi` wraps the
client the controller writes with, so the controller does not change); watch events and node
reports are counted by the kopf handlers; what the indexer refused and which nodes report are
read at scrape time from the controller. No kopf here.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from mesh.agent.metrics import MetricsServer, serve
from mesh.kube.translate import RESOURCES

if TYPE_CHECKING:
    from mesh.operator.controller import Controller

log = logging.getLogger("webb.operator")
DEFAULT_ADDRESS = "127.0.0.1:9963"
ENV = "WEBB_OPERATOR_METRICS_ADDRESS"
_PLURALS = {r.plural: kind for kind, r in RESOURCES.items()}

REGISTRY = CollectorRegistry()
STATUS_WRITES = Counter("webb_operator_status_writes", "Status subresource writes (merge patches) of the operator, "
                        "by kind and result (ok, or failed: the object went meanwhile, a conflict, the API away)",
                        ["kind", "result"], registry=REGISTRY)
EVENTS_POSTED = Counter("webb_operator_events_posted", "Warning Events the operator posted (a rejection or a NACK, "
                        "once per change of the condition), by result", ["result"], registry=REGISTRY)
WATCH_EVENTS = Counter("webb_operator_watch_events", "Watch events the operator handled, by kind", ["kind"],
                       registry=REGISTRY)
NODE_REPORTS = Counter("webb_operator_node_reports", "Node reports (ConfigMaps webb-system/webb-node-<node>) seen, by "
                       "what they were: a report, a deletion, or unreadable", ["result"], registry=REGISTRY)
for _r in ("ok", "failed"):
    EVENTS_POSTED.labels(_r)
for _r in ("report", "deleted", "unreadable"):
    NODE_REPORTS.labels(_r)


def _status_kind(method: str, url: str) -> str | None:
    """The kind whose status ``method`` ``url`` writes, or None when it is no status write."""
    parts = urllib.parse.urlsplit(url).path.rstrip("/").split("/")
    if method != "PATCH" or len(parts) < 3 or parts[-1] != "status":
        return None
    return _PLURALS.get(parts[-3], parts[-3])


class MeteredApi:
    """The kubernetes ApiClient, counting what the controller writes (mesh.kube.watch.request
    calls ``param_serialize`` and ``call_api``; everything else passes through untouched)."""

    def __init__(self, api: Any) -> None:
        self._api = api

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        kind = _status_kind(method, url)
        event = method == "POST" and urllib.parse.urlsplit(url).path.endswith("/events")
        try:
            out = self._api.call_api(method, url, *args, **kwargs)
        except Exception:
            self._count(kind, event, False)
            raise
        status = getattr(getattr(out, "response", out), "status", 200)
        self._count(kind, event, isinstance(status, int) and status < 300)
        return out

    @staticmethod
    def _count(kind: str | None, event: bool, ok: bool) -> None:
        if kind is not None:
            STATUS_WRITES.labels(kind, "ok" if ok else "failed").inc()
        elif event:
            EVENTS_POSTED.labels("ok" if ok else "failed").inc()


class ControllerCollector:
    """What the controller holds, read at scrape time."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        indexer = self.controller.indexer
        invalid = GaugeMetricFamily("webb_operator_invalid_objects", "Objects the operator refuses now (validation "
                                    "failed: their status says why; the last valid generation stays in force)",
                                    labels=["kind"])
        for kind in sorted(RESOURCES):
            invalid.add_metric([kind], sum(1 for k in indexer.keys(kind) if indexer.error(*k) is not None))
        yield invalid
        yield GaugeMetricFamily("webb_operator_nodes_reporting", "Nodes whose agent report the operator holds",
                                value=len(dict(self.controller.reports)))


_collector: ControllerCollector | None = None


def start(controller: Controller, address: str) -> MetricsServer | None:
    """Serve the operator's metrics, read from ``controller`` (the one the handlers use)."""
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = ControllerCollector(controller)
    REGISTRY.register(_collector)
    return serve(REGISTRY, address, "operator")
