"""What several `webb` commands (and the demo) share: the consoles, the state dir option, the
output formats (-o), the version, waiting for the agent.

Markup: rich reads ``[...]`` in a printed string as markup and ``:name:`` as an emoji code. What
a user, a manifest, Envoy or a peer wrote (a path, a name, an error) is escaped
(``rich.markup.escape``) or printed as ``rich.text.Text``, never formatted into markup; the
consoles never replace emoji codes.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from mesh.source import directory_version
from mesh.status import AgentStatus

console = Console(emoji=False)
err = Console(stderr=True, emoji=False)
STATE = Path(os.environ.get("WEBB_STATE_DIR", "/run/webb"))
StateOpt = Annotated[Path, typer.Option("--state-dir", help="agent state (status, flows, manifests)")]
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class TableFormat(StrEnum):
    """-o of the read commands that print a table (or lines)."""

    table = "table"
    json = "json"
    yaml = "yaml"


class TextFormat(StrEnum):
    """-o of `webb status`."""

    text = "text"
    json = "json"
    yaml = "yaml"


def output_option(help_: str = "output format") -> Any:
    """-o/--output: typer refuses a value that is not one of the enum's (exit 2, the choices named)."""
    return typer.Option("-o", "--output", case_sensitive=False, help=help_)


def dump(doc: Any, fmt: str, sort_keys: bool = False) -> None:
    """``doc`` as JSON or YAML on stdout (plain print: no markup, no wrapping)."""
    if fmt == "yaml":
        plain = json.loads(json.dumps(doc, default=str))  # tuples, paths ...: what JSON would show
        print(yaml.safe_dump(plain, sort_keys=sort_keys, allow_unicode=True), end="", flush=True)
    else:
        print(json.dumps(doc, indent=1, default=str, sort_keys=sort_keys), flush=True)


def version() -> str:
    """The installed distribution's version; from a source tree, pyproject's."""
    try:
        return metadata.version("webb")
    except metadata.PackageNotFoundError:
        try:
            return str(tomllib.loads(PYPROJECT.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def wait_converged(state_dir: Path, manifests: Path, timeout_s: float) -> AgentStatus:
    want = directory_version(manifests)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = AgentStatus.read(state_dir)
        if st is not None and st.applied_manifests() == want:
            return st
        time.sleep(0.05)
    raise TimeoutError(f"wait for agent: manifests version {want} not applied after {timeout_s}s "
                       f"(is `webb agent` running? see {state_dir}/status.json)")
