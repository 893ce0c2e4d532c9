"""The `webb` command (typer): agent, apply/delete, status, observe, exec, certs, wire, demo."""
