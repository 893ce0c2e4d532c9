"""The agent's Prometheus metrics: ``/metrics`` on 127.0.0.1:9962 by default (Cilium's agent
port; ``webb agent --metrics-address HOST:PORT``, ``off`` for none). docs/metrics.md lists them.

Most values are read when Prometheus scrapes, from counters the agent keeps anyway: the
kernel's per-reason decision counters, the flow log's counts, the tunnels', the certificates'
expiry, the xDS server's. A scrape then costs the agent's loop nothing, and a metric cannot
disagree with ``webb status``. What leaves no trace otherwise (how long a sync took, how long
Envoy took to ACK a snapshot) the loop observes into histograms here. Envoy's per-service
request stats (RED: rate, errors, duration) are read from its admin API on 127.0.0.1 at scrape
time and served again under ``webb_`` names, so the admin port (it can stop Envoy) is never the
scrape target.

The HTTP server has threads of its own; each section of a scrape is guarded (a datapath
closing, an Envoy restarting): a failing one is left out and counted in
``webb_scrape_errors_total``, the rest is served.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from xds import resources

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from mesh.agent.loop import Agent
    from mesh.plan.node import NodePlan
    from xds.server import XdsServer

log = logging.getLogger("webb.metrics")
DEFAULT_ADDRESS = "127.0.0.1:9962"  # Cilium's agent port
ENVOY_TIMEOUT_S = 2.0  # a scrape waits at most this for Envoy's admin API
# what the agent asks Envoy for: its stats matcher keeps only these of the per-service stats (xds.envoy)
ENVOY_FILTER = r"^http\.[^.]+\.downstream_rq_"
SYNC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PUSH_RESULTS = ("acked", "nacked", "timeout")


def parse_address(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (an IP address or localhost; ``[HOST]:PORT`` too, which an IPv6 address needs
    and an IPv4 one allows, so the Helm chart's ``[$(HOST_IP)]:9962`` fits either family) ->
    (host, port); "" or "off" -> None (no metrics). ValueError says what is wrong."""
    text = text.strip()
    if text.lower() in ("", "off"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT (e.g. 127.0.0.1:9962 or [::1]:9962), or off")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9962")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IP address (nor localhost)") from None
    return host, int(port)


class MetricsServer:
    """``/metrics`` of one registry on one address, on threads of its own (prometheus_client's)."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self.httpd, self.thread = httpd, thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def serve(registry: CollectorRegistry, address: str, what: str) -> MetricsServer | None:
    """Serve ``registry`` on ``address`` (``parse_address``). A taken port is logged, not fatal:
    metrics are never worth a node's enforcement."""
    hp = parse_address(address)
    if hp is None:
        log.info("%s metrics: off", what)
        return None
    disable_created_metrics()  # no *_created series next to each counter and histogram: half the lines, no use here
    try:
        httpd, thread = start_http_server(hp[1], hp[0], registry=registry)
    except OSError as e:
        log.warning("%s metrics: cannot listen on %s (%s); serving none", what, address, e.strerror or e)
        return None
    log.info("%s metrics on http://%s/metrics", what, address)
    return MetricsServer(httpd, thread)


# ---- Envoy's per-service stats, again as webb_ metrics ----
def stat_prefix(name: str) -> str:
    """The stat_prefix of a service's HTTP connection manager (xds.resources makes it)."""
    return resources.stat_prefix(name)


def service_names(plan: NodePlan | None) -> dict[str, str]:
    """stat prefix -> the L7 service ("namespace/service:port") or north-south listener it is of."""
    if plan is None:
        return {}
    return {stat_prefix(n): n for n in (*(h.name for h in plan.http), *(g.name for g in plan.gateways))}


def envoy_red(text: str, names: dict[str, str]) -> list[Metric]:
    """Envoy's /stats/prometheus (its HTTP connection managers' downstream_rq_* stats) -> requests,
    responses by status class and the request duration histogram per service named in ``names``
    (stat prefix -> service); other prefixes (the admin listener, a service gone) are left out.
    Envoy counts milliseconds; the histogram here is in seconds."""
    requests = CounterMetricFamily("webb_envoy_http_requests", "HTTP requests the node Envoy received for an L7 "
                                   "service (its connection manager's downstream_rq_total)", labels=["service"])
    responses = CounterMetricFamily("webb_envoy_http_responses", "HTTP responses the node Envoy sent for an L7 "
                                    "service, by status class (1xx..5xx; a policy denial is a 403: 4xx)",
                                    labels=["service", "code_class"])
    duration = HistogramMetricFamily("webb_envoy_http_request_duration_seconds", "Time from the first byte of a "
                                     "request to the last byte of its response, at the node Envoy, per L7 service "
                                     "(Envoy's downstream_rq_time)", labels=["service"])
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        base = family.name.removesuffix("_total")  # the parser names a counter's family without it
        for s in family.samples:
            service = names.get(s.labels.get("envoy_http_conn_manager_prefix", ""))
            if service is None:
                continue
            if base == "envoy_http_downstream_rq":
                requests.add_metric([service], s.value)
            elif base == "envoy_http_downstream_rq_xx":
                responses.add_metric([service, f"{s.labels.get('envoy_response_code_class', '?')}xx"], s.value)
            elif base == "envoy_http_downstream_rq_time" and s.name.endswith("_bucket"):
                buckets.setdefault(service, []).append((float(s.labels["le"]), s.value))
            elif base == "envoy_http_downstream_rq_time" and s.name.endswith("_sum"):
                sums[service] = s.value
    for service, bs in sorted(buckets.items()):
        bs.sort()
        duration.add_metric([service], [("+Inf" if le == float("inf") else floatToGoString(le / 1000), v) for le, v in bs],
                            sums.get(service, 0.0) / 1000)
    return [requests, responses, duration]


# ---- the agent ----
def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class AgentCollector:
    """What the agent holds, read at scrape time (a prometheus_client custom collector)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.xds: XdsServer | None = None  # set once the agent started it
        self.errors: dict[str, int] = {}

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: the agent's parts come and go

    def collect(self) -> Iterator[Metric]:
        sections: tuple[tuple[str, Callable[[], Iterable[Metric]]], ...] = (
            ("agent", self._agent), ("datapath", self._datapath), ("flows", self._flows), ("xds", self._xds),
            ("tunnels", self._tunnels), ("certificates", self._certificates), ("envoy", self._envoy))
        for name, section in sections:
            try:
                yield from list(section())  # all of a section or none of it
            except Exception as e:  # noqa: BLE001 - one section failing must not fail the scrape
                self.errors[name] = self.errors.get(name, 0) + 1
                log.debug("metrics section %s: %r", name, e)
        failed = CounterMetricFamily("webb_scrape_errors", "Sections of a scrape left out because reading them failed "
                                     "(e.g. while the datapath closes or Envoy restarts)", labels=["section"])
        for name, _ in sections:
            failed.add_metric([name], self.errors.get(name, 0))
        yield failed

    def _agent(self) -> Iterator[Metric]:
        a = self.agent
        info = GaugeMetricFamily("webb_agent_info", "The agent's node and xDS protocol (value 1)", labels=["node", "xds"])
        info.add_metric([a.cfg.node.name, "delta" if a.cfg.xds_delta else "sotw"], 1)
        yield info
        yield _gauge("webb_agent_errors", "Errors the agent reports now (webb status lists them: plan warnings, "
                     "NACKs, listeners not opened)", len(a.errors))
        yield _gauge("webb_refused_objects", "Objects refused now: invalid, or quarantined after Envoy refused them "
                     "(webb status names them)", len(a.refused))
        yield _gauge("webb_last_applied_timestamp_seconds", "When a plan last reached the datapath and Envoy "
                     "(Unix time; 0: none yet)", a.applied.at)
        if a.envoy is not None:
            yield _counter("webb_envoy_restarts", "Times the agent restarted a node Envoy that had died", a.envoy.restarts)

    def _datapath(self) -> Iterator[Metric]:
        dp = self.agent.datapath
        if dp is None:
            return
        decisions = CounterMetricFamily("webb_datapath_decisions", "Connection decisions of the socket programs, by "
                                        "reason (the kernel's per-reason counters, kept across agent restarts)",
                                        labels=["reason"])
        for reason, n in sorted(dp.reason_counts().items()):
            decisions.add_metric([reason.text], n)
        yield decisions
        yield _counter("webb_datapath_events_received", "Decision events this agent read from the ring buffer",
                       dp.received)
        yield _gauge("webb_datapath_events_lost", "Decisions the kernel counted since this agent started but whose "
                     "event it has not read: not yet, or never (the ring buffer was full)", max(0, dp.events_lost()))

    def _flows(self) -> Iterator[Metric]:
        flows = CounterMetricFamily("webb_flows", "Flows the agent wrote to its flow log (webb observe): kernel "
                                    "decisions, Envoy requests, tunnel connections", labels=["verdict", "layer", "reason"])
        for (verdict, layer, reason), n in sorted(self.agent.flows.counts().items()):
            flows.add_metric([verdict, layer, reason], n)
        yield flows

    def _xds(self) -> Iterator[Metric]:
        if self.xds is not None:
            counts = dict(self.xds.counts)
            responses = CounterMetricFamily("webb_xds_responses", "xDS responses sent to Envoy", labels=["protocol"])
            resources = CounterMetricFamily("webb_xds_resources_sent", "Resources those xDS responses carried",
                                            labels=["protocol"])
            for proto in ("sotw", "delta"):
                responses.add_metric([proto], counts.get(f"{proto}_responses", 0))
                resources.add_metric([proto], counts.get(f"{proto}_resources", 0))
            yield from (responses, resources)
        nacked = GaugeMetricFamily("webb_xds_nacked", "1 while Envoy refuses the version of this resource type it was "
                                   "sent (NACK; webb status has Envoy's message)", labels=["type"])
        for t, st in sorted(self.agent.cache.status(self.agent.cfg.node.name).items()):
            nacked.add_metric([t.rsplit(".", 1)[-1]], 1 if st.nacked else 0)
        yield nacked

    def _tunnels(self) -> Iterator[Metric]:
        t = self.agent.tunnels
        if t is None:
            return
        servers = ([t.server] if t.server is not None else []) + [srv for _, srv in list(t.direct.values())]
        conns = CounterMetricFamily("webb_tunnel_connections", "Connections through the mTLS tunnel listeners: "
                                    "outbound (this node's pods dialing) and inbound (accepted from other nodes), "
                                    "by result", labels=["direction", "result"])
        sent = CounterMetricFamily("webb_tunnel_sent_bytes", "Bytes the tunnels carried from this node's pods to the "
                                   "peer, counted when a connection ends", labels=["direction"])
        received = CounterMetricFamily("webb_tunnel_received_bytes", "Bytes the tunnels carried from the peer to this "
                                       "node's pods, counted when a connection ends", labels=["direction"])
        inbound: dict[str, int] = {}
        in_bytes = {"to_tunnel": 0, "from_tunnel": 0}
        for srv in servers:
            for k, n in dict(srv.counts).items():
                inbound[k] = inbound.get(k, 0) + n
            for k, n in dict(srv.bytes).items():
                in_bytes[k] += n
        for direction, counts, moved in (("outbound", dict(t.counts), dict(t.bytes)), ("inbound", inbound, in_bytes)):
            for result in ("forwarded", "denied", "failed"):
                conns.add_metric([direction, result], counts.get(result, 0))
            sent.add_metric([direction], moved["to_tunnel"])
            received.add_metric([direction], moved["from_tunnel"])
        shakes = CounterMetricFamily("webb_tunnel_handshakes", "TLS 1.3 handshakes of the mTLS tunnels, as client "
                                     "(dialing a peer node) or server, by result", labels=["side", "result"])
        done = dict(t.node.handshakes)
        for side in ("client", "server"):
            for result in ("ok", "failed"):
                shakes.add_metric([side, result], done.get((side, result), 0))
        yield from (conns, sent, received, shakes)
        yield _counter("webb_tunnel_ktls_failures", "Tunnels whose keys the kernel refused (kTLS install failed)",
                       t.node.ktls_failures)

    def _certificates(self) -> Iterator[Metric]:
        t = self.agent.tunnels
        if t is None:
            return
        now = time.time()
        expiry = GaugeMetricFamily("webb_certificate_expiry_seconds", "Seconds until each certificate this node holds "
                                   "expires: its workloads' and its Envoy's (renewed at 2/3 of their life)",
                                   labels=["spiffe_id"])
        for cert in t.store.identities():
            expiry.add_metric([cert.spiffe_id], cert.not_after - now)
        yield expiry
        yield _gauge("webb_ca_certificate_expiry_seconds", "Seconds until the mesh CA certificate that signs this "
                     "node's certificates expires", t.ca.cert.not_valid_after_utc.timestamp() - now)
        yield _counter("webb_certificate_renewals", "Workload certificates this agent renewed", t.store.renewals)

    def _envoy(self) -> Iterator[Metric]:
        envoy = self.agent.envoy
        up = 0
        metrics: list[Metric] = []
        if envoy is not None and envoy.proc is not None and envoy.proc.poll() is None:
            try:
                text = envoy.admin(f"/stats/prometheus?filter={urllib.parse.quote(ENVOY_FILTER)}", timeout_s=ENVOY_TIMEOUT_S)
            except OSError as e:  # restarting, or too busy to answer in time
                log.debug("Envoy stats: %s", e)
            else:
                metrics, up = envoy_red(text, service_names(self.agent.plan)), 1
        yield from metrics
        yield _gauge("webb_envoy_stats_up", "1 when this scrape read the node Envoy's stats (the webb_envoy_http_* "
                     "metrics), 0 when Envoy did not answer", up)


class AgentMetrics:
    """The agent's registry: the collector above, and the histograms and counters the loop feeds."""

    def __init__(self, agent: Agent) -> None:
        self.registry = CollectorRegistry()
        self.sync_seconds = Histogram("webb_sync_duration_seconds", "One sync of the agent: load the source, run the "
                                      "pods, plan, Envoy's ACK, the tunnels and the datapath", registry=self.registry,
                                      buckets=SYNC_BUCKETS)
        self.push_seconds = Histogram("webb_xds_push_to_ack_seconds", "From a snapshot set for Envoy to Envoy's ACK of "
                                      "every resource type in it", registry=self.registry, buckets=ACK_BUCKETS)
        self.pushes = Counter("webb_xds_pushes", "Snapshots offered to Envoy, by what Envoy answered: ACK, NACK, or "
                              "nothing in time (the agent then tries again)", ["result"], registry=self.registry)
        for result in PUSH_RESULTS:
            self.pushes.labels(result)  # 0 from the start: a rate needs a first sample
        self.collector = AgentCollector(agent)
        self.registry.register(self.collector)
        self.server: MetricsServer | None = None

    @contextmanager
    def sync_timer(self) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.sync_seconds.observe(time.monotonic() - t0)

    def pushed(self, seconds: float, result: str) -> None:
        """A snapshot offered to Envoy: ``result`` acked, nacked or timeout after ``seconds``."""
        self.pushes.labels(result).inc()
        if result == "acked":
            self.push_seconds.observe(seconds)

    def start(self, address: str, xds: XdsServer | None = None) -> None:
        self.collector.xds = xds
        self.server = serve(self.registry, address, "agent")

    def stop(self) -> None:
        """Before the datapath closes: no scrape reads a map being released."""
        if self.server is not None:
            self.server.stop()
            self.server = None
