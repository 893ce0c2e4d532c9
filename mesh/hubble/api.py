"""The Hubble API's Python stubs, generated at build time (tools/hubble/build.sh api, `make hubble-api`)
from the protos of the github.com/cilium/cilium Go module into build/hubble_api/: no proto file is
copied into this repository, and the stubs follow the release tools/hubble/go.mod pins.

The stubs form one package, ``hubble_api`` (hubble_api.flow.flow_pb2, hubble_api.observer ...), loaded
from its directory without touching sys.path: WEBB_HUBBLE_API names another directory (an installed
image's), else the checkout's build/hubble_api. Nothing here imports grpc: the message modules do
not; only mesh.hubble.server loads observer_pb2_grpc.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = "hubble_api"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "build" / PACKAGE


class StubsMissingError(RuntimeError):
    """The generated stubs are not there: `make hubble-api` makes them."""


def stubs_dir() -> Path:
    return Path(os.environ.get("WEBB_HUBBLE_API") or DEFAULT_DIR)


def _package() -> ModuleType:
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    where = stubs_dir()
    init = where / "__init__.py"
    if not init.is_file():
        raise StubsMissingError(f"the Hubble API stubs are not built: no {init}; run `make hubble-api` "
                           "(tools/hubble/build.sh api), or set WEBB_HUBBLE_API to their directory")
    spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[str(where)])
    if spec is None or spec.loader is None:
        raise StubsMissingError(f"{where}: not a Python package")
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = pkg
    try:
        spec.loader.exec_module(pkg)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    return pkg


def load(module: str) -> ModuleType:
    """``load("flow.flow_pb2")`` -> hubble_api.flow.flow_pb2."""
    _package()
    return importlib.import_module(f"{PACKAGE}.{module}")


def release() -> str:
    """What the stubs were made from ("cilium v1.20.2, grpcio-tools 1.85.1"), or ""."""
    try:
        return (stubs_dir() / "STAMP").read_text().strip()
    except OSError:
        return ""
