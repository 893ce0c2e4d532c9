"""Run the operator: kopf in this process, stopped by SIGTERM or after ``--lifetime`` seconds."""

from __future__ import annotations

import argparse
import logging
import os
import threading

import kopf

from mesh.agent.metrics import parse_address
from mesh.kube.client import api_client
from mesh.operator import metrics
from mesh.operator.metrics import DEFAULT_ADDRESS, ENV, MeteredApi


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mesh.operator", description=__doc__)
    ap.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default: $KUBECONFIG, else in-cluster")
    ap.add_argument("--lifetime", type=float, default=0.0, help="stop after this many seconds (0: run until SIGTERM)")
    ap.add_argument("--metrics-address", default=os.environ.get(ENV, DEFAULT_ADDRESS),
                    help=f"serve Prometheus metrics on HOST:PORT/metrics; 'off' for none (default: ${ENV}, else "
                         f"{DEFAULT_ADDRESS})")
    args = ap.parse_args(argv)
    try:
        parse_address(args.metrics_address)
    except ValueError as e:
        ap.error(f"--metrics-address: {e}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # a line per handled event otherwise
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf's own login reads it too
    from mesh.operator import handlers
    from mesh.operator.controller import Controller

    handlers.CONTROLLER = Controller(MeteredApi(api_client(args.kubeconfig)))
    server = metrics.start(handlers.CONTROLLER, args.metrics_address)
    stop = threading.Event()
    if args.lifetime > 0:
        timer = threading.Timer(args.lifetime, stop.set)
        timer.daemon = True
        timer.start()
    try:
        kopf.run(standalone=True, clusterwide=True, stop_flag=stop)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
