"""`webb apply` and `webb delete` in the embedded mode: objects keyed on kind, namespace and name, as
kubectl keys them (mesh.cli.manifests_store keeps one file per object in the agent's directory).

``apply -f FILE`` validates every object of FILE (one object twice in it is an error), then creates
the objects that are new, updates those that differ (whichever file they were applied from before)
and leaves the others; ``delete -f FILE`` deletes the objects FILE names. Both print one line per
object in kubectl's words (created, configured, unchanged, deleted); ``--dry-run`` prints the same
and changes nothing. Then they wait for the agent(s) to apply the directory (mesh.cli.statedir).
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from mesh.cli.common import STATE, StateOpt, console, err
from mesh.cli.manifests_store import CREATED, DELETED, UNCHANGED, Change, ManifestStore, Stored, absolute_paths, dump
from mesh.cli.statedir import StateDirError, Target, resolve, wait_applied
from mesh.manifests import ManifestError, parse_object, read_documents
from mesh.state import Key, key_name, key_of

WaitOpt = Annotated[float, typer.Option(help="seconds to wait for the agent to apply the change (0: don't wait)")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print what would change (created, configured, unchanged, "
                                                           "deleted) and change nothing; no agent needed")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def validate(path: Path) -> list[tuple[Path, Key, dict[str, Any]]]:
    """Every object of ``path`` checked: (its file, its key, the document), read once. One object twice
    (in one file or in two files of a directory) is refused: only one of them would be kept."""
    seen: dict[Key, str] = {}
    out = []
    for f, doc in read_documents(path):
        try:
            parse_object(doc, base_dir=f.parent)
        except ManifestError as e:
            raise ManifestError(f"{e.where} ({f.name})", e.field, e.problem) from None
        key = key_of(str(doc.get("kind")), doc)
        if key in seen:
            raise ManifestError(f"{key_name(key)} ({f.name})", "metadata.name", f"this object is also in {seen[key]}: "
                                "only one would be kept; remove one or rename it")
        seen[key] = f.name
        out.append((f, key, doc))
    return out


def bodies(items: list[tuple[Path, Key, dict[str, Any]]]) -> list[tuple[Key, str]]:
    """Each object's YAML to store: a file of one object as it was written (comments kept, a large
    policy not written out again), else the object on its own; Pod paths made absolute."""
    count = Counter(f for f, _, _ in items)
    out = []
    for f, k, d in items:
        fixed = absolute_paths(d, f.parent)
        out.append((k, f.read_text().removeprefix("\ufeff") if count[f] == 1 and fixed is d else dump(fixed)))
    return out


def target_of(state_dir: Path) -> Target:
    """The node(s) and manifest directory ``--state-dir`` names; says on stderr what it picked."""
    try:
        target = resolve(state_dir)
    except StateDirError as e:
        raise _fail(str(e)) from None
    if target.note:
        err.print(escape(f"using {target.note}"), highlight=False, soft_wrap=True)
    return target


def _say(changes: list[Change], dry_run: bool, sources: dict[Key, str] | None = None) -> None:
    for c in changes:
        line = f"{c.name} {c.action}"
        before = c.before.source if c.before is not None else ""
        if c.action not in (CREATED, UNCHANGED, DELETED) and sources and before and before != sources.get(c.key):
            line += f" (it was applied from {before})"
        console.print(escape(line + (" (dry run)" if dry_run else "")), highlight=False, soft_wrap=True)


def _read(store: ManifestStore, migrate: bool) -> dict[Key, Stored]:
    objs, legacy, warnings = store.read()
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    if migrate:
        for m in store.migrate(objs, legacy):
            err.print(escape(m), highlight=False, soft_wrap=True)
    elif legacy:
        err.print(escape(f"{len(legacy)} file(s) stored by file name would be migrated to one file per object: "
                         + ", ".join(f.name for f in legacy)), highlight=False, soft_wrap=True)
    return objs


def apply(
    file: Annotated[Path, typer.Option("-f", "--filename", exists=True, help="YAML file or directory")],
    state_dir: StateOpt = STATE,
    wait: WaitOpt = 30.0,
    dry_run: DryRunOpt = False,
) -> None:
    """Create or update the objects of FILE in the agent's manifest directory (one file per object)."""
    try:
        items = validate(file)
    except ManifestError as e:
        raise _fail(str(e)) from None
    target = target_of(state_dir)
    store = ManifestStore(target.manifests)
    docs = bodies(items)
    sources = {k: str(f.resolve()) for f, k, _ in items}
    if dry_run:
        _say(store.plan_apply(_read(store, migrate=False), docs), dry_run, sources)
        console.print(escape(f"{file}: {len(items)} object(s) valid (dry run: nothing applied)"), highlight=False,
                      soft_wrap=True)
        return
    with store.lock():
        changes = store.plan_apply(_read(store, migrate=True), docs)
        for c, (k, d) in zip(changes, docs, strict=True):
            if c.action != UNCHANGED:
                store.write(k, d, sources[k])
    _say(changes, dry_run, sources)
    _after_change(target, wait, [key_name(k) for k, _ in docs])


def delete(
    file: Annotated[Path, typer.Option("-f", "--filename", help="the file (or directory) whose objects to delete; "
                                                                "a file gone since: the objects applied from it")],
    state_dir: StateOpt = STATE,
    wait: WaitOpt = 30.0,
    dry_run: DryRunOpt = False,
    ignore_not_found: Annotated[bool, typer.Option("--ignore-not-found", help="an object not there is no error")] = False,
) -> None:
    """Delete the objects FILE names (kind, namespace, name), wherever they were applied from."""
    target = target_of(state_dir)
    keys: list[Key] | None = None
    if file.exists():
        try:  # names only: a file that no longer validates still deletes what it names
            keys = list(dict.fromkeys(key_of(str(d.get("kind")), d) for _, d in read_documents(file)))
        except ManifestError as e:
            raise _fail(str(e)) from None
    store = ManifestStore(target.manifests)
    change = not dry_run and store.directory.is_dir()  # no directory: nothing to delete, nothing made
    with store.lock() if change else nullcontext():
        objs = _read(store, migrate=change)
        if keys is None:
            src = str(file.resolve())
            keys = [k for k, s in objs.items() if s.source == src]
            if not keys:
                raise _fail(f"{file}: no such file, and no object was applied from it")
        changes = [Change(k, DELETED, objs[k]) for k in keys if k in objs]
        if change:
            for c in changes:
                store.path(c.key).unlink(missing_ok=True)
    _say(changes, dry_run)
    missing = [k for k in keys if k not in objs]
    for k in missing:
        if not ignore_not_found:
            err.print(f"[red]error:[/] {escape(key_name(k))} not found", highlight=False, soft_wrap=True)
    if changes and not dry_run:
        _after_change(target, wait, [])
    if missing and not ignore_not_found:
        raise typer.Exit(1)


def _after_change(target: Target, wait: float, names: list[str]) -> None:
    """Wait for the agent(s). An agent refusing what was just applied, or Envoy refusing the plan, fails
    the command; a node's other problems (a backend missing, an Ingress of another class) are warnings."""
    if wait <= 0:
        return
    try:
        done = wait_applied(target, wait)
    except TimeoutError as e:
        raise _fail(f"wait for the agent: {e}") from None
    failed = False
    for st in done.values():
        who = f"node {st.node}: " if len(done) > 1 else ""
        refused = [n for n in names if n in st.refused]  # by the source, or quarantined after Envoy's NACK
        plan_refused = any("not applied" in p for p in st.errors)  # Envoy refused the node's whole plan
        for problem in st.errors:
            mine = (plan_refused and problem.startswith("Envoy ")) or any(problem.startswith(f"{n}:") for n in refused)
            label = "[red]error:[/]" if mine else "[yellow]warning:[/]"
            err.print(f"{label} {escape(who + problem)}", highlight=False, soft_wrap=True)
        failed |= bool(refused) or plan_refused
    if failed:
        raise typer.Exit(1)
