"""The flow filters of the UI's endpoints: ``webb observe``'s (mesh.cli.flowquery), from a URL's
query string. A URL is user input: an unknown parameter, one given twice, or a value that is not of
its kind is refused with a message naming it (HTTP 400), never ignored."""

from __future__ import annotations

from mesh.cli.flowquery import DEFAULT_LIMIT, MAX_LIMIT, PARAMS, FlowQuery, QueryError

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "PARAMS", "FlowQuery", "QueryError"]
