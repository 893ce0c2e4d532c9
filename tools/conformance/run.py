"""`make conformance`: the upstream Gateway API conformance suite against Webb on the one-node cluster.

  1. tools      tools/conformance/build.sh (the suite as a test binary, echo-basic, Istio's echo app; cached
                in /var/cache/webb/conformance/<release>) and the images the suite's manifests name
                (tools/conformance/images.py)
  2. wait       until no other node of tests/cluster runs on this machine (their names are shared), bounded
  3. node       tests/cluster/node.py's KubeNode (webb-kn1): kubelet, containerd, CoreDNS; the images imported
  4. CRDs       the release's Gateway API CRDs, one channel (standard by default), from the Go module cache
  5. Webb       its Helm chart with its own image, as tests/cluster/test_install.py installs it (helm_installed)
  6. suite      conformance.test -gateway-class webb -conformance-profiles ... -report-output ..., KUBECONFIG of
                the node, bounded in time (-test.timeout, then SIGTERM/SIGKILL by PID); its whole output in
                build/conformance/<release>/suite.log, the report in conformance/reports/<release>/webb-<version>.yaml
  7. teardown   always: helm uninstall, then KubeNode.stop() (every process by PID, the sysctls kubelet sets put
                back, nothing left: checked)

Supported features: inferred from GatewayClass ``webb``'s ``status.supportedFeatures`` when it lists any (the
suite's own inference); otherwise the profiles' core features only (``-supported-features Gateway[,Mesh]``: the
suite adds each profile's core features), so a first run without Gateway support still ends in a report.

A guard thread watches every Gateway's ``status.addresses`` while the suite runs: the suite sends its requests
there, from this host. An address outside 127.0.0.0/8, the node's pod range and its service range (or a
hostname, which would need the host's resolvers) stops the suite at once: no packet leaves the machine.

Gateways that share a port need an address each (docs/gateway.md): after the install, ``helm upgrade
--reuse-values`` gives the agent a gateway pool of the node's address and 127.0.120.1-15 (loopback: local to the
host, where the suite runs and the host-network Envoy binds); ``--gateway-addresses`` sets another.

    python -m tools.conformance.run [--profiles ...] [--timeout S] [--run-test NAME] [-- <more suite flags>]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import cleanup as cluster_cleanup
from tests.cluster.node import KubeNode, NodeConfig
from tools.cluster.images import import_archives
from tools.conformance import images, modules

REPO = modules.REPO
PROFILES = "GATEWAY-HTTP,GATEWAY-GRPC,GATEWAY-TLS,MESH-HTTP,MESH-GRPC"
GATEWAY_CLASS = "webb"
CONTROLLER = "webb.io/gateway-controller"
WAIT_OTHER_S = 20 * 60  # another engineer's cluster session: wait for it, bounded
WAIT_POLL_S = 10.0
SUITE_TIMEOUT_S = 60 * 60  # the five profiles, most tests failing after their waits (60-180 s each), some in parallel
KILL_GRACE_S = 15.0
GUARD_POLL_S = 1.0
CRD_ESTABLISHED_S = 60
# Gateways that share a port need an address each (docs/gateway.md: the agent's gateway pool). Besides the node's
# address, loopback ones: local to the host (where the suite runs and the agent's Envoy binds, host network), so the
# suite's requests never leave it; 127.0.120/24 stays clear of the embedded mode's default 127.0.0.1
LOOPBACK_POOL = [f"127.0.120.{i}" for i in range(1, 16)]
SHOW = re.compile(r"^\s*(--- (PASS|FAIL)|=== RUN\s+TestConformance/\S+$|(PASS|FAIL|ok)\b|panic:|Supported features|"
                  r"WARNING|.*Test Setup:)")


def log(msg: str) -> None:
    print(f"[conformance] {msg}", flush=True)


# ---------------------------------------------------------------- another cluster of tests/cluster?

def other_cluster() -> str | None:
    """A node of tests/cluster that runs now (a live owner in a record, or any kubelet/kube-apiserver
    process), described; None when there is none."""
    root = NodeConfig().run_root
    for rec_path in sorted(root.glob(f"*/{cluster_cleanup.RECORD_NAME}")) if root.is_dir() else []:
        rec = cluster_cleanup.Record.load(rec_path)
        if rec is not None and rec.owner_pid and cluster_cleanup.start_time(rec.owner_pid) == rec.owner_start:
            return f"node {rec.name} (owner PID {rec.owner_pid})"
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if Path(exe.removesuffix(" (deleted)")).name in ("kubelet", "kube-apiserver"):
            return f"{Path(exe).name} PID {pid} ({exe})"
    return None


def wait_for_quiet(deadline: float) -> None:
    """Return when no other cluster runs; raise when ``deadline`` (monotonic) passes first."""
    said = None
    while (busy := other_cluster()) is not None:
        if time.monotonic() >= deadline:
            raise RuntimeError(f"another cluster still runs after waiting: {busy}")
        if busy != said:
            log(f"waiting: {busy} runs (tests/cluster names are shared; up to {int(deadline - time.monotonic())} s more)")
            said = busy
        time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))


def start_node(deadline: float) -> KubeNode:
    """KubeNode() started once no other runs; a race lost to another session (its claim won) waits again."""
    while True:
        wait_for_quiet(deadline)
        node = KubeNode()
        try:
            node.start()
            return node
        except RuntimeError as e:
            node.stop()  # whatever it had made (nothing when its claim failed)
            if "already running" in str(e) and time.monotonic() < deadline:
                log(f"lost the race for the node: {e}")
                continue
            raise
        except BaseException:
            node.stop()
            raise


# ---------------------------------------------------------------- the guard on Gateway addresses

@dataclass
class AddressGuard:
    """Polls the Gateways' status addresses; calls ``stop`` once one is outside ``allowed``."""

    node: KubeNode
    allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    stop: Any  # Callable[[str], None]
    max_s: float  # the thread ends by itself after this, at the latest
    violation: str = ""
    seen: set[str] = field(default_factory=set)
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def check(self) -> None:
        res = self.node.kubectl("get", "gateways.gateway.networking.k8s.io", "-A", "-o", "json", check=False, timeout_s=20)
        if res.returncode != 0:
            return
        for gw in json.loads(res.stdout or "{}").get("items", []):
            for a in (gw.get("status") or {}).get("addresses") or []:
                value, kind = str(a.get("value", "")), a.get("type", "IPAddress")
                self.seen.add(value)
                try:
                    ok = kind == "IPAddress" and any(ipaddress.ip_address(value) in n for n in self.allowed)
                except ValueError:
                    ok = False
                if not ok and not self.violation:
                    ns, name = gw["metadata"]["namespace"], gw["metadata"]["name"]
                    self.violation = (f"Gateway {ns}/{name} has address {kind} {value!r}, outside "
                                      f"{', '.join(map(str, self.allowed))}: the suite was stopped before it sent a request there")
                    self.stop(self.violation)

    def _loop(self) -> None:
        until = time.monotonic() + self.max_s
        while not self._done.is_set() and time.monotonic() < until:
            with contextlib.suppress(Exception):
                self.check()
            self._done.wait(GUARD_POLL_S)

    def __enter__(self) -> AddressGuard:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="gateway-address-guard")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(30)


# ---------------------------------------------------------------- the suite

@dataclass
class Suite:
    proc: subprocess.Popen[str]
    stopped: str = ""

    def stop(self, why: str) -> None:
        """SIGTERM to the suite's PID (its own process group: nothing else), SIGKILL after a grace period."""
        if self.proc.poll() is not None:
            return
        self.stopped = self.stopped or why
        log(f"stopping the suite (PID {self.proc.pid}): {why}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def run_suite(argv: list[str], env: dict[str, str], logfile: Path, timeout_s: float, node: KubeNode,
              allowed: list[Any]) -> tuple[int, str, str]:
    """The suite's binary, its output in ``logfile`` (the progress lines echoed); returns (exit code, why it was
    stopped or "", the guard's violation or "")."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as out:
        proc = subprocess.Popen(["setpriv", "--pdeathsig", "SIGTERM", "--", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=env, cwd=logfile.parent,
                                start_new_session=True, errors="replace")
        suite = Suite(proc)
        timer = threading.Timer(timeout_s, suite.stop, args=(f"no end after {timeout_s:.0f} s",))
        timer.daemon = True
        timer.start()
        try:
            with AddressGuard(node, allowed, suite.stop, timeout_s + 120) as guard:
                assert proc.stdout is not None
                for line in proc.stdout:  # ends when the suite (and all that holds its stdout) is gone
                    out.write(line)
                    if SHOW.match(line):
                        print(f"  {line.rstrip()[:220]}", flush=True)
                rc = proc.wait(KILL_GRACE_S * 2)
        except BaseException:
            suite.stop("interrupted")
            raise
        finally:
            timer.cancel()
    return rc, suite.stopped, guard.violation


# ---------------------------------------------------------------- report

def _rel(path: Path) -> str:
    """``path`` relative to the repo when it is inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def summarize(report: Path) -> list[str]:
    """Lines of the report: per profile, core and extended result, counts, the failed tests."""
    data = yaml.safe_load(report.read_text())
    lines = [f"report {_rel(report)}: {data.get('implementation', {}).get('project')} "
             f"{data.get('implementation', {}).get('version')}, Gateway API {data.get('gatewayAPIVersion')} "
             f"({data.get('gatewayAPIChannel')}), mode {data.get('mode')}"]
    for p in data.get("profiles") or []:
        for level in ("core", "extended"):
            part = p.get(level) or {}
            if not part:
                continue
            st = part.get("statistics") or {}
            lines.append(f"  {p.get('name')} {level}: {part.get('result')} (passed {st.get('Passed', 0)}, failed "
                         f"{st.get('Failed', 0)}, skipped {st.get('Skipped', 0)})")
            failed = part.get("failedTests") or []
            if failed:
                lines.append(f"    failed: {', '.join(failed[:12])}{' ...' if len(failed) > 12 else ''}")
    return lines


def outcomes(logfile: Path) -> dict[str, int]:
    """How many of the suite's tests passed, failed and were skipped, from its -test.v output."""
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for m in re.finditer(r"^\s*--- (PASS|FAIL|SKIP): TestConformance/", logfile.read_text(errors="replace"), re.M):
        counts[m.group(1)] += 1
    return counts


def first_errors(logfile: Path, n: int = 8) -> list[str]:
    """The first failures of the suite's output: each testify block as "test: error (messages)", else ``panic:``."""
    found: list[str] = []
    lines = logfile.read_text(errors="replace").splitlines()
    block: dict[str, str] = {}
    field_re = re.compile(r"^\s*(Error Trace|Error|Test|Messages):\s*(.*)$")
    last = ""
    for line in lines:
        m = field_re.match(line)
        if m:
            last = m.group(1)
            block[last] = m.group(2).strip()
            if last == "Error Trace":
                block = {"Error Trace": m.group(2).strip()}
        elif last in ("Error", "Messages") and line.startswith("        \t") and line.strip():
            block[last] = f"{block[last]} {line.strip()}".strip()
        else:
            if block.get("Error"):
                msg = f"{block.get('Test', '?')}: {block['Error']}" + (f" ({block['Messages']})" if block.get("Messages") else "")
                if msg not in found:
                    found.append(msg[:400])
            block, last = {}, ""
            if line.startswith("panic:") and line not in found:
                found.append(line[:400])
        if len(found) >= n:
            break
    return found


# ---------------------------------------------------------------- main

def project_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def git(*args: str) -> str:
    res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    return res.stdout.strip() if res.returncode == 0 else ""


def gatewayclass_features(node: KubeNode, name: str) -> list[str]:
    res = node.kubectl("get", "gatewayclasses.gateway.networking.k8s.io", name, "-o", "json", check=False)
    if res.returncode != 0:
        return []
    return [f["name"] for f in (json.loads(res.stdout).get("status") or {}).get("supportedFeatures") or [] if f.get("name")]


def install_crds(node: KubeNode, channel: str) -> list[Path]:
    """The channel's CRDs (and its safe-upgrades ValidatingAdmissionPolicy), applied and Established."""
    files = modules.crd_files(channel)
    node.kubectl("apply", "--server-side", *[a for f in files for a in ("-f", str(f))], timeout_s=120)
    crds = [n for n in node.kubectl("get", "crd", "-o", "name").stdout.split() if "gateway.networking" in n]
    node.kubectl("wait", "--for=condition=Established", *crds, f"--timeout={CRD_ESTABLISHED_S}s", timeout_s=CRD_ESTABLISHED_S + 10)
    return files


def set_gateway_pool(inst: Any, node: KubeNode, pool: list[str]) -> None:
    """``agent.gatewayAddresses`` of the installed chart (helm upgrade --reuse-values), the agents rolled out."""
    from tests.cluster.test_install import CHART, NS, RELEASE

    inst.helm_run("upgrade", RELEASE, str(CHART), "--namespace", NS, "--reuse-values", "--set-json",
                  f"agent.gatewayAddresses={json.dumps(pool)}", "--wait", "--timeout", "300s", timeout_s=360)
    node.kubectl("-n", NS, "rollout", "status", "daemonset/webb-agent", "--timeout=120s", timeout_s=130)


def ensure_gatewayclass(node: KubeNode, name: str, controller: str) -> str:
    """The GatewayClass the suite uses: Webb's own if its chart or operator made one, else made here (the suite
    expects the implementation's class to exist; it then waits for Accepted)."""
    res = node.kubectl("get", "gatewayclasses.gateway.networking.k8s.io", name, "-o", "json", check=False)
    if res.returncode == 0:
        got = json.loads(res.stdout)["spec"].get("controllerName", "")
        return f"GatewayClass {name} exists (controller {got})"
    node.apply({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": {"name": name},
                "spec": {"controllerName": controller}})
    return f"GatewayClass {name} made by the harness (controller {controller}): the install had none"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=PROFILES, help=f"conformance profiles (default {PROFILES})")
    ap.add_argument("--gateway-class", default=GATEWAY_CLASS)
    ap.add_argument("--gateway-addresses", default="",
                    help="the agent's gateway pool, comma-separated (default: the node's address and 127.0.120.1-15)")
    ap.add_argument("--controller", default=CONTROLLER, help="controllerName of the GatewayClass, if the harness makes it")
    ap.add_argument("--features", default="auto",
                    help="auto (infer from the GatewayClass if it lists any, else core), infer, core, or a comma-separated list")
    ap.add_argument("--channel", default="standard", choices=modules.CHANNELS, help="the Gateway API CRD channel installed")
    ap.add_argument("--timeout", type=float, default=float(os.environ.get("WEBB_CONFORMANCE_TIMEOUT", SUITE_TIMEOUT_S)),
                    help=f"the suite's wall-time bound in s (default {SUITE_TIMEOUT_S})")
    ap.add_argument("--wait-other", type=float, default=WAIT_OTHER_S, help="how long to wait for another cluster to end (s)")
    ap.add_argument("--run-test", help="one test only (the suite's -run-test)")
    ap.add_argument("--version", default="", help="Webb's version in the report (default: pyproject's)")
    ap.add_argument("--organization", default="webb")
    ap.add_argument("--project", default="webb")
    ap.add_argument("--url", default="https://webb.dev")
    ap.add_argument("--contact", default="", help="comma-separated (default: the last commit's author e-mail)")
    ap.add_argument("--report-dir", type=Path, default=REPO / "conformance" / "reports")
    ap.add_argument("suite_args", nargs="*", help="after --: more flags for the suite binary, passed as they are")
    args = ap.parse_args(argv)

    def on_sigterm(*_: object) -> None:  # the finally blocks (helm uninstall, node stop) run as on Ctrl-C
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    tools = modules.build()
    archives = images.build_all(tools)
    timings["tools and images (build or cache)"] = round(time.monotonic() - t0, 1)
    version = args.version or project_version()
    report = args.report_dir.resolve() / tools.release / f"webb-{version}.yaml"
    workdir = REPO / "build" / "conformance" / tools.release
    workdir.mkdir(parents=True, exist_ok=True)
    raw_report = workdir / "report.yaml"
    raw_report.unlink(missing_ok=True)
    logfile = workdir / "suite.log"
    log(f"suite {tools.suite} (Gateway API {tools.release}); images: {', '.join(sorted(archives))}")

    from tests.cluster.test_install import helm_installed  # imports pytest: only once the tools are there

    rc, stopped, violation, features_note = 1, "", "", ""
    t1 = time.monotonic()
    node = start_node(time.monotonic() + args.wait_other)
    timings["wait + node up"] = round(time.monotonic() - t1, 1)
    try:
        t2 = time.monotonic()
        import_archives(node.containerd_socket, sorted(set(archives.values())), timeout_s=600)
        timings["images imported"] = round(time.monotonic() - t2, 1)
        t2 = time.monotonic()
        files = install_crds(node, args.channel)
        timings["Gateway API CRDs"] = round(time.monotonic() - t2, 1)
        log(f"Gateway API {tools.release} CRDs ({args.channel}, {len(files)} files from {files[0].parent})")
        with tempfile.TemporaryDirectory(prefix="webb-conformance-helm-") as home, helm_installed(node, Path(home)) as inst:
            log(f"Webb installed with helm ({inst.image.ref}): {inst.timings}")
            pool = [a.strip() for a in args.gateway_addresses.split(",") if a.strip()] if args.gateway_addresses else \
                [node.node_ip, *LOOPBACK_POOL]
            t2 = time.monotonic()
            set_gateway_pool(inst, node, pool)
            log(f"agent gateway pool ({len(pool)} addresses, helm upgrade --reuse-values in {time.monotonic() - t2:.1f} s): "
                f"{', '.join(pool)}")
            log(ensure_gatewayclass(node, args.gateway_class, args.controller))
            inferred = gatewayclass_features(node, args.gateway_class)
            suite_flags = [f"-gateway-class={args.gateway_class}", f"-conformance-profiles={args.profiles}",
                           f"-report-output={raw_report}", f"-organization={args.organization}", f"-project={args.project}",
                           f"-url={args.url}", f"-version={version}",
                           f"-contact={args.contact or git('log', '-1', '--format=%ae') or 'webb'}"]
            mode = args.features
            if mode == "auto":
                mode = "infer" if inferred else "core"
            if mode == "core":
                core = ["Gateway"] if "GATEWAY" in args.profiles else []
                core += ["Mesh"] if "MESH" in args.profiles else []
                suite_flags.append(f"-supported-features={','.join(core)}")
                features_note = (f"core features of the profiles only (GatewayClass {args.gateway_class} lists "
                                 f"{'none' if not inferred else ', '.join(inferred)})")
            elif mode != "infer":
                suite_flags.append(f"-supported-features={mode}")
                features_note = f"features given: {mode}"
            else:  # given to the suite as they are: its own inference leaves out the Mesh profile's extended features
                suite_flags.append(f"-supported-features={','.join(inferred)}")
                features_note = f"inferred from GatewayClass {args.gateway_class}: {', '.join(inferred) or 'none'}"
            if args.run_test:
                suite_flags.append(f"-run-test={args.run_test}")
            log(f"supported features: {features_note}")
            cmd = [str(tools.suite), "-test.v", "-test.run=^TestConformance$", f"-test.timeout={int(args.timeout)}s",
                   *suite_flags, *args.suite_args]
            env = {**os.environ, "KUBECONFIG": str(node.kubeconfig), "NO_PROXY": "*"}
            for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
                env.pop(k, None)
            allowed = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network(node.pod_cidr),
                       ipaddress.ip_network(node.service_cidr)]
            log(f"running (at most {args.timeout:.0f} s; full output in {_rel(logfile)}):\n  {' '.join(cmd)}")
            t3 = time.monotonic()
            rc, stopped, violation = run_suite(cmd, env, logfile, args.timeout + 60, node, allowed)
            timings["suite"] = round(time.monotonic() - t3, 1)
    finally:
        t4 = time.monotonic()
        notes = node.stop()
        timings["node stop"] = round(time.monotonic() - t4, 1)
        left = node.leftovers()
        if notes:
            log(f"stop notes: {notes}")
        if left:
            log(f"LEFT BEHIND by the node: {left}")
    how = f" (stopped: {stopped})" if stopped else (f" (killed by signal {-rc}, not by this harness)" if rc < 0 else "")
    log(f"suite exit code {rc}{how}; timings (s): {json.dumps(timings)}")
    if violation:
        log(f"GUARD: {violation}")
    if raw_report.exists():
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(raw_report.read_text())
        for line in summarize(report):
            log(line)
    else:
        log(f"no report: the suite ended before it could write one (see {_rel(logfile)})")
    if logfile.exists():
        log(f"tests in the output: {json.dumps(outcomes(logfile))}")
    errors = first_errors(logfile) if logfile.exists() else []
    if errors:
        log("first errors:\n  " + "\n  ".join(errors))
    log(f"features: {features_note}")
    return 0 if rc == 0 and not left and not violation else 1


if __name__ == "__main__":
    sys.exit(main())
