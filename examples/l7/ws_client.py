"""Opens ws://<host>/echo, sends each argument as a message, prints each answer."""

import sys

from websockets.sync.client import connect


def main() -> int:
    with connect(f"ws://{sys.argv[1]}/echo", open_timeout=10, close_timeout=5) as ws:
        for text in sys.argv[2:]:
            ws.send(text)
            print(ws.recv(timeout=10), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
