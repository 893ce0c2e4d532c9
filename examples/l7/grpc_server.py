"""A gRPC server with two unary methods, /demo.Greeter/Allowed and /demo.Greeter/Denied,
from grpcio generic handlers (raw bytes in and out: no generated code). Each answers
"<method> from <pod>: <request>". Stops by itself after --lifetime seconds."""

import argparse
import os
import threading
from concurrent import futures

import grpc

SERVICE = "demo.Greeter"


def _handler(method: str) -> grpc.RpcMethodHandler:
    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        return f"{method} from {os.environ.get('POD_NAME', '?')}: {request.decode()}".encode()
    return grpc.unary_unary_rpc_method_handler(answer)  # no (de)serializers: bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=50051)
    ap.add_argument("--lifetime", type=float, default=3600.0)
    args = ap.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {m: _handler(m) for m in ("Allowed", "Denied")}),))
    server.add_insecure_port(f"[::]:{args.port}")
    server.start()
    stop = threading.Event()
    stop.wait(args.lifetime)
    server.stop(grace=1)


if __name__ == "__main__":
    main()
