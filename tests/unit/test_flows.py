"""Flows as the agent writes them (mesh.agent.flows): kernel events (FlowEvent, as the datapath
decodes them) and Envoy access-log entries (the JSON of xds.resources._access_log, as Envoy writes
them), named from a real plan. Pure: no kernel, no Envoy."""

from __future__ import annotations

from typing import Any

import pytest

from datapath.maps import FlowEvent
from datapath.types import PROTO_TCP, PROTO_UDP, Reason, Verdict
from mesh.agent.flows import Names, from_access_log, from_event, local_reason
from mesh.model import ClusterState, HttpMatch, IngressRule, MeshPolicy, Pod, PortRule, Selector, Service, ServicePort
from mesh.plan.node import NodeSpec, plan_node

GW = "10.244.1.1"
CLIENT_CG = 4242
V4, V6 = "10.96.0.80", "fd00:10:96::80"


def _state() -> ClusterState:
    pods = (Pod("default", "deathstar", (("app", "deathstar"),), ip="10.244.1.5", node="n1"),  # IPv4 only
            Pod("default", "tiefighter", (("app", "tiefighter"),), ip="10.244.1.6", node="n1"),
            Pod("default", "dns", (("app", "dns"),), ip="10.244.1.7", ip6="fd00:10:244:1::7", node="n1"))
    svcs = (Service("default", "deathstar", (("app", "deathstar"),), (ServicePort(80, 80, "TCP"),),
                    cluster_ip=V4, cluster_ip6=V6),
            Service("default", "dns", (("app", "dns"),), (ServicePort(53, 53, "UDP"),), cluster_ip="10.96.0.53",
                    cluster_ip6="fd00:10:96::53"),
            Service("default", "empty", (("app", "none"),), (ServicePort(80, 80, "TCP"),), cluster_ip="10.96.0.90",
                    cluster_ip6="fd00:10:96::90"))
    l7 = PortRule(((80, "TCP"),), (HttpMatch("POST", "/v1/request-landing", ("X-Token: abc", "X-Trace")),
                                   HttpMatch("GET", None)))
    pol = MeshPolicy("default", "rule1", Selector((("app", "deathstar"),)),
                     (IngressRule((Selector((("app", "tiefighter"),)),), (l7,)),))
    return ClusterState(pods=pods, services=svcs, policies=(pol,))


@pytest.fixture(scope="module")
def names() -> Names:
    return Names.of(plan_node(_state(), NodeSpec("n1", GW)), {CLIENT_CG: "default/tiefighter"})


def event(ip: str, port: int, verdict: Verdict, reason: Reason, proto: int = PROTO_TCP, new_ip: str = "",
          new_port: int = 0) -> FlowEvent:
    return FlowEvent(0, CLIENT_CG, 0, 0, ip, port, new_ip or ip, new_port, verdict, reason, proto)


def entry(**kw: Any) -> dict[str, Any]:
    """An access-log line as Envoy writes it (numbers as numbers, "-" for what it has not)."""
    e: dict[str, Any] = {"time": "1700000000.123", "service": "default/deathstar:80", "policies": "-",
                         "src": "10.244.1.6:40000", "upstream": "10.244.1.5:80", "cluster": "default/deathstar:80",
                         "authority": "deathstar", "method": "GET", "path": "/", "protocol": "HTTP/1.1", "status": 200,
                         "grpc_status": "-", "shadow": "-", "details": "via_upstream", "attempts": 1, "duration_ms": 3}
    e.update(kw)
    return e


# ---- (a) L4: the protocol the kernel saw ----
@pytest.mark.parametrize(("proto", "want"), [(PROTO_UDP, "UDP"), (PROTO_TCP, "TCP")])
def test_l4_flows_write_the_events_protocol(names: Names, proto: int, want: str) -> None:
    f = from_event(event("10.96.0.53", 53, Verdict.FORWARDED, Reason.SERVICE, proto, "10.244.1.7", 53), names)
    assert f["protocol"] == want and f["service"] == "default/dns" and f["dst_pod"] == "default/dns"
    f = from_event(event("10.96.0.90", 80, Verdict.DROPPED, Reason.NO_BACKEND, proto), names)
    assert f["protocol"] == want and f["reason"] == "no-backend"


# ---- (f) IPv6 first, no IPv6 backend ----
def test_an_ipv6_vip_without_backends_whose_ipv4_has_some_is_named_so(names: Names) -> None:
    f = from_event(event(V6, 80, Verdict.DROPPED, Reason.NO_BACKEND), names)
    assert (f["verdict"], f["reason"], f["service"]) == ("dropped", "no-backend-ipv6", "default/deathstar")
    assert f["why"] == (f"service default/deathstar has no IPv6 backend (its pods have no IPv6 address); its IPv4 VIP "
                        f"{V4}:80 has 1: a client that tries IPv6 first (curl) falls back to it")


def test_a_service_without_any_backend_is_still_no_backend(names: Names) -> None:
    for vip in ("10.96.0.90", "fd00:10:96::90"):
        f = from_event(event(vip, 80, Verdict.DROPPED, Reason.NO_BACKEND), names)
        assert (f["reason"], f["why"]) == ("no-backend", "service default/empty has no backend"), vip
    # the v6 VIP of another port/protocol than the one with IPv4 backends: not the fallback case
    f = from_event(event(V6, 80, Verdict.DROPPED, Reason.NO_BACKEND, PROTO_UDP), names)
    assert f["reason"] == "no-backend"


def test_a_dual_stack_service_with_ipv6_backends_has_no_empty_ipv6_vip(names: Names) -> None:
    assert ("fd00:10:96::53", 53, PROTO_UDP) not in names.ipv4_of_empty_ipv6
    assert names.ipv4_of_empty_ipv6 == {(V6, 80, PROTO_TCP): (V4, 1)}


# ---- (b) duration and retries ----
def test_l7_flows_carry_envoys_duration_and_retries(names: Names) -> None:
    f = from_access_log(entry(attempts=3, duration_ms=1250), names)
    assert (f["duration_ms"], f["retries"], f["verdict"], f["status"]) == (1250, 2, "forwarded", 200)
    f = from_access_log(entry(attempts="1", duration_ms="7"), names)  # as text, as older Envoys write them
    assert (f["duration_ms"], f["retries"]) == (7, 0)
    f = from_access_log(entry(attempts="-", duration_ms="-"), names)  # what Envoy has not: left out
    assert "retries" not in f and "duration_ms" not in f
    f = from_access_log(entry(attempts=True, duration_ms=[1]), names)  # not numbers: left out, not a crash
    assert "retries" not in f and "duration_ms" not in f
    f = from_access_log(entry(attempts="\u00b2", duration_ms="\u0663", status="-"), names)  # digits, not ASCII ones
    assert "retries" not in f and "duration_ms" not in f and f["status"] == 0


# ---- (c) gRPC: its status, not HTTP's 200 ----
def test_a_grpc_call_denied_by_rbac_shows_permission_denied(names: Names) -> None:
    f = from_access_log(entry(method="POST", path="/demo.Greeter/Denied", protocol="HTTP/2", status=200,
                              grpc_status="7", details="rbac_access_denied_matched_policy[none]",
                              policies="default/rule1#ingress[0]", upstream="-", attempts="-"), names)
    assert (f["verdict"], f["reason"], f["grpc_status"], f["grpc_code"]) == ("denied", "l7-policy-denied", 7,
                                                                            "PERMISSION_DENIED")
    assert f["policy"] == "default/rule1#ingress[0]" and "retries" not in f


def test_a_grpc_call_answered_by_its_backend_is_forwarded_with_its_status(names: Names) -> None:
    f = from_access_log(entry(protocol="HTTP/2", grpc_status=14, method="POST", path="/a.B/C"), names)
    assert (f["verdict"], f["grpc_status"], f["grpc_code"]) == ("forwarded", 14, "UNAVAILABLE")
    f = from_access_log(entry(protocol="HTTP/2", grpc_status="0"), names)
    assert (f["verdict"], f["grpc_code"]) == ("forwarded", "OK")
    f = from_access_log(entry(grpc_status="99"), names)  # not a known code: the number only
    assert f["grpc_status"] == 99 and "grpc_code" not in f


# ---- (d) Envoy's own replies: dropped, with a reason ----
@pytest.mark.parametrize(("status", "details", "reason"), [
    (404, "route_not_found", "l7-no-route"),
    (503, "no_healthy_upstream", "l7-no-upstream"),
    (500, "cluster_not_found", "l7-no-upstream"),
    (400, "http1.codec_error", "l7-bad-request"),
    (400, "http1.invalid_method", "l7-bad-request"),
    (400, "missing_host_header", "l7-bad-request"),
    (431, "request_headers_too_large", "l7-bad-request"),
    (503, "upstream_reset_before_response_started{connection_failure}", "l7-upstream-reset"),
    (504, "upstream_response_timeout", "l7-timeout"),
    (503, "overload_manager", "l7-local-reply"),
])
def test_envoys_local_replies_are_dropped_with_a_reason(names: Names, status: int, details: str, reason: str) -> None:
    f = from_access_log(entry(status=status, details=details, upstream="-", attempts="-"), names)
    assert (f["verdict"], f["reason"], f["status"]) == ("dropped", reason, status)
    assert f["why"].startswith(f"the node proxy answered {status} itself ({details}): ")


def test_a_grpc_call_without_a_route_is_dropped_with_its_grpc_status(names: Names) -> None:
    f = from_access_log(entry(protocol="HTTP/2", status=200, grpc_status="12", details="route_not_found",
                              upstream="-"), names)
    assert (f["verdict"], f["reason"], f["grpc_code"]) == ("dropped", "l7-no-route", "UNIMPLEMENTED")
    assert f["why"] == ("the node proxy answered gRPC UNIMPLEMENTED itself (route_not_found): no route of service "
                        "default/deathstar:80 matches the request")


@pytest.mark.parametrize(("status", "details", "grpc"), [
    (503, "via_upstream", None),  # the backend's own 503: forwarded, its answer
    (404, "via_upstream", None),
    (301, "direct_response", None),  # a configured reply
    (0, "downstream_remote_disconnect", None),  # the client went away: no error reply
    (200, "via_upstream", 0),
])
def test_what_a_backend_answered_is_forwarded(names: Names, status: int, details: str, grpc: int | None) -> None:
    assert local_reason(details, status, grpc) is None
    f = from_access_log(entry(status=status, details=details), names)
    assert (f["verdict"], f["reason"]) == ("forwarded", "l7-forwarded") and "why" not in f


def test_an_audit_denial_then_a_local_reply_is_the_drop(names: Names) -> None:
    f = from_access_log(entry(shadow="denied", status=503, details="no_healthy_upstream"), names)
    assert (f["verdict"], f["reason"]) == ("dropped", "l7-no-upstream")
    f = from_access_log(entry(shadow="denied"), names)
    assert (f["verdict"], f["reason"]) == ("audit", "l7-policy-audit")


# ---- (e) the why names the whole rule ----
def test_an_l7_denial_names_the_whole_rule_with_its_headers(names: Names) -> None:
    f = from_access_log(entry(method="PUT", path="/v1/exhaust-port", status=403, upstream="-",
                              details="rbac_access_denied_matched_policy[none]",
                              policies="default/rule1#ingress[0]"), names)
    assert f["verdict"] == "denied"
    why = f["why"]
    assert why.startswith("no HTTP rule allows PUT /v1/exhaust-port: default/rule1#ingress[0] allows ")
    rules = why.split(": default/rule1#ingress[0] allows ", 1)[1].lower()
    assert rules == ("post /v1/request-landing (header x-token: abc, header x-trace present), get * "
                     "from its 1 allowed source address(es)"), why
