"""Run a command inside Webb's test guest (Debian's 6.1 kernel under qemu).

    python -m tests.vm.run [--timeout S] -- CMD ARGS...

The guest sees this machine's / read-only (9p) under a tmpfs overlay, so the command runs
with the same interpreter, packages and working directory. Exit status 0 iff the guest
reports PASS. Only the qemu this runner started is ever killed. Under TCG the guest's
timings are not performance figures: it is for correctness.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("WEBB_CACHE", "/var/cache/webb")) / "kernel-vm"
RESULT = re.compile(r"WEBB-VM-RESULT: (.*)")


def image() -> Path:
    out = subprocess.run([str(HERE / "build-image.sh"), str(CACHE)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _kvm() -> bool:
    # /dev/kvm is not enough: a PVM-only KVM (no vmx/svm flags) hangs a stock kernel
    flags = Path("/proc/cpuinfo").read_text()
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and re.search(r"\b(vmx|svm)\b", flags) is not None


def qemu(img: Path, job: Path) -> list[str]:
    accel = ["-enable-kvm", "-cpu", "host"] if _kvm() else ["-accel", "tcg", "-cpu", "max"]  # max: AES-NI
    return ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-m", "2G", "-smp", "1", "-serial", "stdio", "-monitor", "none", *accel,
            "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"),
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-rng-pci",
            "-append", f"console=ttyS0 quiet panic=-1 webb.job={job}"]


def boot(argv: list[str], timeout_s: float) -> int:
    img = image()
    pybin = Path(os.path.realpath(sys.executable)).parent
    (CACHE / "jobs").mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=CACHE / "jobs")
    job = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write("set -e\n"
                f"export HOME=/root PATH={shlex.quote(str(pybin))}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin "
                "PYTHONDONTWRITEBYTECODE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 NO_COLOR=1 TERM=dumb WEBB_IN_VM=1\n"
                f"cd {shlex.quote(os.getcwd())}\n"
                f"exec {shlex.join(argv)}\n")
    t0 = time.monotonic()
    result = None
    proc = subprocess.Popen(qemu(img, job), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    try:
        while time.monotonic() - t0 < timeout_s:
            chunk = proc.stdout.read()
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip("\r")
                    print(f"  vm| {line}", flush=True)
                    if m := RESULT.search(line):
                        result = m.group(1).strip()
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.05)
        else:
            result = result or f"FAIL timeout after {timeout_s:.0f}s"
    finally:
        if proc.poll() is None:
            try:
                proc.wait(timeout=10 if result == "PASS" else 0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        job.unlink(missing_ok=True)
    result = result or f"FAIL qemu exited ({proc.returncode}) without a result line"
    print(f"guest result: {result} ({time.monotonic() - t0:.1f}s)", flush=True)
    return 0 if result == "PASS" else 1


def main() -> None:
    args = sys.argv[1:]
    if "--" not in args:
        sys.exit("usage: python -m tests.vm.run [--timeout S] -- CMD ARGS...")
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=900)
    opts = ap.parse_args(args[: args.index("--")])
    sys.exit(boot(args[args.index("--") + 1:], opts.timeout))


if __name__ == "__main__":
    main()
