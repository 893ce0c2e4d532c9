"""Calls one method of demo.Greeter and prints the status code name and the answer (or the
error's details): `python3 grpc_client.py greeter.default.svc.cluster.local:50051 Allowed`."""

import sys

import grpc


def main() -> int:
    target, method = sys.argv[1], sys.argv[2]
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/demo.Greeter/{method}")  # bytes in, bytes out
        try:
            answer = call(b"hello", timeout=10)
        except grpc.RpcError as e:
            print(f"{e.code().name} {e.details()}")  # type: ignore[attr-defined]
            return 1
    print(f"OK {answer.decode()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
