"""Webb flow -> Hubble flow.Flow (mesh.hubble.convert), and Hubble's filters over them (mesh.hubble.filters).

The records are the agent's own (mesh.agent.flows, mesh.agent.tunnels), as written to flows.jsonl by a
Star Wars run. The stubs come from `make hubble-api` (github.com/cilium/cilium's protos).
"""

from __future__ import annotations

from typing import Any

import pytest

from mesh.hubble.convert import ACCESS_LOG, DROP, POLICY_VERDICT, TRACE, flow_pb, split_host_port, text, to_flow
from mesh.hubble.filters import FilterError, build_all

XWING_DENIED = {"dst": "10.96.63.4:80", "dst_pod": "default/deathstar-1", "layer": "L4", "policy": "default/rule1",
                "protocol": "TCP", "reason": "policy-denied", "service": "default/deathstar", "src": "default/xwing",
                "time": 1796312853.7127733, "verdict": "denied",
                "why": "default/deathstar-1 is selected by MeshPolicy default/rule1 and no ingress rule allows default/xwing "
                       "on port 80/TCP"}
EXHAUST_PORT = {"dst_pod": None, "envoy_details": "rbac_access_denied_matched_policy[none]", "layer": "L7",
                "method": "PUT", "path": "/v1/exhaust-port", "policy": "default/rule1#ingress[0]", "protocol": "HTTP/1.1",
                "reason": "l7-policy-denied", "service": "default/deathstar:80", "src": "default/tiefighter", "status": 403,
                "time": 1796312853.557, "verdict": "denied",
                "why": "no HTTP rule allows PUT /v1/exhaust-port: default/rule1#ingress[0] allows POST /v1/request-landing"}
LANDING = {"dst_pod": "default/deathstar-2", "envoy_details": "via_upstream", "layer": "L7", "method": "POST",
           "path": "/v1/request-landing", "protocol": "HTTP/1.1", "reason": "l7-forwarded", "service": "default/deathstar:80",
           "src": "default/tiefighter", "status": 200, "time": 1796312853.415, "verdict": "forwarded"}
VIA_PROXY = {"dst": "fd00:10:96::3f04:80", "dst_pod": None, "layer": "L4", "protocol": "TCP", "reason": "l7-proxy",
             "service": "default/deathstar", "src": "default/tiefighter", "time": 1796312853.414276, "verdict": "forwarded",
             "via": "envoy fd00:10:244::1:15001"}
DNS_UDP = {"dst": "10.96.0.10:53", "dst_pod": "kube-system/coredns-0", "layer": "L4", "protocol": "UDP", "reason": "service",
           "service": "kube-system/kube-dns", "src": "default/tiefighter", "time": 1796312851.6, "verdict": "forwarded"}
NO_BACKEND = {"dst": "10.96.0.9:80", "dst_pod": None, "layer": "L4", "protocol": "TCP", "reason": "no-backend",
              "service": "default/empty", "src": "default/tiefighter", "time": 1796312851.7, "verdict": "dropped",
              "why": "service default/empty has no backend"}
STRICT = {"dst": "10.244.0.7:80", "dst_pod": "secure/db-0", "layer": "L4", "protocol": "TCP", "reason": "mtls-strict",
          "src": "192.0.2.9", "time": 1796312851.8, "verdict": "dropped", "why": "plaintext refused"}
AUDIT = {"dst": "10.96.63.4:80", "dst_pod": "default/deathstar-1", "layer": "L4", "policy": "default/rule1", "protocol": "TCP",
         "reason": "policy-audit", "service": "default/deathstar", "src": "default/xwing", "time": 1796312851.9,
         "verdict": "audit", "why": "would be denied"}
TUNNEL_FAILED = {"dst": "default/deathstar", "service": "default/deathstar", "dst_pod": None, "layer": "L4", "protocol": "TCP",
                 "reason": "mtls-failed", "src": "default/xwing", "time": 1796312852.0, "verdict": "failed",
                 "why": "peer unreachable", "bytes_sent": 0, "bytes_received": 0, "tls": "ktls"}
ALL = [XWING_DENIED, EXHAUST_PORT, LANDING, VIA_PROXY, DNS_UDP, NO_BACKEND, STRICT, AUDIT, TUNNEL_FAILED]


def test_a_policy_denial_at_connect_is_a_policy_denied_drop_naming_pods_policy_and_why() -> None:
    f = to_flow(XWING_DENIED, "node1")
    assert f.verdict == flow_pb.DROPPED
    assert f.drop_reason_desc == flow_pb.POLICY_DENIED and f.drop_reason == flow_pb.POLICY_DENIED
    assert (f.source.namespace, f.source.pod_name) == ("default", "xwing")
    assert (f.destination.namespace, f.destination.pod_name) == ("default", "deathstar-1")
    assert (f.destination_service.namespace, f.destination_service.name) == ("default", "deathstar")
    assert f.IP.destination == "10.96.63.4" and f.IP.ipVersion == flow_pb.IPv4
    assert f.l4.HasField("TCP") and f.l4.TCP.destination_port == 80
    assert f.Type == flow_pb.L3_L4
    assert (f.event_type.type, f.event_type.sub_type) == (DROP, flow_pb.POLICY_DENIED)  # the CLI prints "Policy denied"
    assert [(p.namespace, p.name, p.kind) for p in f.ingress_denied_by] == [("default", "rule1", "MeshPolicy")]
    assert f.Summary.startswith("policy-denied: default/deathstar-1 is selected by MeshPolicy default/rule1")
    assert f.Summary.endswith("on port 80/TCP; TCP")
    assert f.node_name == "node1" and f.emitter.name == "Webb"
    assert f.is_reply.value is False and f.HasField("is_reply")
    assert (f.time.seconds, f.time.nanos) == (1796312853, 712773000)


def test_an_l7_denial_is_an_http_record_with_code_method_url_and_the_rule() -> None:
    f = to_flow(EXHAUST_PORT, "node1")
    assert f.verdict == flow_pb.DROPPED and f.drop_reason_desc == flow_pb.POLICY_DENIED
    assert f.Type == flow_pb.L7 and f.event_type.type == ACCESS_LOG
    h = f.l7.http
    assert (h.code, h.method, h.url, h.protocol) == (403, "PUT", "/v1/exhaust-port", "HTTP/1.1")
    assert f.l7.type == flow_pb.RESPONSE
    assert f.source.pod_name == "tiefighter" and not f.HasField("destination")  # Envoy refused it: no upstream
    assert f.destination_service.name == "deathstar" and f.l4.TCP.destination_port == 80
    assert f.HasField("IP")  # the CLI names hosts only when IP is there
    [p] = f.ingress_denied_by
    assert (p.name, list(p.labels)) == ("rule1", ["webb.dev/rule=ingress[0]"])
    assert f.Summary.startswith("HTTP/1.1 403 PUT /v1/exhaust-port; l7-policy-denied: no HTTP rule allows PUT")


@pytest.mark.parametrize(("record", "verdict", "reason", "event"), [
    (LANDING, flow_pb.FORWARDED, flow_pb.DROP_REASON_UNKNOWN, (ACCESS_LOG, 0)),
    (VIA_PROXY, flow_pb.FORWARDED, flow_pb.DROP_REASON_UNKNOWN, (TRACE, 1)),  # to-proxy
    (DNS_UDP, flow_pb.FORWARDED, flow_pb.DROP_REASON_UNKNOWN, (TRACE, 0)),  # to-endpoint
    (NO_BACKEND, flow_pb.DROPPED, flow_pb.SERVICE_BACKEND_NOT_FOUND, (DROP, flow_pb.SERVICE_BACKEND_NOT_FOUND)),
    (STRICT, flow_pb.DROPPED, flow_pb.UNENCRYPTED_TRAFFIC, (DROP, flow_pb.UNENCRYPTED_TRAFFIC)),
    (AUDIT, flow_pb.AUDIT, flow_pb.DROP_REASON_UNKNOWN, (POLICY_VERDICT, 0)),
    (TUNNEL_FAILED, flow_pb.ERROR, flow_pb.DROP_REASON_UNKNOWN, (DROP, 0)),
], ids=["l7-forwarded", "to-proxy", "udp", "no-backend", "mtls-strict", "audit", "tunnel-failed"])
def test_each_kind_of_webb_flow_maps_to_hubbles_verdict_reason_and_event_type(
        record: dict[str, Any], verdict: int, reason: int, event: tuple[int, int]) -> None:
    f = to_flow(record, "n")
    assert f.verdict == verdict and f.drop_reason_desc == reason
    assert (f.event_type.type, f.event_type.sub_type) == event


def test_addresses_ports_and_what_is_not_a_pod() -> None:
    v6 = to_flow(VIA_PROXY, "n")
    assert v6.IP.destination == "fd00:10:96::3f04" and v6.IP.ipVersion == flow_pb.IPv6
    assert v6.trace_observation_point == flow_pb.TO_PROXY and "via envoy fd00:10:244::1:15001" in v6.Summary
    udp = to_flow(DNS_UDP, "n")
    assert udp.l4.HasField("UDP") and udp.l4.UDP.destination_port == 53 and not udp.l4.HasField("TCP")
    assert udp.Summary == "service; UDP"
    strict = to_flow(STRICT, "n")  # refused where it arrived, from an address outside the mesh
    assert strict.IP.source == "192.0.2.9" and not strict.HasField("source")
    assert strict.traffic_direction == flow_pb.INGRESS and to_flow(XWING_DENIED, "n").traffic_direction == flow_pb.EGRESS
    odd = to_flow({**XWING_DENIED, "src": "cgroup:4242"}, "n")
    assert list(odd.source_names) == ["cgroup:4242"] and not odd.HasField("source")
    tunnel = to_flow(TUNNEL_FAILED, "n")
    assert tunnel.IP.encrypted and tunnel.IP.destination == "" and tunnel.destination_service.name == "deathstar"
    assert split_host_port("[fd00::1]:8080") == ("fd00::1", 8080) and split_host_port("fd00::1:8080") == ("fd00::1", 8080)
    assert split_host_port("default/deathstar") == ("", 0) and split_host_port("10.0.0.1:99999") == ("10.0.0.1", 0)


@pytest.mark.parametrize("record", [
    {},
    {"verdict": 7, "layer": None, "time": "soon", "src": ["x"], "dst": {"a": 1}, "status": "NaN"},
    {"verdict": "DENIED", "time": -5, "status": 10**30, "dst": "10.0.0.1:-1", "policy": ",,/,a/b#", "src": "Default/X"},
    {"verdict": "denied", "layer": "L7", "path": "/\ud800bad\udfff" + "x" * 10000, "method": "\x00GET", "time": 1e300},
], ids=["empty", "wrong-types", "out-of-range", "bad-text"])
def test_a_malformed_or_hostile_record_converts_and_serializes(record: dict[str, Any]) -> None:
    f = to_flow(record, "n\udc80ode")
    data = f.SerializeToString()  # protobuf refuses invalid UTF-8: the converter must have cleaned it
    again = flow_pb.Flow.FromString(data)
    assert again.uuid == f.uuid and len(again.l7.http.url) <= 4096
    assert not f.source.pod_name or f.source.pod_name.islower()


def test_the_uuid_is_the_same_for_the_same_record_and_node_only() -> None:
    a, b = to_flow(XWING_DENIED, "node1"), to_flow(dict(XWING_DENIED), "node1")
    assert a.uuid == b.uuid
    assert to_flow(XWING_DENIED, "node2").uuid != a.uuid and to_flow(AUDIT, "node1").uuid != a.uuid


def test_text_keeps_valid_utf8_and_bounds_length() -> None:
    assert text("Ship landed ✈") == "Ship landed ✈"
    assert text("a\ud800b") == "a?b" and text(None) == "" and text(5) == "5" and len(text("x" * 9000)) == 4096


# ---- filters, as hubble observe sends them ----
FLOWS = [to_flow(r, "node1") for r in ALL]


def _ids(whitelist: list[Any], blacklist: list[Any] | None = None) -> list[str]:
    match = build_all(whitelist, blacklist or [])
    return [f"{f.source.pod_name or f.IP.source}>{f.l7.http.method or f.drop_reason_desc}" for f in FLOWS if match(f)]


def ff(**kw: Any) -> Any:
    return flow_pb.FlowFilter(**kw)


def test_verdict_dropped_is_webbs_denied_and_dropped() -> None:
    got = build_all([ff(verdict=[flow_pb.DROPPED])], [])
    assert [f.Summary.split(":")[0] for f in FLOWS if got(f)] == [
        "policy-denied", "HTTP/1.1 403 PUT /v1/exhaust-port; l7-policy-denied", "no-backend", "mtls-strict"]


def test_pods_namespaces_and_services_as_hubble_reads_them() -> None:
    assert _ids([ff(source_pod=["xwing"])]) == ["xwing>133", "xwing>0", "xwing>0"]  # no namespace: default
    assert _ids([ff(source_pod=["default/tie"])]) == _ids([ff(source_pod=["tiefighter"])])  # a prefix
    assert len(_ids([ff(source_pod=["default/tie"])])) == 5
    assert _ids([ff(destination_pod=["secure/"])]) == ["192.0.2.9>195"]  # a namespace
    # --namespace kube-system: either side in it (two filters, one must match)
    assert _ids([ff(source_pod=["kube-system/"]), ff(destination_pod=["kube-system/"])]) == ["tiefighter>0"]
    assert len(_ids([ff(destination_service=["default/deathstar"])])) == 6
    with pytest.raises(FilterError, match="must not be empty"):
        build_all([ff(source_pod=[""])], [])


def test_blacklist_subtracts_and_fields_of_one_filter_all_apply() -> None:
    both = _ids([ff(source_pod=["xwing"], verdict=[flow_pb.DROPPED])])
    assert both == ["xwing>133"]
    assert _ids([ff(verdict=[flow_pb.DROPPED])], [ff(protocol=["http"])]) == ["xwing>133", "tiefighter>158", "192.0.2.9>195"]


def test_protocol_http_ports_ips_and_drop_reasons() -> None:
    assert _ids([ff(protocol=["UDP"])]) == ["tiefighter>0"]
    assert _ids([ff(protocol=["http"])]) == ["tiefighter>PUT", "tiefighter>POST"]
    assert _ids([ff(http_status_code=["4+"])]) == ["tiefighter>PUT"]
    assert _ids([ff(http_status_code=["200"], http_method=["post"])]) == ["tiefighter>POST"]
    assert _ids([ff(http_path=["^/v1/exhaust"])]) == ["tiefighter>PUT"]
    assert _ids([ff(destination_port=["53"])]) == ["tiefighter>0"]
    assert _ids([ff(destination_ip=["10.96.0.0/16"], verdict=[flow_pb.DROPPED])]) == ["xwing>133", "tiefighter>158"]
    assert _ids([ff(source_ip=["192.0.2.9"])]) == ["192.0.2.9>195"]
    assert _ids([ff(drop_reason_desc=[flow_pb.UNENCRYPTED_TRAFFIC])]) == ["192.0.2.9>195"]
    assert len(_ids([ff(event_type=[flow_pb.EventTypeFilter(type=DROP)])])) == 4  # --type drop (and the failed tunnel)
    assert _ids([ff(node_name=["node*"])]) == _ids([]) and _ids([ff(node_name=["other"])]) == []
    assert _ids([ff(node_name=["default/node1"])]) == _ids([]) and _ids([ff(node_name=["east/node1"])]) == []
    assert _ids([ff(encrypted=[True])]) == ["xwing>0"]


@pytest.mark.parametrize(("flt", "message"), [
    (ff(source_label=["k8s:app=xwing"]), "source_label: not supported"),
    (ff(experimental=flow_pb.FlowFilter.Experimental(cel_expression=["true"])), "experimental: not supported"),
    (ff(protocol=["quic"]), "unknown protocol"),
    (ff(http_status_code=["4xx"]), "invalid status code"),
    (ff(http_path=["(unclosed"]), "http_path"),
    (ff(destination_port=["http"]), "not a port"),
    (ff(node_name=["a/b/c"]), "too many slashes"),
    (ff(node_name=["node$"]), "invalid character"),
    (ff(source_ip=["10.0.0.300"]), "neither an IP address nor a CIDR"),
    (ff(http_method=["GET"], event_type=[flow_pb.EventTypeFilter(type=DROP)]), "only match 'l7' events"),
], ids=["labels", "cel", "protocol", "status", "regex", "port", "slashes", "glob", "ip", "http-without-l7"])
def test_what_webb_cannot_judge_or_cannot_parse_is_refused_naming_it(flt: Any, message: str) -> None:
    with pytest.raises(FilterError, match=message):
        build_all([flt], [])
    with pytest.raises(FilterError, match=message):
        build_all([], [flt])
