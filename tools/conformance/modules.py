"""Where the conformance tooling's inputs and products are: the build script's products (built or
cached), the Go module cache's Gateway API source (CRDs, the suite's manifests), nothing copied
into the repo.

    from tools.conformance.modules import crd_files
    crd_files("standard")   # the gateway.networking*.yaml files of the release tools/conformance/go.mod pins
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD_SCRIPT = HERE / "build.sh"
CRDS_SCRIPT = HERE / "crds.sh"
CACHE = Path(os.environ.get("WEBB_CONFORMANCE_CACHE", "/var/cache/webb/conformance"))
BUILD_TIMEOUT_S = 3600.0  # cold: the suite, echo-basic and Istio's echo app on 2 shared cores
CHANNELS = ("standard", "experimental")


def release() -> str:
    """The Gateway API release of tools/conformance/go.mod (e.g. v1.6.3)."""
    m = re.search(r"^\s*(?:require\s+)?sigs\.k8s\.io/gateway-api/conformance (v[0-9.]+)", (HERE / "go.mod").read_text(), re.M)
    if m is None:
        raise RuntimeError(f"no sigs.k8s.io/gateway-api/conformance release in {HERE / 'go.mod'}")
    return m.group(1)


def go_env() -> dict[str, str]:
    """The Go environment of build.sh: its own module and build caches, the local toolchain only."""
    return {**os.environ, "GOMODCACHE": str(CACHE / "gomod"), "GOCACHE": str(CACHE / "gocache"), "GOTOOLCHAIN": "local",
            "GOFLAGS": "-mod=readonly -buildvcs=false"}


@dataclass(frozen=True)
class Tools:
    release: str
    out: Path  # /var/cache/webb/conformance/<release>
    suite: Path  # conformance.test
    echo_basic: Path  # the echo-basic binary
    echo_advanced: Path  # the directory of Istio's echo server and client


def build() -> Tools:
    """tools/conformance/build.sh: builds what is missing, instant when everything is cached."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True, timeout=BUILD_TIMEOUT_S)
    kv = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)
    return Tools(kv["release"], Path(kv["out"]), Path(kv["suite"]), Path(kv["echo_basic"]), Path(kv["echo_advanced"]))


def module_dir(module: str, cwd: Path = HERE) -> Path:
    """The source of ``module`` at the version the go.mod in ``cwd`` requires (downloaded if missing)."""
    out = subprocess.run(["go", "mod", "download", "-json", module], cwd=cwd, env=go_env(), check=True, capture_output=True,
                         text=True, timeout=600)
    return Path(json.loads(out.stdout)["Dir"])


def crd_dir(channel: str = "standard") -> Path:
    """The directory of the Gateway API CRDs of a channel (tools/conformance/crds.sh)."""
    if channel not in CHANNELS:
        raise ValueError(f"channel {channel!r}: one of {CHANNELS}")
    out = subprocess.run(["bash", str(CRDS_SCRIPT), channel], check=True, capture_output=True, text=True, timeout=600)
    return Path(out.stdout.strip())


def crd_files(channel: str = "standard") -> list[Path]:
    """The channel's manifests (the CRDs and the safe-upgrades ValidatingAdmissionPolicy), without kustomization.yaml."""
    return sorted(crd_dir(channel).glob("gateway.networking*.yaml"))


def suite_manifests() -> list[Path]:
    """Every manifest the suite applies (base, mesh, per test), from the module cache."""
    root = module_dir("sigs.k8s.io/gateway-api/conformance")
    return sorted([root / "base" / "manifests.yaml", root / "mesh" / "manifests.yaml", *(root / "tests").glob("*.yaml")])


def manifest_images() -> set[str]:
    """Every image the suite's manifests name."""
    refs: set[str] = set()
    for f in suite_manifests():
        refs.update(m.group(1) for m in re.finditer(r"^\s*-?\s*image:\s*[\"']?([^\s\"']+)", f.read_text(), re.M))
    return refs
