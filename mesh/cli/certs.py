"""`webb certs`: the workload identities a node holds (SPIFFE certificates), and the mesh CA.

Read-only: it reads the identity store's index (``certs.store.read_index``, no key material)
and the CA's files; it never issues, renews or creates anything.
"""

from __future__ import annotations

import datetime
import stat
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from mesh.cli.common import STATE, TableFormat, console, dump, err, output_option

app = typer.Typer(no_args_is_help=False, help="Workload identities (SPIFFE certificates) of this node, and the mesh CA.")
StateOpt = Annotated[Path, typer.Option("--state-dir", help="agent state; identities are in <state-dir>/certs")]
OutputOpt = Annotated[TableFormat, output_option("table, json or yaml")]
OK, OVERDUE, EXPIRED = "ok", "overdue", "expired"


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _span(seconds: float) -> str:
    """3d 4h, 15h 59m, 12m 5s, 40s."""
    s = int(abs(seconds))
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {s % 60}s" if m else f"{s}s"


def _left(seconds: float) -> str:
    return _span(seconds) if seconds > 0 else f"expired {_span(seconds)} ago"


def identity_rows(directory: Path, now: float) -> list[dict[str, Any]]:
    """The index's identities with their state: expired (past not after), overdue (past renew at:
    the agent should have renewed it), ok."""
    from certs.store import read_index

    rows = []
    for e in read_index(directory):
        not_after, renew_at = float(str(e["not_after"])), float(str(e["renew_at"]))
        state = EXPIRED if now >= not_after else OVERDUE if now >= renew_at else OK
        rows.append({"spiffe_id": e["spiffe_id"], "serial": e["serial"], "not_before": float(str(e["not_before"])),
                     "not_after": not_after, "renew_at": renew_at, "time_left_s": round(not_after - now, 1), "state": state})
    return sorted(rows, key=lambda r: str(r["spiffe_id"]))


_MARK = {OK: "[green]ok[/]", OVERDUE: "[yellow]OVERDUE[/]", EXPIRED: "[red]EXPIRED[/]"}


@app.callback(invoke_without_command=True)
def certs(ctx: typer.Context, state_dir: StateOpt = STATE, output: OutputOpt = TableFormat.table) -> None:
    """The identities this node holds: SPIFFE ID, serial, validity, renewal time, time left.
    Exit 1 when one is expired or overdue for renewal."""
    if ctx.invoked_subcommand is not None:
        return
    directory = state_dir / "certs"
    rows = identity_rows(directory, time.time())
    if output is not TableFormat.table:
        dump(rows, output.value)
    elif not rows:
        console.print(escape(f"no identities in {directory} (the agent issues one per service account of its workloads)"))
    else:
        table = Table("SPIFFE ID", "SERIAL", "NOT BEFORE", "NOT AFTER", "RENEW AT", "TIME LEFT", "STATE", box=None)
        for r in rows:
            table.add_row(escape(str(r["spiffe_id"])), escape(str(r["serial"])), _utc(r["not_before"]), _utc(r["not_after"]),
                          _utc(r["renew_at"]), _left(r["time_left_s"]), _MARK[r["state"]])
        # never cut a SPIFFE ID: as wide as the table needs (a narrow terminal wraps the lines instead)
        need = Measurement.get(console, console.options.update_width(10_000), table).maximum
        (console if need <= console.width else Console(width=need, emoji=False)).print(table)
    if any(r["state"] != OK for r in rows):
        raise typer.Exit(1)


def ca_facts(directory: Path, now: float) -> dict[str, Any]:
    """What `webb certs ca` shows; FileNotFoundError when there is no CA in ``directory``."""
    from cryptography import x509

    crt, key = directory / "ca.crt", directory / "ca.key"
    if not crt.exists():
        raise FileNotFoundError(f"no CA in {directory}: {crt.name} not found (the agent makes an own root on first "
                                f"start; for your own intermediate put ca.crt, ca.key and root.crt there)")
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    intermediate = cert.issuer != cert.subject
    root_file = directory / "root.crt"
    roots = x509.load_pem_x509_certificates(root_file.read_bytes()) if root_file.exists() else []
    mode = stat.S_IMODE(key.stat().st_mode) if key.exists() else None
    not_after = cert.not_valid_after_utc.timestamp()
    return {
        "directory": str(directory), "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
        "kind": "intermediate (user-supplied)" if intermediate else "own root",
        "roots": [r.subject.rfc4514_string() for r in roots], "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.timestamp(), "not_after": not_after,
        "time_left_s": round(not_after - now, 1), "key_file": str(key),
        "key_mode": f"{mode:04o}" if mode is not None else None,
        "problems": _ca_problems(key, mode, not_after - now, intermediate, root_file),
    }


def _ca_problems(key: Path, mode: int | None, left_s: float, intermediate: bool, root_file: Path) -> list[str]:
    problems = []
    if mode is None:
        problems.append(f"{key} is missing: ca.crt and ca.key go together")
    elif mode & 0o077:  # as certs.ca.check_private: group or world may read it
        problems.append(f"{key} has mode {mode:04o}: a private key must be 0600 (fix: chmod 600 {key})")
    if left_s <= 0:
        problems.append("the CA certificate has expired: workload certificates can no longer be issued")
    if intermediate and not root_file.exists():
        problems.append(f"ca.crt is an intermediate: put its root(s) in {root_file}")
    return problems


@app.command("ca")
def ca(directory: Annotated[Path | None, typer.Option("--dir", help="the CA directory (ca.crt, ca.key, root.crt); "
                                                                    "default: <state-dir>/ca, as `webb agent --ca-dir`")] = None,
       state_dir: StateOpt = STATE, output: OutputOpt = TableFormat.table) -> None:
    """The mesh CA: subject, own root or user intermediate, expiry, the key file's mode (must be 0600).
    Exit 1 on a problem."""
    try:
        facts = ca_facts(directory or state_dir / "ca", time.time())
    except (FileNotFoundError, ValueError) as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if output is not TableFormat.table:
        dump(facts, output.value)
    else:
        mode = facts["key_mode"]
        lines = [("subject", facts["subject"]), ("kind", facts["kind"]), ("issuer", facts["issuer"]),
                 *(("root", r) for r in facts["roots"]), ("serial", facts["serial"]),
                 ("not after", f"{_utc(facts['not_after'])} ({_left(facts['time_left_s'])})"),
                 ("key", f"{facts['key_file']} mode {mode or '-'}")]
        key_ok = " [green]ok[/]" if mode and not int(mode, 8) & 0o077 else ""
        for name, value in lines:
            console.print(f"{name + ':':<11}{escape(str(value))}{key_ok if name == 'key' else ''}", highlight=False,
                          soft_wrap=True)
        for p in facts["problems"]:
            console.print(f"[red]problem:[/] {escape(p)}", highlight=False, soft_wrap=True)
    if facts["problems"]:
        raise typer.Exit(1)
