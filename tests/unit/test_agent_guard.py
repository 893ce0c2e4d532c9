"""The agent never dies of input: a sync that raises keeps the last plan and says why (issue 13)."""

from __future__ import annotations

from pathlib import Path

from mesh.agent.loop import Agent, AgentConfig
from mesh.model import ClusterState
from mesh.runtime.local import NodeConfig


class Exploding:
    """A source whose state makes planning raise (a bug reached by input no check foresaw)."""

    errors: list[str] = []

    def version(self) -> str:
        return "v1"

    def load(self) -> ClusterState:
        raise RecursionError("maximum recursion depth exceeded")


def test_a_sync_that_raises_is_reported_not_fatal(tmp_path: Path) -> None:
    cfg = AgentConfig(node=NodeConfig(name="g1", state_dir=tmp_path), manifests=tmp_path / "m")
    agent = Agent(cfg, source=Exploding())
    agent._sync_guarded("v1")  # noqa: SLF001 - the loop's own entry point
    assert agent.errors and "RecursionError" in agent.errors[0] and "stays in force" in agent.errors[0]
    assert agent._seen_version == "v1"  # noqa: SLF001 - not retried in a hot loop: the next change retries
    assert agent.cfg.lifetime_s == 0  # no default lifetime: a node agent runs until stopped
