"""`webb ui`: the service map and the live flows of this node in a browser (mesh/ui), on 127.0.0.1."""

from __future__ import annotations

import threading
from typing import Annotated

import typer
from rich.markup import escape

from mesh.cli.common import STATE, StateOpt, console, err


def ui(
    state_dir: StateOpt = STATE,
    port: Annotated[int, typer.Option(min=0, max=65535, help="port on 127.0.0.1 (0: any free one, printed)")] = 12000,
    lifetime: Annotated[float, typer.Option(min=0, help="stop by itself after this many seconds (0: until Ctrl-C)")] = 0.0,
) -> None:
    """Serve the service map (services, flows coloured by verdict) and the live flow table on 127.0.0.1."""
    from mesh.ui.server import UIServer  # http.server: loaded by this command only

    if not state_dir.is_dir():
        err.print(f"[red]error:[/] {escape(str(state_dir))} is not a directory: give the agent's --state-dir", highlight=False)
        raise typer.Exit(1)
    try:
        srv = UIServer(state_dir, port)
    except OSError as e:
        err.print(f"[red]error:[/] listen on 127.0.0.1:{port}: {escape(e.strerror or str(e))}"
                  + (" (another process has it: use --port)" if port else ""), highlight=False)
        raise typer.Exit(1) from None
    if not (state_dir / "status.json").exists():
        err.print(f"[yellow]warning:[/] no agent status in {escape(str(state_dir))} yet: the page fills in when an agent "
                  "writes there", highlight=False)
    console.print(f"Serving the flows of {escape(str(state_dir))} on {escape(srv.url)}  (Ctrl-C stops)", highlight=False,
                  soft_wrap=True)  # one line, never wrapped: a script reads the URL from it
    t = threading.Thread(target=srv.serve_forever, name="webb-ui", daemon=True)
    t.start()
    try:
        threading.Event().wait(lifetime if lifetime > 0 else None)
    except KeyboardInterrupt:  # Ctrl-C: the way to stop it
        pass
    finally:
        srv.shutdown()
        srv.server_close()
