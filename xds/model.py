"""The input vocabulary of the Envoy resource builders: plain frozen dataclasses, no protobuf.

The planner (``mesh.plan``) makes these; ``xds.resources`` translates them into Envoy's protos.
Route matches and retries are the model's (``mesh.model``): they are declared here only as the
shape xds reads (Protocols), since xds does not import mesh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class HeaderMatchSpec(Protocol):
    """A header condition of a route (``mesh.model.HeaderMatch``; xds does not import mesh)."""

    @property
    def name(self) -> str: ...

    @property
    def value(self) -> str: ...

    @property
    def type(self) -> str: ...  # Exact | RegularExpression (RE2, whole value)


class RouteMatchSpec(Protocol):
    """A Gateway API HTTPRouteMatch (``mesh.model.RouteMatch``). ``path_type``: Exact, PathPrefix
    (whole path elements), RegularExpression (RE2, whole path), or Prefix (a plain string prefix)."""

    @property
    def path_type(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def method(self) -> str | None: ...

    @property
    def headers(self) -> Sequence[HeaderMatchSpec]: ...

    @property
    def query(self) -> Sequence[HeaderMatchSpec]: ...  # queryParams: name, value, Exact | RegularExpression


class RetrySpec(Protocol):
    """A retry policy (``mesh.model.Retry``): ``attempts`` retries after the first try."""

    @property
    def attempts(self) -> int: ...

    @property
    def per_try_timeout_ms(self) -> int: ...

    @property
    def codes(self) -> Sequence[int]: ...

    @property
    def retry_on(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class HttpRule:
    """One allowed request shape; None fields match anything. ``path`` is a full-match regex."""

    method: str | None = None
    path: str | None = None
    headers: tuple[tuple[str, str | None], ...] = ()  # (name, exact value or None = present)


@dataclass(frozen=True)
class RbacPolicy:
    name: str  # "namespace/policy#ingress[i]" — reaches the access log and `webb observe`
    source_ips: tuple[str, ...] | None  # None: any source
    rules: tuple[HttpRule, ...]  # empty: any request
    audit: bool = False  # from a MeshPolicy in audit mode


class HeaderModifierSpec(Protocol):
    """``mesh.model.HeaderModifier``: set (replace), add (append), remove."""

    @property
    def set(self) -> Sequence[tuple[str, str]]: ...

    @property
    def add(self) -> Sequence[tuple[str, str]]: ...

    @property
    def remove(self) -> Sequence[str]: ...


class RedirectSpec(Protocol):
    """``mesh.model.Redirect``: None fields keep the request's."""

    @property
    def scheme(self) -> str | None: ...

    @property
    def hostname(self) -> str | None: ...

    @property
    def port(self) -> int | None: ...

    @property
    def path_type(self) -> str | None: ...  # ReplaceFullPath | ReplacePrefixMatch

    @property
    def path(self) -> str | None: ...

    @property
    def status_code(self) -> int: ...


class RewriteSpec(Protocol):
    """``mesh.model.Rewrite``."""

    @property
    def hostname(self) -> str | None: ...

    @property
    def path_type(self) -> str | None: ...

    @property
    def path(self) -> str | None: ...


class RouteFiltersSpec(Protocol):
    """``mesh.model.RouteFilters``."""

    @property
    def request_headers(self) -> HeaderModifierSpec | None: ...

    @property
    def response_headers(self) -> HeaderModifierSpec | None: ...

    @property
    def redirect(self) -> RedirectSpec | None: ...

    @property
    def rewrite(self) -> RewriteSpec | None: ...


@dataclass(frozen=True)
class HttpRoute:
    """Requests matching any of ``matches`` go to ``clusters`` split by weight."""

    matches: tuple[RouteMatchSpec, ...] = ()  # empty: every request (path prefix /)
    clusters: tuple[tuple[str, int], ...] = ()  # (upstream name, weight); none with weight > 0: 500
    timeout_ms: int | None = None  # None: Envoy's 15 s; 0: no timeout
    retry: RetrySpec | None = None
    filters: RouteFiltersSpec | None = None
    backend_headers: tuple[tuple[str, HeaderModifierSpec], ...] = ()  # (upstream name, its RequestHeaderModifier)


@dataclass(frozen=True)
class UpstreamMtls:
    """Envoy-originated mutual TLS (1.3) to a cluster: present the certificate of ``identity``
    (the SDS tls_certificate Secret of that SPIFFE ID), verify the peer against the bundle of
    ``trust_domain`` (the SDS validation-context Secret ``spiffe://<trust_domain>``) and accept
    only a peer whose URI SAN is one of ``peer_ids`` (exact)."""

    identity: str  # spiffe://<trust-domain>/ns/<ns>/sa/<sa> of the source workload
    trust_domain: str
    peer_ids: tuple[str, ...]  # the destination workloads' SPIFFE IDs
    sni: str = ""  # what the peer selects its certificate by (tunnel.session.sni_of); "" = none


@dataclass(frozen=True)
class MtlsEndpoint:
    """A backend reached by Envoy-originated mTLS (another node's tunnel port for one pod),
    next to plaintext ones in the same cluster (transport_socket_matches by endpoint metadata)."""

    address: str
    port: int
    tls: UpstreamMtls


@dataclass(frozen=True)
class Upstream:
    """One service port as a route target: an EDS cluster and its endpoints."""

    name: str  # "namespace/service:port"
    backends: tuple[tuple[str, int], ...]
    http2: bool = False  # speak HTTP/2 (h2c) to the backends: gRPC, appProtocol h2c
    tls: UpstreamMtls | None = None  # mTLS to the backends, certificates by SDS
    mtls_backends: tuple[MtlsEndpoint, ...] = ()  # more backends, each with its own mTLS


@dataclass(frozen=True)
class HttpService:
    """An L7 service port: a filter chain of the node proxy's one L7 listener (``listen_ip``:
    ``listen_port``; services on one address share a listener), chosen by the original destination
    the kernel redirect hands Envoy (SO_ORIGINAL_DST): ``match_ips`` (the VIPs) and ``match_port``.
    Without them, the listen address itself (a client that connects straight to Envoy)."""

    name: str  # "namespace/service:port"
    listen_ip: str
    listen_port: int
    backends: tuple[tuple[str, int], ...]  # the service's own upstream, when build() derives clusters
    policies: tuple[RbacPolicy, ...] | None  # None: no L7 policy (allow all)
    listen_ip6: str = ""  # the same listener on the node's IPv6 too (dual stack)
    routes: tuple[HttpRoute, ...] = ()  # from MeshRoutes; empty: every request to upstream ``name``
    # more RBAC sets, one per further backend identity: a request must be allowed by ``policies`` and each
    also: tuple[tuple[RbacPolicy, ...], ...] = ()
    match_ips: tuple[str, ...] = ()  # the service's VIPs (IPv4, IPv6): the original destination
    match_port: int = 0  # the service port (0: listen_port)

    @property
    def listen_key(self) -> tuple[str, int]:
        return self.listen_ip, self.listen_port


@dataclass(frozen=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]  # "*" matches any host
    routes: tuple[HttpRoute, ...]


@dataclass(frozen=True, repr=False)
class TlsSecret:
    """A certificate and its key for SDS. repr() shows digests only: key material is never
    printed or logged, yet a new key still changes the plan version."""

    name: str  # "namespace/secret"
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.cert_pem + b"\0" + self.key_pem).hexdigest()[:16]
        return f"TlsSecret({self.name!r}, sha256={digest})"


class WorkloadIdentity(Protocol):
    """What a workload certificate has (``certs.ca.WorkloadCert``; xds does not import certs)."""

    @property
    def spiffe_id(self) -> str: ...

    @property
    def chain_pem(self) -> bytes: ...

    @property
    def key_pem(self) -> bytes: ...


def workload_secret(cert: WorkloadIdentity) -> TlsSecret:
    """A workload certificate as an SDS Secret named by its SPIFFE ID: the leaf and any
    intermediate, and the key (never shown by repr)."""
    return TlsSecret(cert.spiffe_id, cert.chain_pem, cert.key_pem)


def bundle_name(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}"


@dataclass(frozen=True)
class TrustBundle:
    """The root(s) of a trust domain: an SDS validation-context Secret ``spiffe://<trust domain>``."""

    trust_domain: str
    roots_pem: bytes

    @property
    def name(self) -> str:
        return bundle_name(self.trust_domain)


@dataclass(frozen=True)
class TlsHosts:
    hosts: tuple[str, ...]  # SNI server names served with ``secret``
    secret: str


@dataclass(frozen=True)
class GatewayChain:
    """One filter chain of a gateway listener: plaintext (``secret`` "") or TLS terminated with the
    SDS Secret ``secret`` for the SNI names ``server_names`` (empty: any name)."""

    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    secret: str = ""
    server_names: tuple[str, ...] = ()
    # TLS passthrough (not None): the stream as is to these (upstream, weight); none: closed
    passthrough: tuple[tuple[str, int], ...] | None = None


@dataclass(frozen=True)
class GatewayListener:
    """A north-south listener of the node Envoy (a Gateway's port, or the Ingress class's):
    routes are inline (see references())."""

    name: str  # "gateway:<ns>/<name>:<port>" or "ingress:http" / "ingress:https"
    listen_ip: str
    port: int
    chains: tuple[GatewayChain, ...]


def service_routes(svc: HttpService) -> tuple[HttpRoute, ...]:
    return svc.routes or (HttpRoute(clusters=((svc.name, 1),)),)
