"""kopf handlers: thin. Each watch event goes into the shared indexer (``mesh.kube.indexer``,
which parses with ``mesh.manifests``); MeshPolicy, MeshRoute and MeshTLS get their status written from
``mesh.kube.status``; node reports (ConfigMaps ``webb-system/webb-node-<node>``) refresh
every CR's per-node status. kopf is imported here and in ``main`` only."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import kopf

from mesh.kube.translate import RESOURCES
from mesh.kube.watch import REPORT_LABEL
from mesh.model import SYSTEM_NAMESPACE
from mesh.operator import metrics
from mesh.operator.controller import Controller

log = logging.getLogger("webb.operator")
CONTROLLER: Controller | None = None  # set by main before kopf starts


def _controller() -> Controller:
    if CONTROLLER is None:
        raise kopf.PermanentError("operator not configured: start it with python -m mesh.operator")
    return CONTROLLER


def _register(kind: str) -> None:
    res = RESOURCES[kind]

    @kopf.on.event(group=res.group, version=res.version, plural=res.plural, id=f"index-{kind}")
    def on_event(type: str | None, body: kopf.Body, **_: Any) -> None:  # noqa: A002 - kopf's name
        doc = copy.deepcopy(dict(body))
        metrics.WATCH_EVENTS.labels(kind).inc()
        _controller().observe(kind, "DELETED" if type == "DELETED" else "UPSERT", doc)


for _kind in RESOURCES:
    _register(_kind)


@kopf.on.event(group="", version="v1", plural="configmaps", labels={REPORT_LABEL: kopf.PRESENT}, id="node-reports")
def on_node_report(type: str | None, body: kopf.Body, **_: Any) -> None:  # noqa: A002 - kopf's name
    meta = body.get("metadata") or {}
    if meta.get("namespace") != SYSTEM_NAMESPACE:
        return
    node = str((meta.get("labels") or {}).get(REPORT_LABEL))
    if type == "DELETED":
        metrics.NODE_REPORTS.labels("deleted").inc()
        _controller().node_report(node, None)
        return
    try:
        report = json.loads((body.get("data") or {}).get("report") or "{}")
    except json.JSONDecodeError as e:
        metrics.NODE_REPORTS.labels("unreadable").inc()
        raise kopf.PermanentError(f"node report {meta.get('name')}: data.report is not JSON: {e}") from None
    metrics.NODE_REPORTS.labels("report").inc()
    _controller().node_report(node, report)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False  # status conditions say it; no Event objects per change
    settings.watching.server_timeout = 60  # seconds a watch request lasts before kopf reopens it
    settings.watching.client_timeout = 90


@kopf.on.login(id="login")
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: its service account; else $KUBECONFIG (set by main from --kubeconfig)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
