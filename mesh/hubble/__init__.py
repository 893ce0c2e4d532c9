"""Hubble's Observer API over Webb's flows, so that the real `hubble` CLI (and Hubble UI, Grafana's
Hubble data source ...) reads a Webb node as it reads a Cilium one: ``webb hubble serve``.

api      the stubs generated from github.com/cilium/cilium's api/v1 protos (`make hubble-api`)
convert  pure: one Webb flow (mesh.agent.flows) -> flow.Flow
filters  pure: flow.FlowFilter -> a predicate over flow.Flow, as Hubble's server reads them
store    the nodes' flow files, tailed into one ring buffer that followers wait on
server   the gRPC servicer (Observer, and grpc.health.v1 that `hubble status` asks first)
relay    one Observer API over several nodes' servers (as Hubble Relay), asked over gRPC
cli      `webb hubble serve`, `webb hubble relay`
"""
