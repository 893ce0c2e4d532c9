"""`webb ui`: the node's service map and flows in a browser, served from 127.0.0.1 by the standard library.

query (the filters, parsed from a URL and checked), graph (flows -> nodes and edges), server (the HTTP
endpoints and the static page), browser (a headless Chromium driven over the DevTools protocol, for the
end-to-end test and the demo's screenshot).
"""
